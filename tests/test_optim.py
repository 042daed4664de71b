"""Learning-rate schedules (exact values), weight-decay groups, and gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ok, read_result, run_trainer
from trainer.config import ModelConfig, OptimConfig, ScheduleConfig
from trainer.model import GPT, cross_entropy
from trainer.optim import build_optimizer, lr_at, param_groups, warmup_steps
from trainer.rundir import read_metrics

CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------------------
# Schedules. total = 101 steps (0 … 100), peak 1.0, floor 0.1, 10% warmup = steps 0 … 9.
# After warmup the decay spans steps 10 … 100 (90 intervals), so its midpoint is step 55.

TOTAL, PEAK, FLOOR = 101, 1.0, 0.1


def sched(kind, **kw) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, **{"warmup": 0.1, "min_lr_ratio": 0.1, **kw})


def lr(step, cfg, total=TOTAL, peak=PEAK):
    return lr_at(step, total, peak, cfg)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_warmup_is_linear_up_to_the_peak(kind):
    cfg = sched(kind)
    assert warmup_steps(cfg, TOTAL) == 10
    assert lr(0, cfg) == pytest.approx(0.1)  # peak / warmup
    assert lr(4, cfg) == pytest.approx(0.5)
    assert lr(9, cfg) == pytest.approx(1.0)  # the warmup's last step is at the peak
    assert lr(10, cfg) == pytest.approx(1.0)  # and so is the first step after it


def test_constant_schedule():
    cfg = sched("constant")
    for step in (10, 55, 100):
        assert lr(step, cfg) == 1.0
    baseline = ScheduleConfig()  # the blog baseline: constant, no warmup
    assert [lr_at(s, 33165, 4e-4, baseline) for s in (0, 16582, 33164)] == [4e-4] * 3


def test_cosine_schedule():
    cfg = sched("cosine")
    assert lr(10, cfg) == pytest.approx(1.0, abs=1e-12)
    assert lr(55, cfg) == pytest.approx(0.55, abs=1e-12)  # 0.1 + 0.9 · ½(1 + cos(π/2))
    assert lr(40, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)), abs=1e-12)  # = 0.775
    assert lr(40, cfg) == pytest.approx(0.775, abs=1e-12)
    assert lr(100, cfg) == pytest.approx(0.1, abs=1e-12)  # the last step reaches the floor


def test_linear_schedule():
    cfg = sched("linear")
    assert lr(10, cfg) == pytest.approx(1.0, abs=1e-12)
    assert lr(40, cfg) == pytest.approx(0.7, abs=1e-12)  # a third of the way: 1 - 0.9/3
    assert lr(55, cfg) == pytest.approx(0.55, abs=1e-12)
    assert lr(100, cfg) == pytest.approx(0.1, abs=1e-12)


def test_wsd_schedule():
    # decay 0.2 of 101 steps = round(20.2) = 20 decay steps: 81 … 100.
    cfg = sched("wsd", decay=0.2)
    assert lr(10, cfg) == 1.0
    assert lr(55, cfg) == 1.0  # stable phase
    assert lr(80, cfg) == 1.0  # the last stable step
    assert lr(81, cfg) == pytest.approx(1.0 - 0.9 / 20, abs=1e-12)  # = 0.955
    assert lr(90, cfg) == pytest.approx(0.55, abs=1e-12)  # halfway through the decay
    assert lr(100, cfg) == pytest.approx(0.1, abs=1e-12)


def test_warmup_steps_overrides_the_fraction():
    cfg = ScheduleConfig(kind="linear", warmup=0.5, warmup_steps=4, min_lr_ratio=0.0)
    assert warmup_steps(cfg, 100) == 4
    assert lr_at(0, 100, 2.0, cfg) == pytest.approx(0.5)
    assert lr_at(3, 100, 2.0, cfg) == pytest.approx(2.0)
    assert lr_at(99, 100, 2.0, cfg) == pytest.approx(0.0, abs=1e-12)


def test_schedules_never_exceed_the_peak_and_never_fall_below_the_floor():
    for kind in ("constant", "cosine", "linear", "wsd"):
        cfg = sched(kind)
        values = [lr(s, cfg) for s in range(TOTAL)]
        assert max(values) == pytest.approx(1.0)
        assert min(values[10:]) >= 0.1 - 1e-12
        assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:]))  # non-increasing after warmup


# ---------------------------------------------------------------------------------------------------------
# Weight-decay groups

MODEL = ModelConfig(vocab_size=128, context_length=8, n_embd=16, n_layer=2, n_head=2, qkv_bias=True)


def groups(model, **switches):
    decay, no_decay = param_groups(model, OptimConfig(weight_decay=0.1, **switches))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}, decay, no_decay


def test_default_decays_every_parameter():
    model = GPT(MODEL)
    decay, no_decay, *_ = groups(model)
    assert no_decay == set()
    assert decay == {n for n, _ in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), CPU)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1


def test_matrices_only_decay():
    model = GPT(MODEL)
    decay, no_decay, *_ = groups(model, decay_biases=False, decay_norms=False, decay_embeddings=False)
    matrices = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert decay == matrices | {"head.weight"}
    assert "tok_emb.weight" in no_decay and "pos_emb.weight" in no_decay
    assert "blocks.0.attn.qkv.bias" in no_decay and "blocks.1.ln2.weight" in no_decay and "ln_f.bias" in no_decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    opt = build_optimizer(
        model, OptimConfig(weight_decay=0.1, decay_biases=False, decay_norms=False, decay_embeddings=False), CPU
    )
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    "switch, members",
    [
        (
            "decay_biases",
            {"blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc.bias", "blocks.1.mlp.proj.bias"},
        ),
        (
            "decay_norms",
            {"blocks.0.ln1.weight", "blocks.0.ln1.bias", "blocks.1.ln2.weight", "ln_f.weight", "ln_f.bias"},
        ),
        ("decay_embeddings", {"tok_emb.weight", "pos_emb.weight"}),
    ],
)
def test_each_switch_moves_only_its_tensors(switch, members):
    model = GPT(MODEL)
    decay, no_decay, *_ = groups(model, **{switch: False})
    assert members <= no_decay
    everything = {n for n, _ in model.named_parameters()}
    kinds = {
        "decay_biases": {n for n in everything if n.endswith("bias") and ".ln" not in n and not n.startswith("ln_f")},
        "decay_norms": {n for n in everything if ".ln" in n or n.startswith("ln_f")},
        "decay_embeddings": {"tok_emb.weight", "pos_emb.weight"},
    }
    assert no_decay == kinds[switch]


def test_tied_tensor_is_counted_once_as_an_embedding():
    model = GPT(MODEL.model_copy(update={"tie_weights": True}))
    _, _, decay, no_decay = groups(model, decay_embeddings=False)
    all_params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in all_params}) == len(all_params)  # no tensor twice
    assert sum(p.numel() for p in all_params) == model.num_params()
    assert any(p is model.tok_emb.weight for p in no_decay["params"])
    assert not any(p is model.tok_emb.weight for p in decay["params"])
    _, _, decay, no_decay = groups(model, decay_embeddings=True)
    assert sum(p is model.tok_emb.weight for p in decay["params"]) == 1


def test_decay_groups_act_as_configured():
    """One AdamW step with zero gradients: only the decayed group shrinks."""
    torch.manual_seed(0)
    model = GPT(MODEL)
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5, decay_embeddings=False), CPU)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["head.weight"], before["head.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["tok_emb.weight"], before["tok_emb.weight"])
    assert torch.equal(after["pos_emb.weight"], before["pos_emb.weight"])


# ---------------------------------------------------------------------------------------------------------
# Clipping


def test_clip_grad_norm_caps_the_norm():
    torch.manual_seed(0)
    model = GPT(MODEL)
    x = torch.randint(0, MODEL.vocab_size, (4, 8))
    cross_entropy(model(x), x).backward()
    grads = [p.grad for p in model.parameters()]
    before = torch.nn.utils.get_total_norm(grads).item()
    max_norm = 1e-3
    assert before > max_norm
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
    assert returned == pytest.approx(before)
    assert torch.nn.utils.get_total_norm(grads).item() <= max_norm * (1 + 1e-5)


def test_training_with_a_tiny_clip_clips_every_step(tmp_path, data_dir):
    run = tmp_path / "clip"
    ok(run_trainer(run, data_dir, {"optim.grad_clip": 1e-3, "run.steps": 6}))
    lines = [e for e in read_metrics(run) if "loss" in e]
    assert [e["step"] for e in lines] == list(range(1, 7))
    assert all(e["clipped"] == 1.0 for e in lines), [e["clipped"] for e in lines]
    assert all(e["grad_norm"] > 1e-3 for e in lines)  # the logged norm is the norm before clipping
    result = read_result(run)
    assert result["clipped_fraction"] == 1.0
    assert result["status"] == "succeeded"

"""Mixture of experts (trainer/moe.py, model.moe): routing, gates, balancing losses and the loss-free bias on hand
cases; parameter counts by formula; the config switch; real tiny runs that train and log the expert load (to
metrics.jsonl, MLflow and `orch report`), resume bitwise after a SIGKILL, and (slow) train the same under two
DDP processes as in one. The dense default is left exact by tests/test_golden.py and the run-id test here."""

from __future__ import annotations

import json
import math
import random
import time

import pytest
import sqlalchemy as sa
import torch
from torch import nn

from conftest import killed_and_resumed, ok, read_result, run_trainer
from trainer import checkpoint, presets
from trainer.config import ConfigError, ModelConfig, MoEConfig
from trainer.model import GPT
from trainer.moe import Balancer, MoE, Routing, balance_loss, choose, penalty, z_loss
from trainer.rundir import read_metrics

GAMMA = 0.001


def moe_cfg(preset: str = "tiny", **moe) -> ModelConfig:
    sets = {f"model.moe.{k}": v for k, v in moe.items()}
    return presets.load(preset_name=preset, overrides={**sets, "run.micro_batch_size": 8}).model  # fixed: aux


# ---------------------------------------------------------------------------------------------------------
# Routing on hand cases


def test_choose_breaks_ties_to_the_lowest_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 5.0, 5.0], [2.0, 1.0, 1.0, 1.0]])
    assert choose(scores, 2).tolist() == [[1, 2], [0, 1], [0, 2], [0, 1]]
    # Many rows of few distinct values (ties everywhere) against the rule itself: by score, then by index.
    rng = random.Random(0)
    rows = [[float(rng.randint(0, 2)) for _ in range(8)] for _ in range(2000)]
    want = [sorted(range(8), key=lambda i: (-row[i], i))[:3] for row in rows]
    assert choose(torch.tensor(rows), 3).tolist() == want


def hand_moe(**moe) -> MoE:
    """d = E = 4: router = identity (the logits are x itself), expert i = (i+1)·identity, no biases."""
    cfg = ModelConfig(n_embd=4, n_head=1, moe=MoEConfig(experts=4, top_k=2, **moe))
    layer = MoE(cfg, lambda: nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        for i, expert in enumerate(layer.experts):
            expert.weight.copy_((i + 1) * torch.eye(4))
    return layer


X = torch.tensor(
    [
        [1.0, 2.0, 2.0, 0.0],  # tie at the top: experts 1 and 2, gates ½ ½ -> 2.5·x
        [3.0, 1.0, 1.0, 2.0],  # experts 0 and 3, gates softmax(3, 2) -> (g0·1 + g3·4)·x
        [0.0, 1.0, 1.0, 1.0],  # three tie for two places: 1 and 2 -> 2.5·x
        [1.0, 1.0, 1.0, 1.0],  # all tie: 0 and 1 -> 1.5·x
    ]
)


def test_gates_are_the_softmax_over_the_chosen_logits():
    layer = hand_moe()
    y = layer(X[None])[0]
    g0, g3 = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    want = torch.stack([2.5 * X[0], (g0 * 1 + g3 * 4) * X[1], 2.5 * X[2], 1.5 * X[3]])
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    r = layer.routing
    assert r.counts.tolist() == [2, 3, 2, 1] and int(r.dropped) == 0


def test_the_bias_moves_the_choice_but_not_the_gates():
    layer = hand_moe(balance="bias")
    with torch.no_grad():
        layer.score_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    y = layer(X[:1][None])[0, 0]
    g3, g1 = torch.softmax(torch.tensor([0.0, 2.0]), 0)  # the logits of experts 3 and 1, without the bias
    torch.testing.assert_close(y, (g3 * 4 + g1 * 2) * X[0], rtol=1e-6, atol=0)


def test_capacity_keeps_first_choices_first_and_drops_the_rest():
    # C = ceil(0.5 · 2 · 4 / 4) = 1 slot per expert. First choices (by token): t0->1, t1->0, t2->1, t3->0;
    # second: t0->2, t1->3, t2->2, t3->1. Kept: expert 0 t1, 1 t0, 2 t0, 3 t1: tokens 2 and 3 lose both slots.
    layer = hand_moe(capacity_factor=0.5)
    y = layer(X[None])[0]
    g0, g3 = torch.softmax(torch.tensor([3.0, 2.0]), 0)
    want = torch.stack([2.5 * X[0], (g0 * 1 + g3 * 4) * X[1], torch.zeros(4), torch.zeros(4)])
    torch.testing.assert_close(y, want, rtol=1e-6, atol=0)
    assert layer.routing.counts.tolist() == [2, 3, 2, 1] and int(layer.routing.dropped) == 4
    y = layer.eval()(X[None])[0]  # evaluation and sampling drop nothing: the test loss ignores the eval batch
    assert int(layer.routing.dropped) == 0
    torch.testing.assert_close(y[2:], torch.stack([2.5 * X[2], 1.5 * X[3]]), rtol=1e-6, atol=0)


def test_aux_loss_and_z_loss_on_a_hand_case():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax rows (¼, ¾) and (½, ½): P = (⅜, ⅝)
    # f over k·N slots: with k = 1 both tokens on expert 1, f = (0, 1): aux = E·Σ f·P = 2·⅝
    assert balance_loss(logits, torch.tensor([0, 2]), k=1).item() == pytest.approx(1.25, abs=1e-7)
    # k = 2 of 2 experts: every token on both, f = (½, ½): aux = 2·(⅜ + ⅝)/2 = 1, the balanced value
    assert balance_loss(logits, torch.tensor([2, 2]), k=2).item() == pytest.approx(1.0, abs=1e-7)
    # z-loss: mean of (log Σ exp)² = ((ln 4)² + (ln 2)²)/2 = 2.5 (ln 2)²
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)
    # The gradient of aux reaches the logits through P only: with f = (0, 1), dP_1 = p_1(1 − p_1) per token.
    z = logits.clone().requires_grad_()
    balance_loss(z, torch.tensor([0, 2]), k=1).backward()
    torch.testing.assert_close(z.grad[:, 1], 2 * torch.tensor([0.75 * 0.25, 0.25]) / 2)


def test_the_layer_records_the_losses_of_its_own_logits_and_the_penalty_sums_them():
    torch.manual_seed(0)
    model = GPT(moe_cfg(experts=4, balance="aux", z_loss=0.001))
    x = torch.randint(0, 50257, (2, 16))
    seen = {}  # layer 0's input, to recompute its router logits
    model.blocks[0].ln2.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
    model(x)
    layer = model.blocks[0].mlp
    logits = seen["x"].reshape(-1, 64) @ layer.router.weight.t()
    torch.testing.assert_close(layer.routing.aux, balance_loss(logits, layer.routing.counts, 2))
    torch.testing.assert_close(layer.routing.z, z_loss(logits))
    want = sum(0.01 * b.mlp.routing.aux + 0.001 * b.mlp.routing.z for b in model.blocks)
    torch.testing.assert_close(penalty(model, model.cfg.moe), want)
    plain = GPT(moe_cfg(experts=4))
    plain(x)
    assert penalty(plain, plain.cfg.moe).item() == 0 and not penalty(plain, plain.cfg.moe).requires_grad


# ---------------------------------------------------------------------------------------------------------
# The loss-free bias and the window's metrics


def routing(counts: list[int], aux: float = 1.0, z: float = 2.0) -> Routing:
    return Routing(torch.tensor(counts), torch.tensor(0), torch.tensor(aux), torch.tensor(z))


def test_bias_update_from_the_summed_loads_of_a_step_and_the_window_metrics():
    model = GPT(moe_cfg(experts=4, balance="bias"))
    bal = Balancer.of(model, torch.device("cpu"))
    for counts0, counts1 in (([5, 1, 3, 3], [2, 2, 4, 4]), ([1, 1, 1, 1], [2, 2, 0, 0])):  # two micro-batches
        model.blocks[0].mlp.routing, model.blocks[1].mlp.routing = routing(counts0), routing(counts1, 3.0, 4.0)
        bal.record()
    bal.after_step(world=1)
    # layer 0: loads (6, 2, 4, 4), mean 4 -> b += γ·sign(4 − c) = (−γ, +γ, 0, 0); layer 1: (4, 4, 4, 4) -> 0
    assert torch.equal(model.blocks[0].mlp.score_bias, torch.tensor([-GAMMA, GAMMA, 0.0, 0.0]))
    assert torch.equal(model.blocks[1].mlp.score_bias, torch.zeros(4))
    assert bal.step_counts.sum() == 0  # the next step counts afresh
    m = bal.window_metrics(world=1)
    # loads per layer (.375, .125, .25, .25) and (.25,)*4: their mean per expert; saturation mean(1.5, 1.0)
    assert [m[f"moe/load_e{i}"] for i in range(4)] == [0.3125, 0.1875, 0.25, 0.25]
    assert m["moe/saturation"] == 1.25
    assert m["moe/aux_loss"] == 2.0 and m["moe/z_loss"] == 3.0  # means over 2 passes and 2 layers
    assert "moe/dropped" not in m and bal.counts.sum() == 0 and bal.passes == 0


def test_the_bias_is_a_buffer_checkpoints_carry_and_only_balance_bias_has():
    cfg = moe_cfg(experts=4, balance="bias")
    a, b = GPT(cfg), GPT(cfg)
    with torch.no_grad():
        a.blocks[1].mlp.score_bias.add_(0.5)
    assert "blocks.1.mlp.score_bias" in a.state_dict()
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.blocks[1].mlp.score_bias, a.blocks[1].mlp.score_bias)
    assert list(GPT(moe_cfg(experts=4, balance="aux")).buffers()) == []


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and FLOPs


def dense_mlp(m: ModelConfig) -> int:
    d, b = m.n_embd, int(m.bias)
    if m.mlp == "gelu":
        return 2 * d * 4 * d + 5 * d * b
    h = 64 * math.floor(8 * d / 3 / 64 + 0.5)
    return 3 * d * h + (2 * h + d) * b


@pytest.mark.parametrize("preset", ["tiny", "gpt2-small"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("experts,k", [(6, 2), (4, 3)])
def test_total_and_active_parameters_by_formula(preset, mlp, experts, k):
    dense = presets.load(preset_name=preset, overrides={"model.mlp": mlp}).model
    cfg = presets.load(
        preset_name=preset, overrides={"model.mlp": mlp, "model.moe.experts": experts, "model.moe.top_k": k}
    ).model
    with torch.device("meta"):
        base, model = GPT(dense).num_params(), GPT(cfg)
    L, d, router = cfg.n_layer, cfg.n_embd, cfg.n_embd * experts
    assert model.num_params() == base + L * ((experts - 1) * dense_mlp(cfg) + router)
    assert model.num_params(active=True) == base + L * ((k - 1) * dense_mlp(cfg) + router)
    lookups = cfg.vocab_size * d + cfg.context_length * d
    assert model.flops_per_token() == 6 * (model.num_params(active=True) - lookups) + 12 * L * d * cfg.context_length


def test_gpt2_small_six_experts_two_active():
    with torch.device("meta"):
        model = GPT(moe_cfg("gpt2-small", experts=6, top_k=2))
    # 163,009,536 dense + 12 × (5 more MLPs of 4,722,432 + a 768 × 6 router); active: 1 more MLP + router
    assert model.num_params() == 446_410_752 and model.num_params(active=True) == 219_734_016


# ---------------------------------------------------------------------------------------------------------
# The config switch


def test_set_switches_it_on_and_errors_name_the_key_and_the_fix():
    from trainer.__main__ import parse_sets

    cfg = presets.load(preset_name="tiny", overrides=parse_sets(["model.moe.experts=6", "model.moe.balance=bias"]))
    aux = ["model.moe.experts=6", "model.moe.balance=aux", "run.micro_batch_size=4"]  # a fixed size: accepted
    assert presets.load(preset_name="tiny", overrides=parse_sets(aux)).model.moe.balance == "aux"
    assert (cfg.model.moe.experts, cfg.model.moe.top_k, cfg.model.moe.balance) == (6, 2, "bias")
    cases = {
        ("model.moe.top_k=3",): ["model.moe.top_k applies only", "model.moe.experts"],
        ("model.moe.experts=2", "model.moe.top_k=3"): ["top_k (3) exceeds model.moe.experts (2)"],
        ("model.moe.experts=1",): ["use 0 (dense) or at least 2"],
        ("model.moe.experts=4", "model.moe.top_k=1"): ["use top_k >= 2"],
        ("model.moe.experts=4", "model.moe.aux_coef=0.1"): ["aux_coef applies only with model.moe.balance=aux"],
        ("model.moe.experts=4", "model.moe.balance=fair"): ["model.moe.balance", "'none', 'aux' or 'bias'"],
        ("model.moe.expert=4",): ["did you mean 'experts'"],
        ("model.moe.experts=4", "model.moe.balance=aux"): ["model.moe.balance=aux act on each forward pass", "set"],
        ("model.moe.experts=4", "model.moe.capacity_factor=1.25"): ["capacity_factor act", "run.micro_batch_size"],
    }
    for sets, words in cases.items():
        with pytest.raises(ConfigError) as err:
            presets.load(preset_name="tiny", overrides=parse_sets(list(sets)))
        assert all(w in str(err.value) for w in words), (sets, str(err.value))
    with pytest.raises(ConfigError, match="'experts'"):  # an unknown key inside the section, from a file
        presets.validate({"model": {"moe": {"expertz": 4}}})


def test_the_dense_default_keeps_run_ids_and_moe_changes_them():
    from orchestrator.runspec import run_id
    from trainer.identity import LATER_KEYS, same_run

    assert LATER_KEYS["model.moe"] == MoEConfig().model_dump(mode="json")
    cfg = presets.load(preset_name="tiny")
    assert "moe" not in cfg.identity()["model"]
    for stored in ({}, {"experts": 0}, MoEConfig().model_dump(mode="json")):  # older or partial sections too
        old = cfg.model_dump(mode="json")
        old["model"]["moe"] = stored
        if not stored:
            del old["model"]["moe"]
        assert same_run(old, cfg)
    moe = presets.load(preset_name="tiny", overrides={"model.moe.experts": 6})
    assert run_id(moe, 0) != run_id(cfg, 0) and not same_run(cfg.model_dump(mode="json"), moe)
    assert moe.identity()["model"]["moe"]["experts"] == 6


def test_export_refuses_a_mixture_by_name():
    from trainer.export import ExportError, check_mappable

    with pytest.raises(ExportError, match="model.moe"):
        check_mappable(moe_cfg(experts=6))


# ---------------------------------------------------------------------------------------------------------
# Real tiny runs (FAST: 12 steps of 8 × 16 tokens, a metric line every step, a checkpoint every 4)

MOE_KEYS = ["moe/load_e0", "moe/load_e1", "moe/load_e2", "moe/load_e3", "moe/saturation", "moe/aux_loss"]
AUX = {
    "model.moe.experts": 4,
    "model.moe.balance": "aux",
    "model.moe.z_loss": 0.001,
    "model.moe.capacity_factor": 2.0,
    "run.micro_batch_size": 8,  # per-pass terms: the config wants the size fixed, not 'auto'
}
BIAS = {"model.moe.experts": 4, "model.moe.balance": "bias", "model.moe.z_loss": 0.001}


def losses_and_moe(run_dir) -> list[tuple]:
    return [
        (e["step"], e["loss"], e["grad_norm"], *(e[k] for k in MOE_KEYS)) for e in read_metrics(run_dir) if "loss" in e
    ]


def final_biases(run_dir) -> dict[str, torch.Tensor]:
    state = checkpoint.load(checkpoint.latest(run_dir))["model"]
    return {k: v for k, v in state.items() if k.endswith("score_bias")}


@pytest.fixture(scope="module")
def aux_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("moe") / "aux"
    ok(run_trainer(run, data_dir, AUX))
    return run


@pytest.fixture(scope="module")
def bias_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("moe") / "bias"
    ok(run_trainer(run, data_dir, BIAS))
    return run


def test_a_moe_run_trains_and_logs_the_expert_load(aux_run):
    lines = [e for e in read_metrics(aux_run) if "loss" in e]
    assert [e["step"] for e in lines] == list(range(1, 13))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.3, [e["loss"] for e in lines]  # it learns
    for e in lines:
        loads = [e[f"moe/load_e{i}"] for i in range(4)]
        assert sum(loads) == pytest.approx(1.0) and all(0 <= v <= 0.5 for v in loads)  # ≤ 1/k per expert
        assert 1.0 <= e["moe/saturation"] <= 4 / 2  # at most E/k
        assert e["moe/aux_loss"] >= 0.99 and e["moe/z_loss"] > 0 and 0 <= e["moe/dropped"] < 1
    result = read_result(aux_run)
    model = GPT(presets.load(str(aux_run / "config.json")).model)
    assert (result["params"], result["active_params"]) == (model.num_params(), model.num_params(active=True))
    assert result["active_params"] < result["params"] and math.isfinite(result["test_loss"])
    assert result["flops_per_token"] == model.flops_per_token()


def test_the_load_metrics_reach_mlflow(aux_run, tmp_path):
    from orchestrator.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_run = tracker.client.create_run(tracker.experiment_id("moe-metrics")).info.run_id
    events = read_metrics(aux_run)
    tracker.log_events(mlflow_run, events, {})
    for key in ("moe/load_e0", "moe/saturation", "moe/aux_loss", "moe/z_loss", "moe/dropped"):
        history = sorted((m.step, m.value) for m in tracker.client.get_metric_history(mlflow_run, key))
        assert history == [(e["step"], pytest.approx(e[key])) for e in events if key in e], key


def test_the_report_plots_expert_load_for_moe_arms(aux_run, tmp_path):
    from orchestrator import report, runspec, specs, submission
    from orchestrator.db import Run, connect

    engine = connect(f"sqlite:///{tmp_path / 'results.db'}")
    exp = specs.Experiment(name="moe-rep", interventions=[specs.Intervention(name="moe", set={"model.moe.experts": 4})])
    runs = runspec.expand(exp)
    submission.submit(engine, exp, runs)
    dense = tmp_path / "dense"  # the baseline: a dense run's lines (no moe/*), written by hand
    dense.mkdir()
    events = [dict(step=s, tokens=128 * s, loss=10 - s / 4, time=time.time()) for s in range(1, 13)]
    (dense / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    for r in runs:
        run_dir = aux_run if r.arm == "moe" else dense
        result = read_result(aux_run) | ({} if r.arm == "moe" else {"test_loss": 11.0})
        with engine.begin() as conn:
            values = dict(state="succeeded", run_dir=str(run_dir), result=result, test_loss=result["test_loss"])
            conn.execute(sa.update(Run).where(Run.id == r.id).values(**values, finished_at=time.time()))
    index = report.write_report(engine, "moe-rep", tmp_path / "out")
    png = (tmp_path / "out" / "expert_load.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Expert load" in index.read_text(encoding="utf-8")
    assert not report._expert_load_plot(tmp_path / "none.png", {"baseline": [events]}, {"baseline": "C0"})
    assert not (tmp_path / "none.png").exists()


def test_a_moe_run_resumes_bitwise_after_sigkill(bias_run, data_dir, tmp_path):
    run = tmp_path / "resumed"
    killed_and_resumed(run, data_dir, BIAS)  # killed after step 5, back to the step-4 checkpoint
    assert losses_and_moe(run) == losses_and_moe(bias_run)
    a, b = final_biases(run), final_biases(bias_run)
    assert len(a) == 2 and all(torch.equal(a[k], b[k]) for k in a) and any(a[k].abs().sum() > 0 for k in a)
    result, want = read_result(run), read_result(bias_run)
    assert result["launches"] == 2 and result["test_loss"] == want["test_loss"]


@pytest.mark.slow
def test_two_ddp_processes_train_the_same_moe_as_one(data_dir, tmp_path):
    from test_train import run_torchrun

    # Micro-batches of 4 in both: the aux and z terms are per micro-batch, as each rank's are under DDP.
    sets = {**BIAS, "model.dropout": 0.0, "run.micro_batch_size": 4, "run.steps": 8, "run.checkpoint_interval": 0}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    ok(run_trainer(single, data_dir, sets))
    ok(run_torchrun(ddp, data_dir, sets))
    assert read_result(ddp)["environment"]["world_size"] == 2
    a, b = losses_and_moe(single), losses_and_moe(ddp)
    assert [line[0] for line in a] == [line[0] for line in b] == list(range(1, 9))
    for la, lb in zip(a, b):
        assert la[3:] == pytest.approx(lb[3:], rel=1e-5)  # the same loads: the routing agrees token by token
        assert abs(la[1] - lb[1]) <= 1e-5 and lb[2] == pytest.approx(la[2], rel=1e-5)
    biases, want = final_biases(ddp), final_biases(single)  # the loads summed over both ranks: the same bias
    assert biases.keys() == want.keys() and all(torch.equal(biases[k], want[k]) for k in want)
    assert any(b.abs().sum() > 0 for b in biases.values())  # the bias moved
    assert read_result(ddp)["test_loss"] == pytest.approx(read_result(single)["test_loss"], abs=1e-5)

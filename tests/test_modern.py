"""The modern switches (trainer/model.py): RoPE, RMSNorm, SwiGLU, no biases, QK-norm, logit soft-capping.

For each: a test of its function against the formula computed by hand, its exact parameter count on the
tiny preset, and a few real training steps on CPU. With all of them stacked: a run stopped midway resumes
bitwise, and (slow) two DDP processes train the same model as one. The defaults are GPT-2, which the golden
file (tests/test_golden.py) and the LATER_KEYS test below keep exact.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, killed_and_resumed, ok, read_result, run_trainer
from trainer import presets
from trainer.config import ConfigError, ModelConfig, OptimConfig
from trainer.model import GPT, MLP, CausalSelfAttention, RMSNorm, apply_rope, cross_entropy, rope_angles
from trainer.optim import param_groups
from trainer.rundir import read_metrics

SWITCHES = {
    "rope": {"model.position": "rope"},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "swiglu": {"model.mlp": "swiglu"},
    "no-bias": {"model.bias": False},
    "qk-norm": {"model.qk_norm": True},
    "softcap": {"model.logit_softcap": 30.0},
}
STACKED = {k: v for switch in SWITCHES.values() for k, v in switch.items()}


def model_cfg(preset: str = "tiny", **overrides) -> ModelConfig:
    return presets.load(preset_name=preset, overrides={f"model.{k}": v for k, v in overrides.items()}).model


def stacked_cfg(preset: str = "tiny", **overrides) -> ModelConfig:
    return model_cfg(preset, **{k.removeprefix("model."): v for k, v in STACKED.items()}, **overrides)


def n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg).num_params()


# ---------------------------------------------------------------------------------------------------------
# Parameter counts


def expected_params(m: ModelConfig) -> int:
    """The parameter count from the architecture's description, independently of trainer/model.py."""
    d, hd, b = m.n_embd, m.n_embd // m.n_head, int(m.bias)
    norm = d if m.norm == "rmsnorm" else d * (1 + b)  # gain (+ bias): RMSNorm never has a bias
    attn = 3 * d * d + 3 * d * int(m.qkv_bias) + d * d + d * b + (2 * hd if m.qk_norm else 0)
    if m.mlp == "gelu":
        mlp = 2 * d * 4 * d + (4 * d + d) * b
    else:
        h = 64 * math.floor(8 * d / 3 / 64 + 0.5)
        mlp = 3 * d * h + (2 * h + d) * b
    embeddings = m.vocab_size * d * (1 if m.tie_weights else 2) + (
        m.context_length * d if m.position == "learned" else 0
    )
    return embeddings + m.n_layer * (2 * norm + attn + mlp) + norm


# tiny: V=50257, d=64, 2 layers, 4 heads (head_dim 16), context 64, untied.
TINY_PARAMS = {
    "baseline": 6_536_704,
    "rope": 6_536_704 - 64 * 64,  # no position table
    "rmsnorm": 6_536_704 - 5 * 64,  # 5 norms lose their biases
    "swiglu": 6_536_704 + 2 * (4_096 + 128),  # h=192: 3·64·192 − 8·64² weights, (2·192+64) − 5·64 biases
    "no-bias": 6_536_704 - 2 * (64 + 256 + 64 + 2 * 64) - 64,  # attn proj, fc, mlp proj, 2 norms; ln_f
    "qk-norm": 6_536_704 + 2 * 2 * 16,  # a head_dim gain for q and one for k, per layer
    "softcap": 6_536_704,
    "stacked": 6_539_776,
}


@pytest.mark.parametrize("name", list(TINY_PARAMS))
def test_parameter_count_on_the_tiny_preset(name):
    sets = STACKED if name == "stacked" else SWITCHES.get(name, {})
    cfg = model_cfg(**{k.removeprefix("model."): v for k, v in sets.items()})
    assert n_params(cfg) == expected_params(cfg) == TINY_PARAMS[name]


def test_swiglu_matches_the_gelu_mlp_as_stated():
    """h = 8d/3 rounded to a multiple of 64: gpt2-small (d=768) gets h=2048 and exactly the GELU MLP's weights;
    only its biases differ (2h + d against 5d: +1,024 per layer). tiny (d=64) gets h=192 (+4,096 weights)."""
    small, small_swiglu = model_cfg("gpt2-small"), model_cfg("gpt2-small", mlp="swiglu")
    with torch.device("meta"):
        assert GPT(small_swiglu).blocks[0].mlp.proj.in_features == 2048
    assert n_params(small) == expected_params(small) == 163_009_536
    assert n_params(small_swiglu) - n_params(small) == 12 * 1_024 == 12_288
    no_bias = {"bias": False}
    assert n_params(model_cfg("gpt2-small", mlp="swiglu", **no_bias)) == n_params(model_cfg("gpt2-small", **no_bias))
    assert GPT(model_cfg(mlp="swiglu")).blocks[0].mlp.proj.in_features == 192
    assert n_params(model_cfg(mlp="swiglu")) - n_params(model_cfg()) == 2 * (3 * 64 * 192 - 8 * 64**2 + 128)


def test_stacked_gpt2_small_count_and_flops():
    cfg = stacked_cfg("gpt2-small")
    assert n_params(cfg) == expected_params(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.pos_emb is None
    # FLOPs: every weight but the token lookup is a matmul weight (RoPE has no table).
    assert model.flops_per_token() == 6 * (model.num_params() - 50257 * 768) + 12 * 12 * 768 * 1024


# ---------------------------------------------------------------------------------------------------------
# What each switch computes


def test_rope_rotates_preserving_norms_and_scores_depend_on_relative_position():
    torch.manual_seed(0)
    T, hd = 24, 16
    rope = rope_angles(T, hd, 10000.0, torch.device("cpu"))
    x = torch.randn(2, 3, T, hd)
    y = apply_rope(x, rope)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0: angle 0
    assert not torch.allclose(y[:, :, 1:], x[:, :, 1:])
    # The same content a (query) and b (key) at every position: q_m·k_n must depend on m − n only.
    a, b = torch.randn(hd), torch.randn(hd)
    q = apply_rope(a.expand(1, 1, T, hd), rope)[0, 0]
    k = apply_rope(b.expand(1, 1, T, hd), rope)[0, 0]
    scores = q @ k.T  # (T, T)
    for offset in range(-T + 1, T):
        diagonal = torch.diagonal(scores, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-5, atol=1e-5)
    # The angle of pair i at position t is t·base^(-2i/hd): pair 0 turns by exactly t radians.
    cos, sin = rope
    torch.testing.assert_close(cos[:, 0], torch.cos(torch.arange(T, dtype=torch.float32)))
    torch.testing.assert_close(sin[:, -1], torch.sin(torch.arange(T) * 10000.0 ** (-(hd - 2) / hd)))


def test_rope_model_has_no_position_table_and_still_sees_order():
    """Without any position signal causal attention cannot tell the order of earlier tokens apart; with RoPE
    swapping two of them changes the last position's logits."""
    torch.manual_seed(0)
    model = GPT(model_cfg(position="rope", dropout=0.0)).eval()
    assert model.pos_emb is None and "pos_emb.weight" not in model.state_dict()
    x = torch.tensor([[11, 22, 33, 44, 55, 66]])
    swapped = torch.tensor([[22, 11, 33, 44, 55, 66]])
    with torch.no_grad():
        assert not torch.allclose(model(x)[0, -1], model(swapped)[0, -1])


def test_rope_base_needs_rope_and_an_even_head_width():
    assert model_cfg(position="rope", rope_base=500000.0).rope_base == 500000.0
    with pytest.raises(ConfigError, match="model.rope_base .* only with model.position=rope"):
        model_cfg(rope_base=500000.0)
    with pytest.raises(ConfigError, match="must be even"):
        model_cfg(position="rope", n_embd=60, n_head=4)  # head width 15


def test_rmsnorm_is_x_over_rms_times_gain():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    assert norm.bias is None and torch.equal(norm.weight, torch.ones(64))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = 3 * torch.randn(4, 7, 64) + 1
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), by_hand)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-5))
    # bf16 in, bf16 out (computed in float32), as q and k must stay in v's dtype for attention.
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rmsnorm_replaces_every_layernorm_and_is_a_norm_for_weight_decay():
    model = GPT(model_cfg(norm="rmsnorm", qk_norm=True))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 and all(type(m) is RMSNorm for m in norms)  # + q/k norms
    _, no_decay = param_groups(model, OptimConfig(decay_norms=False))
    assert {id(p) for p in no_decay["params"]} == {id(m.weight) for m in norms}


def test_swiglu_is_silu_of_xw1_times_xw3_then_w2():
    torch.manual_seed(0)
    for bias in (True, False):
        mlp = MLP(model_cfg(mlp="swiglu", bias=bias))
        h = 192
        W1, W3, W2 = mlp.fc.weight[:h], mlp.fc.weight[h:], mlp.proj.weight  # (h, d), (h, d), (d, h)
        x = torch.randn(3, 5, 64)
        a, g = x @ W1.T, x @ W3.T
        if bias:
            a, g = a + mlp.fc.bias[:h], g + mlp.fc.bias[h:]
        by_hand = (a * torch.sigmoid(a) * g) @ W2.T + (mlp.proj.bias if bias else 0)
        torch.testing.assert_close(mlp(x), by_hand)
        assert (mlp.fc.bias is None) == (mlp.proj.bias is None) == (not bias)


def test_no_bias_leaves_no_bias_anywhere():
    for norm in ("layernorm", "rmsnorm"):
        model = GPT(model_cfg(bias=False, norm=norm, mlp="swiglu", qk_norm=True))
        assert [n for n, _ in model.named_parameters() if "bias" in n] == []
        assert all(getattr(m, "bias", None) is None for m in model.modules())
    # The default keeps the series' biases: everywhere but QKV (and the head, which never had one).
    biased = {n for n, _ in GPT(model_cfg()).named_parameters() if n.endswith("bias")}
    assert "blocks.0.attn.proj.bias" in biased and "ln_f.bias" in biased and "blocks.0.attn.qkv.bias" not in biased


def test_no_bias_and_qkv_bias_contradict_with_a_clear_error():
    with pytest.raises(ConfigError, match="model.bias=false .* contradicts model.qkv_bias=true"):
        model_cfg(bias=False, qkv_bias=True)
    both = GPT(model_cfg(bias=True, qkv_bias=True))  # biases everywhere, QKV included
    assert both.blocks[0].attn.qkv.bias is not None and both.blocks[0].attn.proj.bias is not None


def test_qk_norm_normalises_each_head_of_q_and_k():
    torch.manual_seed(0)
    cfg = model_cfg(qk_norm=True, dropout=0.0)
    attn = CausalSelfAttention(cfg).eval()
    B, T, C, H, hd = 2, 9, 64, 4, 16
    x = torch.randn(B, T, C)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in attn.qkv(x).split(C, dim=2))
    qn, kn = attn.q_norm(q), attn.k_norm(k)
    # Gains start at 1: every head's q and k vector has RMS 1 over its head_dim.
    for t in (qn, kn):
        torch.testing.assert_close(t.pow(2).mean(-1), torch.ones(B, H, T), rtol=1e-4, atol=1e-4)
    y = F.scaled_dot_product_attention(qn, kn, v, is_causal=True)
    torch.testing.assert_close(attn(x), attn.proj(y.transpose(1, 2).reshape(B, T, C)))
    # So scaling q's and k's weights changes attention only through the norm's eps (1e-5 against a mean
    # square of ~0.03 here): the logits no longer grow with the weights.
    with torch.no_grad():
        before = attn(x)
        attn.qkv.weight[: 2 * C] *= 100
        torch.testing.assert_close(attn(x), before, rtol=1e-3, atol=1e-4)


def test_softcap_bounds_logits_and_is_cap_tanh():
    torch.manual_seed(0)
    cap = 5.0
    plain = GPT(model_cfg(dropout=0.0)).eval()
    with torch.no_grad():
        plain.head.weight.mul_(50)  # logits of up to ~20, into tanh's saturation
    capped = GPT(model_cfg(dropout=0.0, logit_softcap=cap)).eval()
    capped.load_state_dict(plain.state_dict())  # the same parameters: the cap adds none
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        raw, out = plain(x), capped(x)
    assert raw.abs().max() > 2 * cap
    assert out.abs().max() <= cap  # (float32 tanh rounds to exactly 1 beyond ~9 units)
    torch.testing.assert_close(out, cap * torch.tanh(raw / cap))


def test_defaults_are_gpt2_and_new_keys_keep_run_ids():
    """The switches came after run ids were handed out: at their defaults every id and resume check holds."""
    import hashlib
    import json

    from orchestrator.runspec import run_id
    from tests.conftest import before_later_keys
    from trainer.identity import LATER_KEYS, same_run

    def old_run_id(config_dict: dict, repeat: int) -> str:  # as computed before any LATER_KEYS existed
        canonical = json.dumps({"config": config_dict, "repeat": repeat}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    cfg = presets.load(preset_name="tiny")
    for key in ("pad_vocab", "position", "rope_base", "norm", "mlp", "bias", "qk_norm", "logit_softcap"):
        assert f"model.{key}" in LATER_KEYS
        assert LATER_KEYS[f"model.{key}"] == ModelConfig.model_fields[key].default
    old = before_later_keys(cfg)  # a config.json or checkpoint written before the switches (and later keys)
    assert same_run(old, cfg) and run_id(cfg, 0) == old_run_id(old, 0)
    for name, sets in SWITCHES.items():
        changed = presets.load(preset_name="tiny", overrides=sets)
        assert run_id(changed, 0) != run_id(cfg, 0) and not same_run(old, changed), name


def test_state_dict_is_the_whole_state():
    """Nothing outside the parameters: a model rebuilt from another seed and given the state dict computes
    the same logits bitwise (what resume and DDP rely on)."""
    cfg = stacked_cfg(dropout=0.0)
    torch.manual_seed(0)
    a = GPT(cfg).eval()
    torch.manual_seed(1)
    b = GPT(cfg).eval()
    assert list(a.buffers()) == []
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a(x), a(x))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_stacked_switches_under_autocast(amp):
    from trainer.evaluate import autocast

    torch.manual_seed(0)
    model = GPT(stacked_cfg(dropout=0.0))
    x = torch.randint(0, 50257, (2, 16))
    with autocast(torch.device("cpu"), amp):
        logits = model(x)
    assert logits.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    loss = cross_entropy(logits, x)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Training: each switch learns; the stack resumes bitwise (tiny preset, the session's synthetic corpus)

SHORT = {"run.steps": 8, "run.checkpoint_interval": 0}


def losses_and_norms(run_dir) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["grad_norm"]) for e in read_metrics(run_dir) if "loss" in e]


def assert_learns(run_dir, steps: int) -> None:
    lines = losses_and_norms(run_dir)
    assert [s for s, _, _ in lines] == list(range(1, steps + 1))
    assert all(math.isfinite(loss) and math.isfinite(norm) for _, loss, norm in lines)
    assert lines[-1][1] < lines[0][1] - 0.3, lines  # it learns (the baseline drops ~0.4 in 8 steps)
    assert math.isfinite(read_result(run_dir)["test_loss"])


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_trains(name, data_dir, tmp_path):
    run = tmp_path / name
    ok(run_trainer(run, data_dir, {**SWITCHES[name], **SHORT}))
    assert_learns(run, SHORT["run.steps"])
    cfg = presets.load(str(run / "config.json"))
    assert read_result(run)["params"] == n_params(cfg.model) == expected_params(cfg.model)


@pytest.fixture(scope="module")
def stacked_run(data_dir, tmp_path_factory):
    """All switches, FAST's 12 steps with checkpoints every 4, the tiny preset's dropout 0.1 (so a resume must
    restore the RNG too)."""
    run = tmp_path_factory.mktemp("stacked") / "run"
    ok(run_trainer(run, data_dir, STACKED))
    return run


def test_all_switches_stacked_train(stacked_run):
    assert_learns(stacked_run, FAST["run.steps"])


def test_all_switches_stacked_resume_bitwise(stacked_run, data_dir, tmp_path):
    run = tmp_path / "resumed"
    killed_and_resumed(run, data_dir, STACKED)  # killed after step 5, back to the step-4 checkpoint
    assert losses_and_norms(run) == losses_and_norms(stacked_run)
    result, want = read_result(run), read_result(stacked_run)
    assert result["launches"] == 2 and result["test_loss"] == want["test_loss"]


@pytest.mark.slow
def test_all_switches_stacked_ddp_equals_one_process(data_dir, tmp_path):
    from test_train import run_torchrun

    sets = {**STACKED, "model.dropout": 0.0, **SHORT}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    ok(run_trainer(single, data_dir, sets))
    ok(run_torchrun(ddp, data_dir, sets))
    assert read_result(ddp)["environment"]["world_size"] == 2
    a, b = losses_and_norms(single), losses_and_norms(ddp)
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, la, na), (_, lb, nb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 and nb == pytest.approx(na, rel=1e-5)
    assert read_result(ddp)["test_loss"] == pytest.approx(read_result(single)["test_loss"], abs=1e-5)

"""The GPT-2 model: initial loss, learning, parameter counts of the switches, dropout, autocast dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import presets
from trainer.config import ModelConfig
from trainer.evaluate import autocast
from trainer.model import GPT, cross_entropy

CPU = torch.device("cpu")


def tiny_model_cfg(**overrides) -> ModelConfig:
    """The tiny preset's model section with overrides (full GPT-2 vocabulary)."""
    return presets.load(preset_name="tiny", overrides={f"model.{k}": v for k, v in overrides.items()}).model


def small_model_cfg(**overrides) -> ModelConfig:
    """An even smaller model (small vocabulary) for tests that take many optimizer steps."""
    base = dict(vocab_size=256, context_length=16, n_embd=32, n_layer=2, n_head=4, dropout=0.0, init="gpt2")
    return ModelConfig(**{**base, **overrides})


def n_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return GPT(cfg).num_params()


def test_initial_loss_is_log_vocab():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(init="gpt2", context_length=32)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    y = torch.randint(0, cfg.vocab_size, (4, 32))
    with torch.no_grad():
        loss = cross_entropy(model(x), y).item()
    assert abs(loss - math.log(cfg.vocab_size)) < 0.1, loss


def test_one_batch_overfits():
    torch.manual_seed(0)
    cfg = small_model_cfg()
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (4, 16))
    y = torch.randint(0, cfg.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 5.0
    assert loss.item() < 1.0, loss.item()


def test_one_batch_overfits_full_vocabulary():
    """The same with the tiny preset's model itself (50257-token head)."""
    torch.manual_seed(0)
    cfg = tiny_model_cfg(dropout=0.0, context_length=16)
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    y = torch.randint(0, cfg.vocab_size, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(40):
        loss = cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0, loss.item()


def test_gpt2_small_parameter_count():
    cfg = presets.load(preset_name="gpt2-small").model
    assert n_params(cfg) == 163_009_536
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.head.bias is None
    assert model.blocks[0].attn.qkv.bias is None


def test_qkv_bias_adds_three_d_per_layer():
    for cfg in (tiny_model_cfg(), presets.load(preset_name="gpt2-small").model):
        with_bias = n_params(cfg.model_copy(update={"qkv_bias": True}))
        assert with_bias - n_params(cfg) == 3 * cfg.n_embd * cfg.n_layer
    assert GPT(tiny_model_cfg(qkv_bias=True)).blocks[1].attn.qkv.bias.shape == (3 * 64,)


def test_tying_shares_one_tensor_and_removes_vocab_times_d():
    cfg = tiny_model_cfg(tie_weights=True)
    model = GPT(cfg)
    assert model.head.weight is model.tok_emb.weight
    assert n_params(tiny_model_cfg()) - model.num_params() == cfg.vocab_size * cfg.n_embd
    small = presets.load(preset_name="gpt2-small", overrides={"model.tie_weights": True}).model
    assert n_params(small) == 163_009_536 - 50257 * 768
    # The tie survives training: one gradient, one update.
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cross_entropy(model(x), x).backward()
    opt.step()
    assert torch.equal(model.head.weight, model.tok_emb.weight)


def test_untied_head_is_a_separate_tensor():
    model = GPT(tiny_model_cfg())
    assert model.head.weight is not model.tok_emb.weight
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()


def _two_train_forwards(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        return model(x), model(x)


def test_dropout_zero_is_deterministic_in_train_mode():
    a, b = _two_train_forwards(small_model_cfg(dropout=0.0))
    assert torch.equal(a, b)


def test_dropout_is_random_in_train_mode_and_off_in_eval_mode():
    cfg = small_model_cfg(dropout=0.1)
    a, b = _two_train_forwards(cfg)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("site", ["embed", "attn", "resid"])
def test_one_dropout_site_alone_makes_training_random(site):
    """dropout=0 everywhere except one site: that site's override alone makes two forwards differ."""
    cfg = small_model_cfg(dropout=0.0, **{f"dropout_{site}": 0.2})
    a, b = _two_train_forwards(cfg)
    assert not torch.equal(a, b)


def test_per_site_overrides_set_each_site():
    cfg = small_model_cfg(dropout=0.1, dropout_embed=0.0, dropout_attn=0.3)
    model = GPT(cfg)
    assert model.emb_dropout.p == 0.0
    for block in model.blocks:
        assert block.attn.attn_dropout == 0.3
        assert block.resid_dropout.p == 0.1  # no override: the common rate
    plain = GPT(small_model_cfg(dropout=0.1))
    assert plain.emb_dropout.p == plain.blocks[0].attn.attn_dropout == plain.blocks[0].resid_dropout.p == 0.1


def test_switching_off_the_other_sites_leaves_training_deterministic():
    """dropout=0.1 but every site overridden to 0: no randomness left."""
    cfg = small_model_cfg(dropout=0.1, dropout_embed=0.0, dropout_attn=0.0, dropout_resid=0.0)
    a, b = _two_train_forwards(cfg)
    assert torch.equal(a, b)


@pytest.mark.parametrize("amp, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_gives_the_promised_logit_dtype(amp, dtype):
    torch.manual_seed(0)
    cfg = small_model_cfg()
    model = GPT(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with autocast(CPU, amp):
        logits = model(x)
    assert logits.dtype == dtype
    loss = cross_entropy(logits, x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.head.weight.grad.dtype == torch.float32  # master weights stay fp32


def test_sequence_longer_than_context_is_refused():
    cfg = small_model_cfg()
    with pytest.raises(ValueError, match="context_length=16"):
        GPT(cfg)(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    cfg = tiny_model_cfg(init="gpt2")
    model = GPT(cfg)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(resid_std, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(resid_std, rel=0.1)
    assert torch.count_nonzero(model.blocks[0].mlp.fc.bias) == 0


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("init", ["pytorch", "gpt2"])
def test_padded_vocabulary_is_the_unpadded_model(tie, init):
    """model.pad_vocab changes the matmul's shape only: the same seed gives the same weights, logits, losses,
    gradient norms and parameter count as the unpadded model, step after step, and the padding stays zero."""
    from trainer.config import OptimConfig
    from trainer.optim import build_optimizer

    runs = []
    for pad in (1, 64):
        cfg = small_model_cfg(vocab_size=250, tie_weights=tie, init=init, dropout=0.1, pad_vocab=pad)
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = build_optimizer(model, OptimConfig(lr=3e-3, weight_decay=0.1), CPU)
        data = torch.Generator().manual_seed(1)
        losses, norms = [], []
        for _ in range(6):
            x = torch.randint(0, cfg.vocab_size, (4, 16), generator=data)
            loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
            loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        assert model(x).shape[-1] == 250  # padding never reaches a caller
        runs.append((losses, norms, model.num_params(), model.flops_per_token(), model))
    (l1, n1, p1, f1, plain), (l64, n64, p64, f64, padded) = runs
    assert padded.head.weight.shape[0] == padded.tok_emb.weight.shape[0] == 256
    assert padded.tok_emb.weight[250:].abs().sum() == 0 and padded.head.weight[250:].abs().sum() == 0
    assert (padded.head.weight is padded.tok_emb.weight) == tie
    assert (p1, f1) == (p64, f64)
    torch.testing.assert_close(l64, l1, rtol=1e-6, atol=0)
    torch.testing.assert_close(n64, n1, rtol=1e-6, atol=0)
    torch.testing.assert_close(padded.head.weight[:250], plain.head.weight, rtol=1e-5, atol=1e-6)
    assert l64[0] == l1[0]  # before any update: the very same function


def test_padded_vocabulary_keeps_run_ids():
    """pad_vocab came after run ids were handed out: its neutral value leaves every id as it was."""
    from orchestrator.runspec import run_id
    from tests.conftest import before_later_keys
    from trainer.identity import LATER_KEYS, same_run

    cfg = presets.load(preset_name="tiny")
    old = before_later_keys(cfg)  # a config.json or checkpoint written before the key (and later ones) existed
    assert "model.pad_vocab" in LATER_KEYS
    assert same_run(old, cfg)
    assert run_id(cfg, 0) == _old_run_id(old, 0)
    padded = presets.load(preset_name="tiny", overrides={"model.pad_vocab": 64})
    assert run_id(padded, 0) != run_id(cfg, 0) and not same_run(old, padded)


def _old_run_id(config_dict: dict, repeat: int) -> str:
    """run_id as it was computed before any LATER_KEYS existed."""
    import hashlib
    import json

    canonical = json.dumps({"config": config_dict, "repeat": repeat}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]

"""`orch export --format hf`: a run's checkpoint as a Hugging Face GPT2LMHeadModel folder that the real
`transformers` loads and that gives orch's logits, tied and untied, with and without QKV bias, padded
vocabulary or not; and every refusal, as one line naming what does not map.

The tests marked `hf` load the export with transformers (`pip install -e '.[hf]'`; its import alone takes
several seconds, so they run apart: `pytest -m hf`, as .ci/run does). The others need no transformers.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from conftest import ok, run_trainer
from orchestrator import api
from orchestrator.api.exporting import checkpoint_of
from orchestrator.cli import app
from trainer import checkpoint
from trainer.config import ModelConfig, TrainConfig
from trainer.export import MAPPED, ExportError, check_mappable, hf_state_dict, refusals
from trainer.model import GPT
from trainer.presets import load
from trainer.tokenizer import gpt2

INSTALL = "pip install -e '.[hf]'"


def transformers_or_skip():
    try:
        import transformers
    except ImportError:
        pytest.skip(f"transformers is not installed: {INSTALL}")
    return transformers


def make_checkpoint(run_dir: Path, step: int = 3, **model) -> tuple[TrainConfig, GPT]:
    """A run directory with one checkpoint of the tiny preset's model (with `model` overrides), its weights,
    LayerNorms and biases all moved off their initial values so that a misplaced tensor cannot hide."""
    cfg = load(preset_name="tiny", overrides={f"model.{k}": v for k, v in model.items()})
    torch.manual_seed(step)
    net = GPT(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.save(run_dir, step, {"model": net.state_dict(), "config": cfg.model_dump(mode="json")}, keep=2)
    return cfg, net.eval()


def invoke(*args: str):
    return CliRunner().invoke(app, ["export", *args])


def one_line_error(out, fragment: str) -> str:
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.output, out.output
    assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# The mapping and the refusals (no transformers needed)


def test_every_mapped_key_is_a_model_key():
    assert set(MAPPED) <= set(ModelConfig.model_fields)


@pytest.mark.parametrize("tie, qkv_bias, pad", [(False, False, 1), (True, True, 64)])
def test_every_weight_finds_its_place_transposed_where_gpt2_uses_conv1d(tie, qkv_bias, pad):
    cfg = ModelConfig(vocab_size=100, pad_vocab=pad, context_length=8, n_embd=16, n_layer=2, n_head=2)
    cfg = cfg.model_copy(update={"tie_weights": tie, "qkv_bias": qkv_bias})
    net = GPT(cfg)
    out = hf_state_dict(cfg, net.state_dict())
    assert len(out) == 4 + 12 * cfg.n_layer + 1
    assert out["transformer.wte.weight"].shape == (100, 16)  # the padding rows are gone
    assert torch.equal(out["lm_head.weight"], net.head.weight[:100])
    attn = net.blocks[1].attn
    assert torch.equal(out["transformer.h.1.attn.c_attn.weight"], attn.qkv.weight.t())  # (in, out)
    assert torch.equal(out["transformer.h.1.mlp.c_fc.weight"], net.blocks[1].mlp.fc.weight.t())
    bias = out["transformer.h.1.attn.c_attn.bias"]
    assert torch.equal(bias, attn.qkv.bias if qkv_bias else torch.zeros(48))


def test_a_weight_without_a_place_is_refused():
    cfg = ModelConfig(vocab_size=100, context_length=8, n_embd=16, n_layer=1, n_head=2)
    weights = {**GPT(cfg).state_dict(), "blocks.0.attn.q_norm.weight": torch.ones(8)}
    with pytest.raises(ExportError, match=r"blocks\.0\.attn\.q_norm\.weight have no place in GPT2LMHeadModel"):
        hf_state_dict(cfg, weights)


class FutureModelConfig(ModelConfig):
    """ModelConfig as it may grow: switches the export has never heard of."""

    experts: int = 1
    router: typing.Literal["top-k", "expert-choice"] = "top-k"
    attention_sink: float | None = None


def test_a_key_the_export_does_not_know_is_refused_unless_at_its_default():
    check_mappable(FutureModelConfig())  # at the defaults: GPT-2 itself
    check_mappable(FutureModelConfig(tie_weights=True, qkv_bias=True, dropout=0.0, pad_vocab=64))  # mapped keys
    with pytest.raises(ExportError) as exc:
        check_mappable(FutureModelConfig(experts=6, attention_sink=1.0))
    message = str(exc.value)
    assert "\n" not in message
    assert "model.experts=6, model.attention_sink=1.0 have no equivalent" in message
    assert "model.experts=1, model.attention_sink=None" in message  # what it takes
    assert refusals(FutureModelConfig(router="expert-choice")) == [("model.router", "expert-choice", "top-k")]


def off_default(name: str, others: dict | None = None, cls: type[BaseModel] = ModelConfig):
    """A valid value other than the default for a key of `cls` (with `others` set), or None; for a section
    (model.moe), {key: value} of its first key that has one."""
    info = cls.model_fields[name]
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        for sub in type(default).model_fields:
            value = off_default(sub, cls=type(default))
            if value is not None:
                return {sub: value}
        return None

    def choices(ann):
        if typing.get_origin(ann) is typing.Literal:
            return list(typing.get_args(ann))
        return [c for arg in typing.get_args(ann) for c in choices(arg)]

    candidates = [*choices(info.annotation)]
    if isinstance(default, bool):
        candidates.append(not default)
    elif isinstance(default, (int, float)):
        candidates += [default * 2 + 1, default / 2]
    candidates += [True, 30.0, 2, 0.5, 1e-6]
    for value in candidates:
        try:
            value = getattr(cls(**(others or {}), **{name: value}), name)  # as validated (True -> 1.0)
        except (ValidationError, TypeError, ValueError):
            continue
        if value != default:
            return value
    return None


UNMAPPED = [name for name in ModelConfig.model_fields if name not in MAPPED]


@pytest.mark.parametrize("name", UNMAPPED or [pytest.param(None, marks=pytest.mark.skip("every model key maps"))])
def test_every_model_switch_gpt2_lacks_is_refused_by_name(name, tmp_path):
    """The model's own switches (rope, RMSNorm, SwiGLU, …, whichever exist) at a non-default value: refused
    through the CLI, in one line that names the key and its value, before anything is written."""
    others = {}
    value = off_default(name)
    for other in UNMAPPED:  # a key that applies only with another (model.rope_base with model.position=rope)
        if value is None and other != name and off_default(other) is not None:
            others = {other: off_default(other)}
            value = off_default(name, others)
    if value is None:
        pytest.skip(f"no valid non-default value found for model.{name}")
    try:
        make_checkpoint(tmp_path / "run", **others, **{name: value})
    except Exception as exc:  # a switch that needs others with it
        pytest.skip(f"model.{name}={value!r} alone does not build: {exc}")
    [(key, shown)] = value.items() if isinstance(value, dict) else [(name, value)]  # a section: its key
    key = key if key == name else f"{name}.{key}"
    line = one_line_error(invoke(str(tmp_path / "run"), str(tmp_path / "out")), f"model.{key}={shown!r}")
    assert "cannot export as GPT-2" in line
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_bad_inputs_are_one_line_each(tmp_path):
    make_checkpoint(tmp_path / "run")
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    one_line_error(invoke(run, out, "--format", "onnx"), "--format must be hf")
    one_line_error(invoke(str(tmp_path / "empty-run"), out), "has no checkpoint")
    one_line_error(invoke(str(tmp_path / "junk.pt"), out), "is not a readable trainer checkpoint")
    one_line_error(invoke("./no/such/run", out), "is neither a run id")
    one_line_error(invoke(run, str(tmp_path / "full")), "exists and is not empty: choose a new folder, or pass --force")
    one_line_error(invoke(run, str(tmp_path / "no" / "parent")), "does not exist: create it first")
    db = f"sqlite:///{tmp_path / 'none.db'}"
    one_line_error(invoke("abc123", out, "--db", db), "no database")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-run", "full", "junk.pt", "run"]


def test_without_transformers_the_fix_is_named(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "run")
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # `import transformers` fails
    one_line_error(invoke(str(tmp_path / "run"), str(tmp_path / "out")), INSTALL)
    assert not (tmp_path / "out").exists()


def test_a_run_id_resolves_through_the_database_to_its_newest_checkpoint(tmp_path, monkeypatch):
    exp = tmp_path / "one.py"
    exp.write_text(
        "from orchestrator.specs import Experiment\n"
        "experiment = Experiment(name='one', preset='tiny', base={'run.steps': 4}, interventions=[], seeds=1)\n"
    )
    db = f"sqlite:///{tmp_path / 'results.db'}"
    (run,) = api.submit(exp, check_data_here=False, db=db).runs
    monkeypatch.chdir(tmp_path)  # a run not yet launched has its directory at runs/<id>, as `orch logs` reads it
    with pytest.raises(ValueError, match=f"run {run.id} \\(queued\\) has no run directory at runs/{run.id} here"):
        checkpoint_of(run.id[:6], db=db)
    make_checkpoint(tmp_path / "runs" / run.id, step=4)
    make_checkpoint(tmp_path / "runs" / run.id, step=8)
    newest = tmp_path / "runs" / run.id / "checkpoints" / "step_00000008.pt"
    assert checkpoint_of(run.id[:6], db=db).resolve() == newest
    assert checkpoint_of(f"runs/{run.id}", db=db).resolve() == newest  # the run directory
    assert checkpoint_of(f"runs/{run.id}/checkpoints", db=db).resolve() == newest  # its checkpoints folder
    older = newest.with_name("step_00000004.pt")
    assert checkpoint_of(str(older), db=db) == older  # a file is that file


# ---------------------------------------------------------------------------------------------------------
# Loaded by the real transformers


def orch_logits(net: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(idx)


def hf_logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=idx).logits


VARIANTS = {
    # (model overrides): the blog baseline's shape (untied, no QKV bias), then every mapped key off its default
    "baseline": {},
    "qkv-bias-padded": {"qkv_bias": True, "pad_vocab": 64, "layer_norm_eps": 1e-6},
    "tied-padded-no-biases": {"tie_weights": True, "pad_vocab": 64, "bias": False, "dropout_resid": 0.2},
    "tied-qkv-bias-small-vocab": {"tie_weights": True, "qkv_bias": True, "vocab_size": 1000, "dropout_attn": 0.0},
}


@pytest.mark.hf
@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_loads_the_export_and_gives_orchs_logits(name, tmp_path):
    transformers_or_skip()
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    cfg, net = make_checkpoint(tmp_path / "run", **VARIANTS[name])
    m = cfg.model
    done = api.export(str(tmp_path / "run"), tmp_path / "out")
    assert done.step == 3 and done.max_logit_diff < 1e-5

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(model, GPT2LMHeadModel)
    c = model.config
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (
        m.vocab_size,
        m.context_length,
        m.n_embd,
        m.n_layer,
        m.n_head,
    )
    assert (c.embd_pdrop, c.attn_pdrop, c.resid_pdrop) == tuple(m.site_dropout(s) for s in ("embed", "attn", "resid"))
    assert c.layer_norm_epsilon == m.layer_norm_eps and c.tie_word_embeddings == m.tie_weights
    d, L = m.n_embd, m.n_layer
    zeros = (0 if m.qkv_bias else 3 * d * L) + (0 if m.bias else 8 * d * L + d)  # biases GPT-2 has, orch not
    assert model.num_parameters() == net.num_params() + zeros == done.params

    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        stored = set(f.keys())
        c_attn_bias = f.get_tensor("transformer.h.0.attn.c_attn.bias")
    assert ("lm_head.weight" in stored) == (not m.tie_weights)  # a tied head is the embedding, stored once
    same = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert same == m.tie_weights
    assert c_attn_bias.abs().sum() > 0 if m.qkv_bias else torch.equal(c_attn_bias, torch.zeros(3 * m.n_embd))

    gen = torch.Generator().manual_seed(1)
    for shape in [(3, m.context_length), (1, 5), (2, 1)]:
        idx = torch.randint(m.vocab_size, shape, generator=gen)
        want, got = orch_logits(net, idx), hf_logits(model, idx)
        assert got.shape == (*shape, m.vocab_size)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    assert (tokenizer_files <= set(done.files)) == (m.vocab_size >= 50257)
    if m.vocab_size < 50257:
        assert any("no tokenizer files" in n for n in done.notes)


@pytest.mark.hf
def test_a_trained_run_exports_through_the_cli_with_its_tokenizer(data_dir, tmp_path):
    """A real run (the trainer in a subprocess, tied and padded like nanoGPT), exported by `orch export`; the
    export's tokenizer encodes text as the trainer's does, and its logits on that text are orch's."""
    transformers_or_skip()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    ok(run_trainer(run, data_dir, {"run.steps": 4, "model.tie_weights": True, "model.pad_vocab": 64}))
    out = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "hf"), "--format", "hf"])
    assert out.exit_code == 0, out.output
    assert "(step 4)" in out.output and "model.pad_vocab=64: the 47 padding rows are left out" in out.output

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values())  # ~140K tokens of English and code
    assert tokenizer(text)["input_ids"] == gpt2().encode_ordinary(text)
    assert tokenizer.eos_token_id == 50256 and tokenizer.decode(gpt2().encode_ordinary(text[:2000])) == text[:2000]

    state = checkpoint.load(checkpoint.latest(run))
    cfg = TrainConfig.model_validate(state["config"])
    net = GPT(cfg.model)
    net.load_state_dict(state["model"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    idx = torch.tensor([tokenizer("Every effort moves you forward, one step at a time.")["input_ids"]])
    torch.testing.assert_close(hf_logits(model, idx), orch_logits(net, idx), atol=1e-5, rtol=1e-5)
    # --force replaces an export; without it the folder is kept (see test_bad_inputs_are_one_line_each).
    again = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "hf"), "--force"])
    assert again.exit_code == 0, again.output


@pytest.mark.hf
def test_an_export_that_does_not_compute_orchs_logits_is_never_left_behind(tmp_path, monkeypatch):
    """The export checks itself: a near miss of a mapping (exact GELU in place of GPT-2's tanh approximation,
    logits off by ~1e-3) is refused, and neither the folder nor its temporary is left."""
    transformers_or_skip()
    import trainer.export

    make_checkpoint(tmp_path / "run", vocab_size=1000)
    mapped = trainer.export.hf_config
    monkeypatch.setattr(trainer.export, "hf_config", lambda cfg: {**mapped(cfg), "activation_function": "gelu"})
    with pytest.raises(RuntimeError, match="transformers' logits differ from orch's"):
        api.export(str(tmp_path / "run"), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

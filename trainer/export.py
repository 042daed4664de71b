"""Export a checkpoint as a Hugging Face `transformers` GPT-2 (GPT2LMHeadModel) folder.

    orch export RUN --format hf OUT/     then     AutoModelForCausalLM.from_pretrained("OUT/")

orch's GPT (trainer/model.py) is GPT-2's function with other parameter names, so the dense configurations map
one to one (GPT-2's Conv1D stores a weight as (in, out), the transpose of nn.Linear's (out, in)):

    orch                                  transformers (GPT2LMHeadModel)
    tok_emb.weight[:vocab_size]           transformer.wte.weight          model.pad_vocab's rows dropped
    pos_emb.weight                        transformer.wpe.weight          n_positions = model.context_length
    blocks.i.ln1 / ln2 (weight, bias)     transformer.h.i.ln_1 / ln_2     layer_norm_epsilon = model.layer_norm_eps
    blocks.i.attn.qkv.weight              transformer.h.i.attn.c_attn.weight, transposed (q, k, v in that order)
    blocks.i.attn.qkv.bias                transformer.h.i.attn.c_attn.bias
    blocks.i.attn.proj (weight, bias)     transformer.h.i.attn.c_proj     weight transposed
    blocks.i.mlp.fc / proj (weight, bias) transformer.h.i.mlp.c_fc / c_proj, weights transposed; n_inner = 4·n_embd
    ln_f (weight, bias)                   transformer.ln_f
    head.weight[:vocab_size]              lm_head.weight                  tie_word_embeddings = model.tie_weights
    model.dropout(_embed/_attn/_resid)    embd_pdrop / attn_pdrop / resid_pdrop

Both use tanh-GELU ("gelu_new"), pre-LayerNorm blocks, attention scaled by 1/sqrt(head_dim) and a bias-free
head. GPT-2 has a bias in every other layer: one that orch leaves out (model.qkv_bias=false, the series'
baseline; model.bias=false) is written as zeros, which is the same function. `model.init` only decides the
initial draw. Every other model key (RoPE, RMSNorm, SwiGLU, QK-norm, logit soft-capping, ...) must be at its
default, read from ModelConfig so that a switch added later is refused until it is mapped here, and every
weight of the checkpoint must find a place; otherwise the export is refused with one line naming what does not
map.

The folder is written under a temporary name, loaded back with `AutoModelForCausalLM`, and its logits are
compared with orch's model before it is renamed into place: an export that does not compute what the run
trained is never left behind. Tokenizer files come from the bundled GPT-2 BPE (trainer/tokenizer.py), so
`AutoTokenizer.from_pretrained(OUT)` works offline too. Needs the `hf` extra: pip install -e '.[hf]'.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from trainer import checkpoint
from trainer.config import ModelConfig, TrainConfig
from trainer.rundir import CHECKPOINTS

FORMATS = ("hf",)
INSTALL = "pip install -e '.[hf]'"

# Model keys the export maps (or that do not change the function), with where each goes.
MAPPED: dict[str, str] = {
    "vocab_size": "vocab_size",
    "pad_vocab": "(padding rows dropped)",
    "context_length": "n_positions",
    "n_embd": "n_embd",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "dropout": "embd_pdrop / attn_pdrop / resid_pdrop",
    "dropout_embed": "embd_pdrop",
    "dropout_attn": "attn_pdrop",
    "dropout_resid": "resid_pdrop",
    "qkv_bias": "c_attn.bias (zeros when false)",
    "bias": "every other bias (zeros when false)",
    "tie_weights": "tie_word_embeddings",
    "init": "(initialisation only)",
    "layer_norm_eps": "layer_norm_epsilon",
}
# The export's logits may differ from orch's by float rounding only (other kernels, other summation orders):
# at most this fraction of the largest |logit| (at least 1). Measured on CPU in fp32: 5e-7 for gpt2-small,
# 2e-7 for the tiny preset; exact GELU in place of the tanh approximation, a near miss, is off by 3e-5.
RTOL = 1e-5


class ExportError(ValueError):
    """A run or checkpoint that cannot be exported, with the reason and the fix in one line."""


@dataclass
class Exported:
    out: Path
    checkpoint: Path
    step: int
    params: int  # distinct parameters of the exported model (a tied matrix once)
    files: list[str]
    max_logit_diff: float  # largest |orch − transformers| logit in the self-check
    notes: list[str] = field(default_factory=list)  # what a user of the export should know


# ---------------------------------------------------------------------------------------------------------
# Which checkpoint


def checkpoint_in(path: str | os.PathLike) -> Path:
    """The checkpoint a path names: a checkpoint file itself, or the newest complete one of a run directory
    (or of its checkpoints/ folder)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"{path} does not exist: give a run directory, a checkpoint file or a run id")
    run_dir = path.parent if path.name == CHECKPOINTS and not (path / CHECKPOINTS).is_dir() else path
    latest = checkpoint.latest(run_dir)
    if latest is None:
        raise ExportError(
            f"{run_dir} has no checkpoint ({CHECKPOINTS}/step_*.pt): export a run once it has written one "
            "(every run.checkpoint_interval steps, and at its end)"
        )
    return latest


def load_checkpoint(path: Path) -> tuple[TrainConfig, dict[str, torch.Tensor], int]:
    """The config, model weights and step of a trainer checkpoint."""
    try:
        return checkpoint.read_model(path)
    except checkpoint.CheckpointError as exc:
        raise ExportError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# The mapping


def refusals(cfg: BaseModel, prefix: str = "model") -> list[tuple[str, Any, Any]]:
    """(key, value, default) of every model key that GPT-2 has no equivalent of: a key outside MAPPED that is
    not at its default. Defaults come from the config class, so a switch added later is refused until mapped;
    a section (model.moe) is looked into, so that the message names its keys (model.moe.experts=6)."""
    out = []
    for name, info in type(cfg).model_fields.items():
        value, default = getattr(cfg, name), info.get_default(call_default_factory=True)
        if prefix == "model" and name in MAPPED:
            continue
        if isinstance(value, BaseModel):
            out += refusals(value, f"{prefix}.{name}")
        elif value != default:
            out.append((f"{prefix}.{name}", value, default))
    return out


def check_mappable(cfg: ModelConfig) -> None:
    bad = refusals(cfg)
    if bad:
        raise ExportError(
            f"cannot export as GPT-2 (GPT2LMHeadModel): {', '.join(f'{k}={v!r}' for k, v, _ in bad)} "
            f"{'has' if len(bad) == 1 else 'have'} no equivalent there; "
            f"--format hf exports only runs with {', '.join(f'{k}={d!r}' for k, _, d in bad)}"
        )


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """GPT2Config's arguments for `cfg`."""
    eot = 50256  # <|endoftext|> (trainer/tokenizer.py), only where the vocabulary has it
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.context_length,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu_new",  # GELU, tanh approximation, as orch's MLP
        embd_pdrop=cfg.site_dropout("embed"),
        attn_pdrop=cfg.site_dropout("attn"),
        resid_pdrop=cfg.site_dropout("resid"),
        layer_norm_epsilon=cfg.layer_norm_eps,
        tie_word_embeddings=cfg.tie_weights,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        bos_token_id=eot if cfg.vocab_size > eot else None,
        eos_token_id=eot if cfg.vocab_size > eot else None,
    )


def hf_state_dict(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict (float32) from orch's; every orch weight must find a place."""
    left = dict(weights)
    V = cfg.vocab_size

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ExportError(f"the checkpoint has no weight {name!r}: it is not a model of this orch's trainer")
        return left.pop(name).detach().to(torch.float32)

    def bias(name: str, present: bool, size: int) -> torch.Tensor:
        """GPT-2 has every bias; one orch leaves out (model.bias, model.qkv_bias) is zero there."""
        return take(name) if present else torch.zeros(size)

    d, b = cfg.n_embd, cfg.bias
    out = {"transformer.wte.weight": take("tok_emb.weight")[:V], "transformer.wpe.weight": take("pos_emb.weight")}
    for i in range(cfg.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for a, h in (("ln1", "ln_1"), ("ln2", "ln_2")):
            out[f"{dst}{h}.weight"], out[f"{dst}{h}.bias"] = take(f"{src}{a}.weight"), bias(f"{src}{a}.bias", b, d)
        # nn.Linear holds (out, in), Conv1D (in, out); q, k and v are split from the output in the same order.
        out[f"{dst}attn.c_attn.weight"] = take(f"{src}attn.qkv.weight").t()
        out[f"{dst}attn.c_attn.bias"] = bias(f"{src}attn.qkv.bias", cfg.qkv_bias, 3 * d)
        for a, h, width in (
            ("attn.proj", "attn.c_proj", d),
            ("mlp.fc", "mlp.c_fc", 4 * d),
            ("mlp.proj", "mlp.c_proj", d),
        ):
            out[f"{dst}{h}.weight"], out[f"{dst}{h}.bias"] = (
                take(f"{src}{a}.weight").t(),
                bias(f"{src}{a}.bias", b, width),
            )
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = take("ln_f.weight"), bias("ln_f.bias", b, d)
    head = take("head.weight")[:V]  # a tied head is the embedding again (the state dict names it twice)
    out["lm_head.weight"] = out["transformer.wte.weight"] if cfg.tie_weights else head
    if left:
        raise ExportError(
            f"cannot export as GPT-2: the checkpoint's weights {', '.join(sorted(left)[:4])}"
            f"{' …' if len(left) > 4 else ''} have no place in GPT2LMHeadModel"
        )
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# The tokenizer


@functools.cache
def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json and merges.txt, rebuilt from the bundled tiktoken ranks.

    A token of rank r was made by the merge that byte-pair encoding with the ranks below r performs last:
    encoding its bytes with those ranks leaves exactly two parts, and that pair is merge number r − 256.
    Strings are bytes through GPT-2's byte-to-unicode table (the one transformers and tokenizers use)."""
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from trainer.tokenizer import EOT, VOCAB_FILE, VOCAB_SHA256

    ranks = load_tiktoken_bpe(str(VOCAB_FILE), expected_hash=VOCAB_SHA256)
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = [token[i : i + 1] for i in range(len(token))]
            while len(parts) > 2:
                best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
                if ranks.get(parts[best] + parts[best + 1], rank) >= rank:
                    raise RuntimeError(f"{VOCAB_FILE}: token {token!r} (rank {rank}) is no merge of earlier ones")
                parts[best : best + 2] = [parts[best] + parts[best + 1]]
            merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT
    return vocab, merges


def save_tokenizer(out: Path, cfg: ModelConfig) -> str | None:
    """Write the GPT-2 tokenizer's files into `out`; the reason where it does not fit the model."""
    from transformers import GPT2Tokenizer

    from trainer.tokenizer import VOCAB_SIZE

    if cfg.vocab_size < VOCAB_SIZE:
        return (
            f"no tokenizer files: model.vocab_size={cfg.vocab_size} is smaller than GPT-2's {VOCAB_SIZE} tokens, "
            "so the data was not tokenised with it"
        )
    vocab, merges = gpt2_vocab_and_merges()
    GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=cfg.context_length).save_pretrained(out)
    return None


# ---------------------------------------------------------------------------------------------------------
# The export


def export(source: str | os.PathLike, out: str | os.PathLike, *, format: str = "hf", force: bool = False) -> Exported:
    """Export a checkpoint (a file, or a run directory's newest) to the folder `out`."""
    if format not in FORMATS:
        raise ExportError(f"--format must be {' or '.join(FORMATS)} (Hugging Face transformers), not {format!r}")
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise ExportError(f"{out} exists and is not empty: choose a new folder, or pass --force to replace it")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent} does not exist: create it first, or choose another output folder")
    path = checkpoint_in(source)
    cfg, weights, step = load_checkpoint(path)
    check_mappable(cfg.model)
    try:
        import safetensors  # noqa: F401
        from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    except ImportError as exc:
        raise ExportError(f"--format hf needs transformers and safetensors ({exc}): {INSTALL}") from None

    hf_weights = hf_state_dict(cfg.model, weights)
    notes = []
    if not cfg.model.bias:
        notes.append(
            "model.bias=false: GPT-2's biases (LayerNorms, projections) are written as zeros (the same function)"
        )
    elif not cfg.model.qkv_bias:
        notes.append("model.qkv_bias=false: the attention's c_attn.bias is written as zeros (the same function)")
    if cfg.model.padded_vocab_size > cfg.model.vocab_size:
        notes.append(
            f"model.pad_vocab={cfg.model.pad_vocab}: the {cfg.model.padded_vocab_size - cfg.model.vocab_size} "
            f"padding rows are left out; the export has the {cfg.model.vocab_size} real ones"
        )
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        with quiet_transformers():
            model = GPT2LMHeadModel(GPT2Config(**hf_config(cfg.model)))
            model.load_state_dict(hf_weights, strict=True)
            model.save_pretrained(tmp)
            del model
            reason = save_tokenizer(tmp, cfg.model)
            if reason:
                notes.append(reason)
            loaded = AutoModelForCausalLM.from_pretrained(tmp)
        diff = logit_difference(cfg.model, weights, loaded)
        params = loaded.num_parameters()
        # For the whole team to read, as everything in a run directory (mkdtemp makes 0700, some files 0600).
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(out, path, step, params, sorted(p.name for p in out.iterdir()), diff, notes)


@contextlib.contextmanager
def quiet_transformers():
    """No progress bars or advice from transformers while exporting; what the caller had, afterwards."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def probe_tokens(cfg: ModelConfig) -> torch.Tensor:
    """(2, T) token ids: a ramp over the vocabulary and a seeded draw, at the full context length (≤ 64)."""
    T = min(cfg.context_length, 64)
    ramp = torch.arange(T) * 7919 % cfg.vocab_size
    drawn = torch.randint(cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(0))
    return torch.stack([ramp, drawn])


@torch.no_grad()
def logit_difference(cfg: ModelConfig, weights: dict[str, torch.Tensor], hf_model: torch.nn.Module) -> float:
    """Largest |logit| difference between orch's model and the export on probe_tokens; refuses a mismatch."""
    from trainer.model import GPT

    ours = GPT(cfg)
    ours.load_state_dict(weights)
    ours.eval().float()
    hf_model.eval().float()
    idx = probe_tokens(cfg)
    want = ours(idx)
    got = hf_model(input_ids=idx).logits
    if got.shape != want.shape:
        raise RuntimeError(f"export check: transformers' logits have shape {tuple(got.shape)}, orch's {want.shape}")
    diff = (got - want).abs().max().item()
    if not diff <= RTOL * max(1.0, want.abs().max().item()):
        raise RuntimeError(f"export check: transformers' logits differ from orch's by up to {diff:.3g}")
    return diff

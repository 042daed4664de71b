"""Completions of prompts by a trained model: the smoke test the blog series judged each model by.

    runs/<id>/samples.json    written by rank 0 at the end of a successful run (trainer/train.py), from the
                              `sample` config section: per prompt one greedy completion and `count` sampled ones
    orch sample RUN --prompt TEXT [--temperature T --top-k K --seed S --count N]   any checkpoint, any prompt

Generation is the plain autoregressive loop of Raschka's `generate` ("Build a Large Language Model (from
Scratch)", ch. 5.3): the model's own forward on the last model.context_length tokens, the last position's
logits, then the argmax (greedy, temperature 0) or a draw from softmax(logits / temperature), restricted to the
k likeliest tokens with top-k. No KV cache: every step runs the full forward, so whatever the model does (RoPE,
logit soft-capping, a padded vocabulary whose extra logits the forward already drops, a switch added later) is
exactly what generates. A token the GPT-2 tokenizer cannot decode (model.vocab_size above 50,257 without
model.pad_vocab) is never chosen, and a completion stops at <|endoftext|>, the document separator.

Exactness: the model runs in eval mode (no dropout) under torch.no_grad with the evaluation's precision
(eval.amp; fp32 with TF32 off), and each sampled completion draws from its own torch.Generator seeded with
seed + i for the i-th completion of a prompt. Nothing touches the global RNG, so samples at the end of a run
change no training number and no checkpointed RNG state (tests/test_sample.py compares runs with and without
samples), and a completion is repeated exactly by `orch sample --seed` on the same device and precision.

This module is imported by the orchestrator to read samples.json (records and Markdown only), which must not
cost an `import torch`: torch and the model are imported inside the functions that generate.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from trainer.rundir import SAMPLES, write_json

if TYPE_CHECKING:
    import torch

    from trainer.config import SampleConfig, TrainConfig
    from trainer.model import GPT

GREEDY, SAMPLED = "greedy", "sampled"


class SampleError(ValueError):
    """A prompt or setting that cannot be sampled, with the fix in one line."""


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt: str
    kind: Literal["greedy", "sampled"]
    temperature: float  # 0 for greedy
    top_k: int | None  # None: the whole vocabulary
    seed: int | None  # the completion's generator seed (`orch sample --seed` repeats it); None for greedy
    text: str  # the completion, without the prompt
    tokens: list[int]  # the generated token ids (GPT-2 BPE), without the prompt's and without <|endoftext|>
    ended: Literal["length", "eot"]  # all the tokens asked for, or <|endoftext|> first


@dataclass
class Samples:
    """samples.json: the completions of one model (checkpoint) and how they were made."""

    step: int  # the optimizer step of the weights
    device: str
    amp: str  # the autocast precision of the forward passes (eval.amp)
    seconds: float  # wall time of the generation
    samples: list[Sample] = field(default_factory=list)
    note: str | None = None  # why there are none, where there are none

    def greedy(self, prompt: str | None = None) -> Sample | None:
        """The greedy completion of `prompt` (default: the first prompt)."""
        return next((s for s in self.samples if s.kind == GREEDY and prompt in (None, s.prompt)), None)


# ---------------------------------------------------------------------------------------------------------
# Generation


def encode(prompt: str, vocab_size: int) -> list[int]:
    """The prompt's GPT-2 token ids, checked to fit the model."""
    from trainer.tokenizer import gpt2

    if not prompt:
        raise SampleError("the prompt is empty: give some text to complete, e.g. --prompt 'Every effort moves you'")
    ids = gpt2().encode(prompt, disallowed_special=())
    if max(ids) >= vocab_size:
        raise SampleError(
            f"model.vocab_size is {vocab_size}, but the prompt's GPT-2 token ids reach {max(ids)}: this model was "
            "not trained on GPT-2 tokens, so it cannot complete text"
        )
    return ids


def generate(
    model: GPT,
    prompt_ids: list[int],
    tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    amp: str = "fp32",
) -> tuple[list[int], str]:
    """Up to `tokens` new token ids after `prompt_ids`, and why it ended ("length" or "eot"). temperature 0:
    greedy (the first of equal maxima); above 0: drawn with `generator` from softmax(logits / temperature) over
    the top_k likeliest tokens (exactly k, ties in torch.topk's order), or over all with top_k None."""
    import torch

    from trainer.evaluate import autocast, exact_fp32
    from trainer.tokenizer import EOT, VOCAB_SIZE

    if temperature < 0 or tokens < 0 or (top_k is not None and top_k < 1):
        raise SampleError(f"temperature ≥ 0, tokens ≥ 0 and top_k ≥ 1 or None, not {temperature}, {tokens}, {top_k}")
    if temperature > 0 and generator is None:
        raise SampleError("sampling (temperature > 0) needs a seeded torch.Generator of its own")
    device = next(model.parameters()).device
    T = model.cfg.context_length
    limit = min(model.cfg.vocab_size, VOCAB_SIZE)  # logits past the tokenizer's last token are never chosen
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), exact_fp32() if amp == "fp32" else contextlib.nullcontext():
            for _ in range(tokens):
                with autocast(device, amp):
                    logits = model(idx[:, -T:])  # (1, ≤T, vocab_size): cropped to the context the model knows
                logits = logits[0, -1, :limit].float()
                if temperature == 0:
                    nxt = int(logits.argmax())
                else:
                    k = limit if top_k is None else min(top_k, limit)
                    values, ids = torch.topk(logits / temperature, k)
                    nxt = int(ids[torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)])
                if nxt == EOT:
                    return out, "eot"
                out.append(nxt)
                idx = torch.cat([idx, idx.new_tensor([[nxt]])], dim=1)
    finally:
        model.train(was_training)
    return out, "length"


def complete(
    model: GPT,
    prompt: str,
    tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    amp: str = "fp32",
) -> Sample:
    """One completion of `prompt` as a Sample: greedy at temperature 0, else sampled with its own generator
    seeded with `seed` (the global RNG is never drawn from)."""
    import torch

    from trainer.tokenizer import gpt2

    ids = encode(prompt, model.cfg.vocab_size)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    new, ended = generate(model, ids, tokens, temperature=temperature, top_k=top_k, generator=generator, amp=amp)
    return Sample(
        prompt=prompt,
        kind=SAMPLED if temperature > 0 else GREEDY,
        temperature=float(temperature),
        top_k=top_k if temperature > 0 else None,
        seed=seed if temperature > 0 else None,
        text=gpt2().decode(new),  # errors="replace": a completion cut inside a UTF-8 character stays readable
        tokens=new,
        ended=ended,
    )


def sample_all(model: GPT, cfg: SampleConfig, *, amp: str = "fp32") -> list[Sample]:
    """What a `sample` config section asks for: per prompt, the greedy completion, then `count` sampled ones
    (the i-th with seed cfg.seed + i)."""
    out = []
    for prompt in cfg.prompts:
        out.append(complete(model, prompt, cfg.tokens, amp=amp))
        for i in range(cfg.count):
            out.append(
                complete(
                    model, prompt, cfg.tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed + i, amp=amp
                )
            )
    return out


def write_run_samples(run_dir: Path, model: GPT, cfg: TrainConfig, step: int) -> Samples:
    """samples.json of a finished run (rank 0, after the test evaluation), and one line of it on stdout. A
    model that cannot take GPT-2 tokens (a vocabulary smaller than the prompt's ids) gets a file with a note
    rather than a failed run: the run itself succeeded."""
    device = next(model.parameters()).device
    started = time.perf_counter()
    try:
        samples, note = sample_all(model, cfg.sample, amp=cfg.eval.amp), None
    except SampleError as exc:
        samples, note = [], str(exc)
    if not cfg.sample.prompts:
        note = "sample.prompts is empty"
    done = Samples(step, str(device), cfg.eval.amp, time.perf_counter() - started, samples, note)
    write_json(Path(run_dir) / SAMPLES, asdict(done))
    first = done.greedy()
    if first is not None:
        print(f"sample ({done.seconds:.2f} s): {first.prompt!r} → {first.text!r}", flush=True)
    elif note:
        print(f"no samples: {note}", flush=True)
    return done


def load_model(path: str | Path, device: str = "cpu") -> tuple[GPT, TrainConfig, int]:
    """The model of a trainer checkpoint, in eval mode on `device`, with its config and step."""
    from trainer import checkpoint
    from trainer.model import GPT

    try:
        cfg, weights, step = checkpoint.read_model(path)
    except checkpoint.CheckpointError as exc:
        raise SampleError(str(exc)) from None
    model = GPT(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, step


# ---------------------------------------------------------------------------------------------------------
# samples.json, read back (by the orchestrator: MLflow, orch report)


def read_samples(run_dir: str | Path) -> Samples | None:
    """A run directory's samples.json; None where there is none (a run from before samples, or not finished)."""
    try:
        data = json.loads((Path(run_dir) / SAMPLES).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return Samples(**{**data, "samples": [Sample(**s) for s in data.get("samples", [])]})


def markdown(samples: Samples, title: str = "Samples") -> str:
    """The completions as Markdown (samples.md in MLflow): each prompt in bold, then its completions."""
    lines = [f"# {title}", "", f"Step {samples.step}, {samples.device}, {samples.amp}."]
    if samples.note:
        lines += ["", f"No samples: {samples.note}."]
    prompt = None
    for s in samples.samples:
        if s.prompt != prompt:
            prompt = s.prompt
            lines += ["", f"## {_quote(prompt)}"]
        how = "greedy" if s.kind == GREEDY else f"T={s.temperature:g}, top-k {s.top_k or 'all'}, seed {s.seed}"
        end = " ⟨endoftext⟩" if s.ended == "eot" else ""
        lines += ["", f"- *{how}*: **{_quote(prompt)}**{_quote(s.text)}{end}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A completion inline in Markdown: newlines shown as ⏎, markup characters escaped."""
    text = text.replace("\r\n", "\n").replace("\n", " ⏎ ")
    for ch in "\\`*_[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text

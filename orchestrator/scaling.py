"""Scaling-law calculators for pre-training hyperparameters, as the blog series used them (part 32).

From a model size N (parameters) and a training budget D, `suggest()` computes, each with its formula, the
numbers plugged in and the paper it comes from:
- Chinchilla's compute-optimal budget and the tokens-per-parameter ratio TPP = D / N;
- DeepSeek LLM's optimal batch size and learning rate, from the non-embedding training compute C in FLOPs;
- Cerebras' optimal batch size and AdamW timescale τ, and the weight decay λ that τ implies.
Units are part of every name: tokens, sequences (of `context` tokens), FLOPs. `render_text()` and `to_json()`
print the suggestions; `emit_intervention()` and `emit_experiment_file()` turn them into an experiment file.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from orchestrator import runspec, specs
from trainer.config import TrainConfig

CHINCHILLA = "Hoffmann et al. 2022, 'Training Compute-Optimal Large Language Models' (≈20 tokens per parameter)"
DEEPSEEK = "DeepSeek-AI 2024, 'DeepSeek LLM: Scaling Open-Source Language Models with Longtermism', §3.1"
DEEPSEEK_M = "DeepSeek-AI 2024, 'DeepSeek LLM', §3.2 (non-embedding FLOPs per token M)"
KAPLAN = "Kaplan et al. 2020, 'Scaling Laws for Neural Language Models' (≈6 FLOPs per parameter per token)"
CEREBRAS = "Bergsma et al. 2025, 'Power Lines: Scaling Laws for Weight Decay and Batch Size in LLM Pre-training'"

# DeepSeek's C is the non-embedding training compute, C = M · D (the series: "specifically the non-embedding
# training FLOPs"). Its DeepSeek numbers, B_opt = 373 sequences of 1,024 tokens and η = 0.0014, need C ≈ 5.0e18
# FLOPs: inverting B_opt gives C = (373 · 1024 / 0.2920)^(1 / 0.3271) = 5.007e18 (any C from 4.986e18 to
# 5.027e18 rounds to 373), and η_opt(5.007e18) = 0.00143. That C is not M · D for GPT-2 small: M = 72·12·768²
# + 6·12·768·1024 = 566,231,040 FLOPs/token times D = 3.26e9 tokens is C = 1.85e18, which gives B_opt ≈ 269
# sequences and η_opt ≈ 0.0016. Pass flops=SERIES_DEEPSEEK_FLOPS to reproduce the series' numbers.
SERIES_DEEPSEEK_FLOPS = (373 * 1024 / 0.2920) ** (1 / 0.3271)


@dataclass(frozen=True)
class Suggestion:
    key: str  # stable id, e.g. "weight_decay"; emit_intervention() selects by it
    name: str  # what it is, units included
    value: float
    unit: str
    formula: str
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # symbol -> {"value": ..., "unit": ...}
    source: str = ""
    note: str = ""  # which path was taken, and caveats


# ---------------------------------------------------------------------------------------------------------
# The formulas.


def chinchilla_tokens(params: float) -> int:
    """Hoffmann et al. 2022: the compute-optimal budget is about 20 tokens per parameter, D ≈ 20 · N."""
    return round(20 * params)


def deepseek_flops_per_token(n_layer: int, d_model: int, context: int) -> int:
    """DeepSeek LLM §3.2: non-embedding FLOPs per token M = 72·n_layer·d_model² + 6·n_layer·d_model·l_seq."""
    return 72 * n_layer * d_model**2 + 6 * n_layer * d_model * context


def deepseek_batch_tokens(flops: float) -> float:
    """DeepSeek LLM §3.1: B_opt = 0.2920 · C^0.3271, B in tokens, C = M · D in FLOPs."""
    return 0.2920 * flops**0.3271


def deepseek_lr(flops: float) -> float:
    """DeepSeek LLM §3.1: η_opt = 0.3118 · C^−0.1250, C in FLOPs."""
    return 0.3118 * flops**-0.1250


def cerebras_batch_sequences(tokens: float) -> float:
    """Power Lines: B_opt = 0.0306 · D^0.383, D in tokens, B in sequences (the series: 3,260,252,160 → 134.68).

    The paper's sequences were 2,048 tokens; the series applied B to its 1,024-token ones unchanged, as we do."""
    return 0.0306 * tokens**0.383


def cerebras_tau(tpp: float) -> float:
    """Power Lines: τ_opt = 1.084 · TPP^−0.527, TPP = D / N tokens per parameter (TPP 20 → 0.22356).

    The series printed 0.22352 for TPP 20, 0.016% below this formula's 0.223556; its λ values used 0.22352."""
    return 1.084 * tpp**-0.527


def weight_decay(batch_sequences: float, lr: float, tau: float, tokens_sequences: float) -> float:
    """Power Lines: AdamW timescale τ = B / (η · λ · D), so λ = B / (η · τ · D) with B and D in sequences.

    B / D is 1 / steps, so any unit works as long as both match (the series: 96, 4e-4, 0.22352, 3,183,840 →
    0.33724)."""
    return batch_sequences / (lr * tau * tokens_sequences)


# ---------------------------------------------------------------------------------------------------------
# All of them at once, from what is known about a run.

_FIXES = {
    "params": "give the model's parameter count, e.g. 163009536 for gpt2-small",
    "tokens": "give the training budget in tokens, or leave it out for Chinchilla's 20 · params",
    "batch_sequences": "give sequences per optimizer step, e.g. 96, or leave it out for Cerebras' B_opt",
    "lr": "give the peak AdamW learning rate, e.g. 4e-4, or leave it out for DeepSeek's η_opt",
    "context": "give the sequence length in tokens, e.g. 1024",
    "n_layer": "give the number of transformer blocks, e.g. 12",
    "d_model": "give the model width, e.g. 768",
    "non_embedding_params": "give the parameters outside the embeddings and the output head",
    "flops": "give the non-embedding training compute C in FLOPs, e.g. 5e18",
}


def _q(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit}


def suggest(
    params: int,
    tokens: int | None = None,
    batch_sequences: int | None = None,
    lr: float | None = None,
    context: int = 1024,
    n_layer: int | None = None,
    d_model: int | None = None,
    non_embedding_params: int | None = None,
    flops: float | None = None,
) -> list[Suggestion]:
    """Every suggestion for a model of `params` parameters trained on `tokens` tokens (default: Chinchilla's).

    DeepSeek's C is `flops` if given, else M · D with M from the shape (n_layer, d_model, context), else with
    M ≈ 6 · non_embedding_params. λ uses `batch_sequences` and `lr` if given, else Cerebras' B_opt (rounded)
    and DeepSeek's η_opt. Each path taken is written in the suggestion's note.
    """
    given = dict(
        params=params,
        tokens=tokens,
        batch_sequences=batch_sequences,
        lr=lr,
        context=context,
        n_layer=n_layer,
        d_model=d_model,
        non_embedding_params=non_embedding_params,
        flops=flops,
    )
    for name, value in given.items():
        if value is None and name not in ("params", "context"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number (got {value!r}); {_FIXES[name]}")
    if (n_layer is None) != (d_model is None):
        raise ValueError("give both n_layer and d_model (the model shape), or neither")
    if flops is None and n_layer is None and non_embedding_params is None:
        raise ValueError(
            "DeepSeek's formulas need the non-embedding training compute C: give n_layer and d_model "
            "(the model shape), or non_embedding_params, or flops (C in FLOPs)"
        )
    seqs = f"sequences of {context} tokens"

    budget = chinchilla_tokens(params)
    D = budget if tokens is None else tokens
    tpp = D / params
    out = [
        Suggestion(
            "chinchilla_tokens",
            "compute-optimal training budget D (tokens)",
            budget,
            "tokens",
            "D = 20 · N",
            {"N": _q(params, "parameters")},
            CHINCHILLA,
            f"D below is the given {tokens:,} tokens" if tokens else "used as D below (no tokens given)",
        ),
        Suggestion(
            "tpp",
            "tokens per parameter TPP",
            tpp,
            "tokens per parameter",
            "TPP = D / N",
            {"D": _q(D, "tokens"), "N": _q(params, "parameters")},
            CHINCHILLA,
        ),
    ]

    if flops is not None:
        C, formula, inputs, how = float(flops), "C (given)", {}, "given directly (flops); the model shape is not used"
    else:
        if n_layer is not None:
            M = deepseek_flops_per_token(n_layer, d_model, context)
            m_formula, m_source = "M = 72 · n_layer · d_model² + 6 · n_layer · d_model · l_seq", DEEPSEEK_M
            m_inputs = {
                "n_layer": _q(n_layer, "blocks"),
                "d_model": _q(d_model, "width"),
                "l_seq": _q(context, "tokens"),
            }
            how = f"from the model shape, {m_formula}"
        else:  # Kaplan's 6 FLOPs per parameter per token leaves out attention's 6 · n_layer · d_model · l_seq
            M, m_formula, m_source = 6 * non_embedding_params, "M ≈ 6 · N_non-embedding", KAPLAN
            m_inputs = {"N_non-embedding": _q(non_embedding_params, "parameters")}
            how = f"approximate, {m_formula} (give n_layer and d_model for DeepSeek's M)"
        out.append(
            Suggestion(
                "flops_per_token",
                "non-embedding training FLOPs per token M",
                M,
                "FLOPs per token",
                m_formula,
                m_inputs,
                m_source,
            )
        )
        C, formula, inputs = float(M * D), "C = M · D", {"M": _q(M, "FLOPs per token"), "D": _q(D, "tokens")}
    out.append(
        Suggestion("flops", "non-embedding training compute C (FLOPs)", C, "FLOPs", formula, inputs, DEEPSEEK_M, how)
    )

    b_tokens, eta = deepseek_batch_tokens(C), deepseek_lr(C)
    out += [
        Suggestion(
            "deepseek_batch_tokens",
            "DeepSeek optimal batch B_opt (tokens per step)",
            b_tokens,
            "tokens per step",
            "B_opt = 0.2920 · C^0.3271",
            {"C": _q(C, "FLOPs")},
            DEEPSEEK,
        ),
        Suggestion(
            "deepseek_batch_sequences",
            "DeepSeek optimal batch B_opt (sequences per step)",
            b_tokens / context,
            f"{seqs} per step",
            "B_opt / l_seq",
            {"B_opt": _q(b_tokens, "tokens"), "l_seq": _q(context, "tokens")},
            DEEPSEEK,
        ),
        Suggestion(
            "lr",
            "DeepSeek optimal learning rate η_opt",
            eta,
            "AdamW peak learning rate",
            "η_opt = 0.3118 · C^−0.1250",
            {"C": _q(C, "FLOPs")},
            DEEPSEEK,
        ),
    ]

    b_cerebras, tau = cerebras_batch_sequences(D), cerebras_tau(tpp)
    B = batch_sequences if batch_sequences is not None else round(b_cerebras)
    eta_used = lr if lr is not None else eta
    out += [
        Suggestion(
            "cerebras_batch_sequences",
            "Cerebras optimal batch B_opt (sequences per step)",
            b_cerebras,
            f"{seqs} per step",
            "B_opt = 0.0306 · D^0.383",
            {"D": _q(D, "tokens")},
            CEREBRAS,
            "D in tokens, B in sequences",
        ),
        Suggestion(
            "tau",
            "Cerebras optimal AdamW timescale τ_opt",
            tau,
            "fraction of training (dimensionless)",
            "τ_opt = 1.084 · TPP^−0.527",
            {"TPP": _q(tpp, "tokens per parameter")},
            CEREBRAS,
        ),
        Suggestion(
            "weight_decay",
            "weight decay λ for τ_opt",
            weight_decay(B, eta_used, tau, D / context),
            "AdamW weight decay",
            "λ = B / (η · τ_opt · D)",
            {
                "B": _q(B, f"{seqs} per step"),
                "η": _q(eta_used, "learning rate"),
                "τ_opt": _q(tau, "fraction of training"),
                "D": _q(D / context, seqs),
            },
            CEREBRAS,
            ("B given" if batch_sequences is not None else "B = Cerebras B_opt rounded (no batch given)")
            + ("; η given" if lr is not None else "; η = DeepSeek η_opt (no lr given)"),
        ),
    ]
    return out


def config_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """suggest()'s keyword arguments for a resolved TrainConfig: its shape, batch, learning rate and tokens."""
    m, d = cfg.model, cfg.model.n_embd
    # Per block (trainer/model.py): QKV 3d², out-proj d², MLP 8d² weights; 6d biases (+3d QKV bias); 2 LayerNorms 4d.
    block = 12 * d * d + (13 if m.qkv_bias else 10) * d
    params = m.vocab_size * d * (1 if m.tie_weights else 2) + m.context_length * d + m.n_layer * block + 2 * d
    return {
        "params": params,
        "tokens": cfg.total_steps() * cfg.run.batch_size * m.context_length,
        "batch_sequences": cfg.run.batch_size,
        "lr": cfg.optim.lr,
        "context": m.context_length,
        "n_layer": m.n_layer,
        "d_model": d,
    }


# ---------------------------------------------------------------------------------------------------------
# Output: text, JSON, and experiment files.


def _fmt(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:.5g}"


def _plugged(s: Suggestion) -> str:
    return ", ".join(f"{k} = {_fmt(v['value'])} {v['unit']}" for k, v in s.inputs.items())


def render_text(suggestions: Sequence[Suggestion]) -> str:
    lines = []
    for s in suggestions:
        lines.append(f"{s.name:<52} {_fmt(s.value):>16}  {s.unit}")
        lines.append(f"    {s.formula}" + (f"   with {_plugged(s)}" if s.inputs else ""))
        lines.append(f"    {s.source}" + (f"\n    note: {s.note}" if s.note else ""))
    return "\n".join(lines)


def to_json(suggestions: Sequence[Suggestion]) -> str:
    return json.dumps([asdict(s) for s in suggestions], indent=2, ensure_ascii=False)


def from_json(text: str) -> list[Suggestion]:
    return [Suggestion(**item) for item in json.loads(text)]


CONFIG_KEYS = {
    "lr": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "chinchilla_tokens": "run.tokens",
    "deepseek_batch_sequences": "run.batch_size",
    "cerebras_batch_sequences": "run.batch_size",
}
_SHORT = {"optim.lr": "lr", "optim.weight_decay": "wd", "run.tokens": "tokens", "run.batch_size": "batch"}
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def _check_lambda(suggestions: Sequence[Suggestion], actual: dict[str, float], where: str, digits: int) -> None:
    """λ holds τ_opt only with the B, η and D it was computed for (Power Lines' τ = B / (η · λ · D))."""
    wd = next(s for s in suggestions if s.key == "weight_decay")
    for symbol, value in actual.items():
        used, unit = wd.inputs[symbol]["value"], wd.inputs[symbol]["unit"]
        if not math.isclose(value, used, rel_tol=max(0.01, 5 * 10.0**-digits)):
            arg = {"η": "lr", "B": "batch_sequences", "D": "tokens"}[symbol]
            raise ValueError(
                f"λ = {wd.value:.5g} was computed for {symbol} = {_fmt(used)} {unit}, but {where} has "
                f"{symbol} = {_fmt(value)}; pass the run's value to suggest() as {arg}, or set it too"
            )


def intervention_changes(
    suggestions: Sequence[Suggestion], which: Sequence[str] = ("lr", "weight_decay"), digits: int = 5
) -> dict[str, Any]:
    """{"optim.lr": ..., ...} for the chosen suggestions: floats to `digits` significant figures, counts rounded."""
    by_key = {s.key: s for s in suggestions}
    changes: dict[str, Any] = {}
    for key in which:
        if key not in CONFIG_KEYS:
            raise ValueError(f"{key!r} is not a config setting; choose from {', '.join(CONFIG_KEYS)}")
        if key not in by_key:
            raise ValueError(f"no {key!r} among the suggestions; compute them with suggest() first")
        if CONFIG_KEYS[key] in changes:
            raise ValueError(f"two suggestions set {CONFIG_KEYS[key]}; choose one of them")
        value = by_key[key].value
        integer = CONFIG_KEYS[key].startswith("run.")  # run.tokens and run.batch_size are counts
        changes[CONFIG_KEYS[key]] = round(value) if integer else float(f"{value:.{digits}g}")
    if "weight_decay" in which:
        actual = {"η": changes.get("optim.lr"), "B": changes.get("run.batch_size")}
        _check_lambda(suggestions, {k: v for k, v in actual.items() if v is not None}, "this intervention", digits)
    return changes


def emit_intervention(
    suggestions: Sequence[Suggestion],
    which: Sequence[str] = ("lr", "weight_decay"),
    name: str | None = None,
    digits: int = 5,
) -> str:
    """Python source of one `Intervention(name=..., set={...})`, named after its changes unless `name` is given."""
    changes = intervention_changes(suggestions, which, digits)
    name = name or "-".join(f"{_SHORT[k]}-{v}" for k, v in changes.items())
    if not _NAME.match(name):
        raise ValueError(f"intervention name {name!r} may use only letters, digits and _ . + -; choose another")
    body = ", ".join(f"{json.dumps(k)}: {v!r}" for k, v in changes.items())
    return f"Intervention(name={json.dumps(name)}, set={{{body}}})"


def emit_experiment_file(
    suggestions: Sequence[Suggestion],
    name: str = "scaling-suggestions",
    preset: str = "gpt2-small",
    which: Sequence[str] = ("lr", "weight_decay"),
    intervention_name: str | None = None,
    digits: int = 5,
) -> str:
    """A complete experiment file (the baseline and one intervention), checked to load and expand at `preset`."""
    if not _NAME.match(name):
        raise ValueError(f"experiment name {name!r} may use only letters, digits and _ . + -; choose another")
    line = emit_intervention(suggestions, which, intervention_name, digits)
    notes = [
        f"- {CONFIG_KEYS[s.key]}: {s.formula} = {_fmt(s.value)}"
        + (f", {_plugged(s)}" if s.inputs else "")
        + f"\n  ({s.source})"
        for key in which
        for s in suggestions
        if s.key == key
    ]
    text = "\n".join(
        [
            f'"""Suggested by `orch suggest` (orchestrator/scaling.py) for preset {preset}:',
            "",
            *notes,
            '"""',
            "",
            "from orchestrator.specs import Experiment, Intervention",
            "",
            "experiment = Experiment(",
            f"    name={json.dumps(name)},",
            f"    preset={json.dumps(preset)},",
            "    interventions=[",
            f"        {line},",
            "    ],",
            ")",
            "",
        ]
    )
    namespace: dict[str, Any] = {}
    exec(compile(text, f"<experiment {name}>", "exec"), namespace)  # what load_experiment will run
    runs = runspec.expand(namespace["experiment"], source=f"experiment {name!r}")  # SpecError: bad preset or value
    if "weight_decay" in which:
        cfg = next(r.config for r in runs if r.arm != specs.BASELINE)
        actual = {"B": cfg.run.batch_size, "η": cfg.optim.lr, "D": cfg.total_steps() * cfg.run.batch_size}
        _check_lambda(suggestions, actual, f"preset {preset} with this intervention", digits)
    return text

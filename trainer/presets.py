"""Presets, overrides and loading: how a TrainConfig is made from a preset or a JSON file plus `--set` overrides.

A config is built as a plain nested dict (a preset, or a file merged over the defaults), dotted overrides are
applied to it, and only then is it validated, so that every mistake is found before any training time is spent:
an unknown key is refused with the closest valid one, and Pydantic's errors become one line per bad key with its
fix (trainer/config.py's validators word them).

Presets:
- `gpt2-small`: the blog series' baseline exactly (its run "8xa100m40-baseline"): GPT-2-small
  shape (163M parameters, untied), dropout 0.1, no QKV bias, PyTorch's default initialisation (the series'
  model is Raschka's, which never re-initialises), 96 × 1024-token sequences per step as 12 per GPU on 8 GPUs,
  3,260,190,720 tokens rounded up to whole steps as the series' training repo does (33,165 steps,
  3,260,252,160 tokens), AdamW lr 4e-4 wd 0.1 on every parameter, constant LR, no clipping, fp16 AMP + TF32,
  seed 42, test loss on 3,200 × 6 sequences.
- `tiny`: the same code path at a size that trains in seconds on a laptop CPU, for demos and tests.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel, ValidationError

from trainer.config import ConfigError, TrainConfig

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {},  # the defaults of trainer/config.py are the blog baseline
    "tiny": {
        "model": {"context_length": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "init": "gpt2"},
        "optim": {"lr": 1e-3},
        "precision": {"amp": "fp32", "tf32": False},
        "eval": {"val_sequences": 32, "test_sequences": 128, "batch_size": 32},
        "run": {
            "batch_size": 16,
            "micro_batch_size": "auto",
            "tokens": None,
            "steps": 100,
            "log_interval": 5,
            "checkpoint_interval": 25,
        },
    },
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(name: str) -> dict[str, Any]:
    """The preset as a plain nested dict, ready for overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return _merge(TrainConfig().model_dump(mode="json"), PRESETS[name])


def parse_value(text: str) -> Any:
    """`--set` values are JSON where they parse (numbers, true/false, null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Keys that are alternatives: setting one (to a value) clears the other unless both are set together,
# so `--set run.steps=40` works on a preset whose budget is given in tokens.
ALTERNATIVES = {
    "run.steps": "run.tokens",
    "run.tokens": "run.steps",
    "eval.test_tokens": "eval.test_sequences",
    "eval.test_sequences": "eval.test_tokens",
}


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply {"optim.lr": 1e-3, ...} to a nested dict, refusing keys that do not exist."""
    data = json.loads(json.dumps(data))  # deep copy
    for dotted, other in ALTERNATIVES.items():
        if overrides.get(dotted) is not None and other not in overrides:
            overrides = {**overrides, other: None}
    for dotted, value in overrides.items():
        node, parts = data, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                choices = list(node) if isinstance(node, dict) else []
                raise ConfigError(
                    f"unknown config key {dotted!r}: {where} has no {part!r}" + _did_you_mean(part, choices)
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return data


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})" if choices else ""


def validate(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig, turning Pydantic's errors into one message per bad key with its fix."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n" + "\n".join(_explain(err) for err in exc.errors())) from None


def _explain(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        fields = TrainConfig.model_fields  # the keys of the section holding the unknown one (model.moe nests)
        for part in err["loc"][:-1]:
            kind = getattr(fields.get(str(part)), "annotation", None)
            fields = kind.model_fields if isinstance(kind, type) and issubclass(kind, BaseModel) else {}
        choices = list(fields)
        return f"  {loc}: unknown key" + _did_you_mean(str(err["loc"][-1]), choices) + "; remove or rename it"
    msg = err["msg"].removeprefix("Value error, ")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"  {loc or 'config'}: {msg}{got}"


def load(
    path: str | None = None, preset_name: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A config from a JSON file or a preset, with dotted overrides applied on top."""
    if (path is None) == (preset_name is None):
        raise ConfigError("give exactly one of a config file (--config) and a preset (--preset)")
    if path is not None:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        data = _merge(TrainConfig().model_dump(mode="json"), data)
    else:
        data = preset(preset_name)
    data = apply_overrides(data, overrides or {})
    return validate(data, source=path or f"preset {preset_name!r}")

"""Starting a run from another run's weights (run.init_from): the weights only, then a run of its own.

    python -m trainer --preset tiny --run-dir runs/long --set run.init_from=runs/base \\
        --set model.context_length=192 --set eval.test_tokens=1536

What is taken: the model's weights of the source's final state. A run directory gives its newest checkpoint,
which for a finished run is its last step (the trainer checkpoints at the end); a directory whose result.json
does not say succeeded is refused (name one of its checkpoint files to start from that step). A checkpoint
file is taken as it is. Nothing else comes along: the optimizer starts fresh (AdamW's moments at zero), the
step at 0 with the schedule from its start, and this run's own run.seed and data settings decide dropout and
data order. A relaunch resumes from this run's own newest checkpoint (setup.resume) and never comes back
here; only a launch that finds no checkpoint of its own initialises from the source, from the same file.
init_from.json in the run directory (and result.json's "init_from") records the file, its sha256 and step.

What may differ from the source's model: context_length (below), the dropout rates, init (the source's
weights replace the initial draw) and rope_base (raising RoPE's base is how Code Llama adapted to a longer
context, Rozière et al. 2023). Every other model key changes the weights' shapes or what they compute, and is
refused before training with the keys named.

A longer context grows the learned position table (context_length × n_embd) by run.init_positions:
- "interpolate" (the default): new row j is the old table linearly interpolated at position j·(T−1)/(T′−1),
  so the first and last rows are kept exactly and every new row is a mix of two neighbouring trained ones:
  the model sees no embedding it was not trained near, and "early" and "late" in a window keep their meaning
  (Position Interpolation, Chen et al. 2023, did this for RoPE's angles: interpolated models adapted within
  ~1,000 steps where extrapolated positions broke attention). Neighbouring positions come T′/T times closer.
- "tile": new row j is old row j mod T (Longformer, Beltagy et al. 2020, §5, copied RoBERTa's 512 positions
  to 4,096): every offset within a tile is one the model knows, but positions j and j + T get the very same
  embedding, so from the table alone the model cannot tell them apart.
The default is interpolation for those reasons, not for a measurement: on the tiny preset the two start and
end within a few thousandths of a nat of each other (bench/context_extension.py), as a model that small and
that briefly trained barely uses its position table.
A shorter context keeps the first T′ rows, under either rule. model.position=rope has no table: its rotations
are computed for any length, so nothing is extended (config.py refuses run.init_positions=tile with it).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.config import ConfigError, ModelConfig, TrainConfig
from trainer.rundir import RESULT, checkpoint_paths, write_json

if TYPE_CHECKING:  # torch is imported where tensors are made: `orch submit` checks compatibility without it
    import torch

    from trainer.distributed import Dist
    from trainer.model import GPT

INIT_FILE = "init_from.json"  # in the run directory: what the run was initialised from
RUN_ID = re.compile(r"[0-9a-f]{16}")  # an orch run id (orchestrator/runspec.py: run_id)

# Model keys that may differ from the source's: they change neither the weights' shapes nor their function.
MAY_DIFFER = {"context_length", "dropout", "dropout_embed", "dropout_attn", "dropout_resid", "init", "rope_base"}


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_keys(source_model: dict[str, Any], model: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(key, source's value, this run's value) for every model key that differs and may not."""
    try:  # a source stored before a later key existed lacks it: its default is what that source had
        source = _flat(ModelConfig.model_validate(source_model).model_dump(mode="json"))
    except ValueError as exc:
        raise ConfigError(f"the source's model config is not one this trainer reads: {exc}") from None
    mine = _flat(model.model_dump(mode="json"))
    return [(k, source[k], mine[k]) for k in mine if k not in MAY_DIFFER and source.get(k) != mine[k]]


def check_compatible(source_model: dict[str, Any], cfg: TrainConfig, source: str) -> None:
    """Refuse a source whose weights this run's model cannot take, naming each differing key."""
    diffs = differing_keys(source_model, cfg.model)
    if diffs:
        shown = ", ".join(f"model.{k} (source {a!r}, this run {b!r})" for k, a, b in diffs)
        raise ConfigError(
            f"run.init_from: {source} has another model: {shown}. Only model.context_length, the dropout rates, "
            "model.init and model.rope_base may differ from the source: set the others as the source has them, "
            "or train from scratch (run.init_from=null)"
        )


def resolve(init_from: str) -> Path:
    """The checkpoint file run.init_from names: a file as it is, a run directory's newest checkpoint."""
    path = Path(init_from)
    if path.is_file():
        return path
    if path.is_dir():
        result = _read_json(path / RESULT)
        status = (result or {}).get("status")
        paths = checkpoint_paths(path)
        if status != "succeeded":
            why = f"its result.json says {status}" if result else "it has no result.json (still training?)"
            pick = f" (the newest is {paths[-1]})" if paths else ""
            raise ConfigError(
                f"run.init_from: {path} is not a finished run: {why}; wait for it to succeed, or name one of "
                f"its checkpoint files to start from that step{pick}"
            )
        if not paths:
            raise ConfigError(f"run.init_from: {path} succeeded but holds no checkpoint (checkpoints/step_*.pt)")
        return paths[-1]
    if RUN_ID.fullmatch(init_from):
        raise ConfigError(
            f"run.init_from={init_from} is an orch run id, which only an orch worker resolves (to that run's "
            f"directory); by hand, give the run's directory instead, e.g. runs/{init_from}"
        )
    raise ConfigError(f"run.init_from: {path} does not exist; give a run directory or a checkpoint file")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def extend_positions(table: torch.Tensor, length: int, rule: str) -> torch.Tensor:
    """A (T, d) learned position table as a (length, d) one: the first rows if shorter, else grown by `rule`
    ("interpolate": linear at j·(T−1)/(length−1); "tile": row j mod T). Computed in float64."""
    import torch

    T = table.shape[0]
    if length <= T:
        return table[:length].clone()
    if rule == "tile":
        return table[torch.arange(length) % T].clone()
    if T == 1:
        return table.expand(length, -1).clone()
    where = torch.arange(length, dtype=torch.float64) * (T - 1) / (length - 1)  # in [0, T−1]
    low = where.floor().long().clamp(max=T - 2)
    frac = (where - low).unsqueeze(1)
    old = table.double()
    return ((1 - frac) * old[low] + frac * old[low + 1]).to(table.dtype)


def initialise(cfg: TrainConfig, run_dir: Path, d: Dist, model: GPT) -> dict[str, Any]:
    """Load the source's weights into `model` (positions extended as configured); returns what was loaded.

    Every rank resolves the source (so a refusal stops every rank alike) and loads the file rank 0 chose, as
    setup.resume does: a lagging view of a shared filesystem must not give ranks different weights."""
    from trainer.distributed import all_gather

    path = Path(all_gather(d, str(resolve(cfg.run.init_from)))[0])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"run.init_from: rank {d.rank} cannot read {path} ({exc.strerror})") from None
    sha = hashlib.sha256(data).hexdigest()
    if cfg.run.init_sha256 is not None and sha != cfg.run.init_sha256:
        raise ConfigError(
            f"run.init_from: {path} has sha256 {sha[:12]}…, not the {cfg.run.init_sha256[:12]}… this run was "
            "submitted with: the file changed since; submit again to start from what it holds now"
        )
    import torch

    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated copy, a foreign file: pickle, zip and torch errors alike
        raise ConfigError(
            f"run.init_from: {path} is not a readable trainer checkpoint ({type(exc).__name__}: {exc}); "
            "point run.init_from at a finished run or one of its checkpoints/step_*.pt"
        ) from None
    del data
    if (
        not isinstance(ckpt, dict)
        or "model" not in ckpt
        or not isinstance(ckpt.get("config"), dict)
        or not isinstance(ckpt["config"].get("model"), dict)
    ):
        raise ConfigError(f"run.init_from: {path} is not a trainer checkpoint (no model weights and config)")
    check_compatible(ckpt["config"]["model"], cfg, str(path))
    weights = ckpt["model"]
    source_T = ckpt["config"]["model"]["context_length"]
    T, rule = cfg.model.context_length, "none"
    if "pos_emb.weight" in weights and source_T != T:
        rule = cfg.run.init_positions if T > source_T else "truncate"
        weights["pos_emb.weight"] = extend_positions(weights["pos_emb.weight"], T, cfg.run.init_positions)
    model.load_state_dict(weights)
    record = {
        "init_from": cfg.run.init_from,
        "checkpoint": str(path.resolve()),
        "sha256": sha,
        "source_step": ckpt.get("step"),
        "source_context_length": source_T,
        "context_length": T,
        "positions": rule,  # interpolate | tile | truncate | none (same length, or RoPE: no table)
    }
    if d.master:
        write_json(run_dir / INIT_FILE, record)
        print(f"initialised from {path} (step {record['source_step']}, positions: {rule})", flush=True)
    return record


def recorded(run_dir: Path) -> dict[str, Any] | None:
    """What this run was initialised from (init_from.json), for result.json; None if from scratch."""
    return _read_json(run_dir / INIT_FILE)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

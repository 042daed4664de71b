"""Checkpoints that make a relaunch indistinguishable from a run that never stopped.

A checkpoint holds the model, optimizer and grad-scaler states, the step (which is also the data position:
see trainer/data.py), the running counters of the result, the config, and every rank's RNG states (Python,
NumPy, torch CPU and CUDA), so dropout masks after a resume are the ones the uninterrupted run would draw.
Each file is written under a temporary name and renamed, so a kill mid-write leaves the previous checkpoint
as the newest complete one.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import TrainConfig
from trainer.presets import validate
from trainer.rundir import CHECKPOINTS, checkpoint_paths, write_atomic


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint of this trainer, named, with what is wrong with it."""


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_XXXXXXXX.pt atomically and prune all but the newest `keep`."""
    folder = run_dir / CHECKPOINTS
    folder.mkdir(exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    buf = io.BytesIO()
    torch.save({"step": step, **state}, buf)
    write_atomic(path, buf.getvalue())
    for old in checkpoint_paths(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict[str, Any]:
    # weights_only=False: the file also holds RNG states and plain Python counters; checkpoints are our own.
    return torch.load(path, map_location="cpu", weights_only=False)


def read_model(path: str | Path) -> tuple[TrainConfig, dict[str, torch.Tensor], int]:
    """The config, model weights and step of a trainer checkpoint (orch export, orch sample), or one clear
    CheckpointError for a truncated copy or a foreign file."""
    try:
        state = load(path)
    except Exception as exc:  # a truncated copy, a foreign file: pickle, zip and torch errors alike
        raise CheckpointError(f"{path} is not a readable trainer checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise CheckpointError(f"{path} is not a trainer checkpoint (no model, config and step in it)")
    return validate(state["config"], source=f"config of {path}"), state["model"], int(state["step"])


def latest(run_dir: Path) -> Path | None:
    paths = checkpoint_paths(run_dir)
    return paths[-1] if paths else None

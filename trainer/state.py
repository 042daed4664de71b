"""TrainState: what the training loop carries from step to step, and from one launch of a run to the next.

The weights, optimizer moments and grad scaler have state_dicts of their own; this is the rest. Everything
here goes into every checkpoint (under "step", "counters" and "rng"), so that a relaunch continues the
run's numbers — its step, its running totals for result.json, its RNG streams — as if it had never stopped.
The data position and the tokens seen are not stored separately: both are functions of the step (the
sequences a step reads depend only on the step and the global batch, see trainer/data.py).

Two counters live on the device, so that the loop can update them every step without waiting for the GPU:
the number of clipped steps, and the first step whose loss was not finite. They are read on the host only
at sync points (logging, evaluation, checkpoints) and at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trainer import checkpoint
from trainer.distributed import Dist, all_gather

# How many recent throughput measurements a checkpoint keeps: the median in result.json is over these plus
# the current launch's, so one slow launch (a cold cache, a noisy neighbour) cannot dominate it.
KEPT_RATES = 100


@dataclass
class TrainState:
    device: torch.device
    step: int = 0  # optimizer steps taken; also the position in the training data order
    launches: int = 0  # how many times this run has been started, this launch included
    train_time: float = 0.0  # seconds spent in training steps (evaluation and checkpointing excluded)
    wall_time: float = 0.0  # seconds from start to result, summed over launches
    train_loss: float | None = None  # the global batch's loss at the newest sync point
    val_loss: float | None = None  # the newest validation loss
    rates: list[float] = field(default_factory=list)  # tokens/s of each window between sync points
    # On the device (see above): clipped steps so far, and the first non-finite step (-1: none yet).
    clipped: torch.Tensor = field(init=False)
    first_bad: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.clipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.first_bad = torch.tensor(-1, device=self.device)

    def clipped_steps(self) -> int:
        return int(self.clipped.item())  # a device sync

    def diverged_step(self) -> int | None:
        bad = int(self.first_bad.item())  # a device sync
        return bad if bad >= 0 else None

    def note_step(self, loss_sum: torch.Tensor) -> None:
        """Count one more optimizer step whose summed micro-batch loss was `loss_sum` (no device sync)."""
        self.step += 1
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss_sum), self.step, self.first_bad)

    def state_dict(self, d: Dist) -> dict[str, Any]:
        """The checkpoint's share of this state. A collective: every rank calls it, for every rank's RNG."""
        counters = {
            "train_time": self.train_time,
            "wall_time": self.wall_time,
            "clipped_steps": self.clipped_steps(),
            "launches": self.launches,
            "train_loss": self.train_loss,
            "val_loss": self.val_loss,
            "rates": self.rates[-KEPT_RATES:],
        }
        return {"step": self.step, "counters": counters, "rng": all_gather(d, checkpoint.rng_state())}

    def load_state_dict(self, state: dict[str, Any], d: Dist) -> None:
        """Continue from a checkpoint's share (counters it lacks keep their fresh values)."""
        self.step = state["step"]
        c = state["counters"]
        self.train_time, self.wall_time = c.get("train_time", 0.0), c.get("wall_time", 0.0)
        self.launches = c.get("launches", 0)
        self.train_loss, self.val_loss = c.get("train_loss"), c.get("val_loss")
        self.rates = list(c.get("rates", []))
        self.clipped += c.get("clipped_steps", 0)
        # Each rank continues its own streams (its own dropout masks). Written by a different number of
        # ranks, there is no rank-to-rank mapping: the fresh seeds stand.
        if len(state["rng"]) == d.world:
            checkpoint.set_rng_state(state["rng"][d.rank])

"""A launch: one claimed run on one slot of a worker, from the claim to the recorded ending (worker.py drives it)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.db import Run
from orchestrator.launchers import Handle, Slot
from orchestrator.progress import Progress
from orchestrator.tail import MetricsTail

STOP_TIMEOUT_S = 120  # how long a trainer gets to checkpoint after STOP before it is killed


@dataclass
class Launch:
    """One claimed run on one slot, from the claim to the recorded ending.

    Phases: waiting (no handle: a previous trainer still holds the directory), training (the handle's
    trainer running), draining (it exited, but a trainer it started still holds the lock: a killed
    torchrun agent's orphan, checkpointing after the kernel's SIGTERM)."""

    run: Run
    slot: Slot
    run_dir: Path
    progress: Progress
    tail: MetricsTail
    handle: Handle | None = None
    since: float = field(default_factory=time.monotonic)  # when the current phase began
    signalled: int | None = None  # the signal last sent to a stale lock holder
    stop_sent_at: float | None = None
    lost: str | None = None  # why the database took the run away: "cancelled" or "taken over"
    killed: bool = False  # by us, on a second Ctrl-C: its ending is a preemption, not a crash

    def stop_overdue(self) -> bool:
        """Its trainer was asked to stop more than STOP_TIMEOUT_S ago: time to kill it."""
        return (
            self.handle is not None
            and self.stop_sent_at is not None
            and time.monotonic() - self.stop_sent_at > STOP_TIMEOUT_S
        )

"""Following a run's metrics.jsonl while its trainer appends to it, into the run's Progress.

The file is append-only, so a tail keeps a byte offset and each read costs only what is new
(trainer.rundir.read_events: complete lines only; a line still being written waits for the next read).
A relaunch appends {"event": "resume", "step": N} and redoes the steps after N: validation points of those
steps that an earlier attempt wrote are superseded, and leave the curve, which a pruner compares trials by.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.progress import Progress
from trainer.rundir import METRICS, read_events


class MetricsTail:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS
        self.offset = 0  # bytes read so far

    def read(self) -> list[dict]:
        """The events appended since the last read."""
        events, self.offset = read_events(self.path, self.offset)
        return events

    def read_into(self, progress: Progress) -> Progress:
        """Fold the new events into `progress` (trainer/rundir.py describes them)."""
        for e in self.read():
            if e.get("event") == "resume":
                progress.val_curve = [p for p in progress.val_curve if p[0] <= e["step"]]
            elif "loss" in e:
                progress.step, progress.train_loss, progress.tokens_per_s = e["step"], e["loss"], e.get("tokens_per_s")
            elif "val_loss" in e and "test_loss" not in e:
                progress.val_curve = [*progress.val_curve, [e["step"], e["val_loss"]]]
        return progress

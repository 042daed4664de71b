"""A run's progress as its worker reads it from metrics.jsonl (tail.py): what `orch status` shows and a
pruner reads.

A typed record rather than a dict, because its fields become columns of the runs table at each heartbeat
(queue.heartbeat): only the columns named here may be written, and nothing else (no control flag, no
stray key of a metrics event) can slip in with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    run_dir: str
    total_steps: int
    step: int | None = None
    train_loss: float | None = None
    tokens_per_s: float | None = None
    val_curve: list[list[float]] = field(default_factory=list)  # [[step, val_loss], …] of the current attempt

    def columns(self) -> dict:
        """The runs-table columns a heartbeat writes (only what is known: a fresh launch has no step yet)."""
        out = {"run_dir": self.run_dir, "total_steps": self.total_steps}
        if self.step is not None:
            out.update(step=self.step, train_loss=self.train_loss, tokens_per_s=self.tokens_per_s)
        out["val_curve"] = self.val_curve
        return out

    def line(self) -> str:
        if self.step is None:
            return "starting"
        return f"step {self.step}/{self.total_steps} loss {self.train_loss:.3f} {self.tokens_per_s or 0:,.0f} tok/s"

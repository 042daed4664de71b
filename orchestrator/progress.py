"""A run's progress as its worker reads it from metrics.jsonl (tail.py): what `orch status` shows and a
pruner reads.

A typed record rather than a dict, because its fields become columns of the runs table at each heartbeat
(queue.heartbeat): only the columns named here may be written, and nothing else (no control flag, no
stray key of a metrics event) can slip in with them. The label and the tokens per step are the worker's to
show (which arm the run is, its ETA), never written.

Also the whole queue's ETA that `orch status` shows (queue_eta), from the running runs' ETAs and the
durations of finished runs.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from orchestrator.db import Run
from trainer.units import duration


@dataclass
class Progress:
    run_dir: str
    total_steps: int
    step: int | None = None
    train_loss: float | None = None
    tokens_per_s: float | None = None
    val_curve: list[list[float]] = field(default_factory=list)  # [[step, val_loss], …] of the current attempt
    label: str | None = None  # which run this is, for people: "quickstart/no-dropout seed 1"
    tokens_per_step: int | None = None  # for the ETA: batch size × context length

    @classmethod
    def of(cls, run: Run, run_dir: str | Path, total_steps: int, engine: Engine | None = None) -> Progress:
        """A fresh launch's progress, labelled with its experiment/arm (from the database's memberships, given
        `engine`) and seed, and able to tell its ETA from the tokens of one step of its config."""
        return cls(
            run_dir=str(run_dir),
            total_steps=total_steps,
            label=label(run, engine),
            tokens_per_step=tokens_per_step(run.config),
        )

    def columns(self) -> dict:
        """The runs-table columns a heartbeat writes (only what is known: a fresh launch has no step yet)."""
        out = {"run_dir": self.run_dir, "total_steps": self.total_steps}
        if self.step is not None:
            out.update(step=self.step, train_loss=self.train_loss, tokens_per_s=self.tokens_per_s)
        out["val_curve"] = self.val_curve
        return out

    def eta_s(self) -> float | None:
        """Seconds left: the tokens of the remaining steps at the current tokens/s (evaluations not counted)."""
        return eta_s(self.step, self.total_steps, self.tokens_per_s, self.tokens_per_step)

    def line(self) -> str:
        name = f"{self.label}: " if self.label else ""
        if self.step is None:
            return f"{name}starting"
        eta = self.eta_s()
        return (
            f"{name}step {self.step}/{self.total_steps} loss {self.train_loss:.3f} {self.tokens_per_s or 0:,.0f} tok/s"
            + (f" ETA {duration(eta)}" if eta is not None else "")
        )


def label(run: Run, engine: Engine | None = None) -> str:
    """The run for people: "experiment/arm seed N" (its first experiment, and "(+k more)" that share it), or
    just the seed where the database cannot say (no engine, or it is away: a label is not worth a failed
    launch)."""
    arms: list[tuple[str, str]] = []
    if engine is not None:
        from orchestrator import queries

        try:
            arms = queries.memberships(engine, run.id)
        except sa_exc.SQLAlchemyError:
            arms = []
    seed = f"seed {run.seed}"
    if not arms:
        return seed
    (experiment, arm), more = arms[0], len(arms) - 1
    return f"{experiment}/{arm} {seed}" + (f" (+{more} more)" if more else "")


def tokens_per_step(config: dict | None) -> int | None:
    """Tokens of one optimizer step of a stored config (run.batch_size × model.context_length), if it says."""
    try:
        return int(config["run"]["batch_size"]) * int(config["model"]["context_length"])
    except (KeyError, TypeError, ValueError):
        return None


def eta_s(step: int | None, total_steps: int | None, tokens_per_s: float | None, per_step: int | None) -> float | None:
    """Seconds left for a running run: the tokens of its remaining steps at its current tokens/s."""
    if not (step and total_steps and tokens_per_s and per_step):
        return None
    return max(0, total_steps - step) * per_step / tokens_per_s


# ---------------------------------------------------------------------------------------------------------
# The whole queue's ETA (`orch status`).


@dataclass
class QueueEta:
    """When the queue should be empty, and how that was estimated (`how`, a sentence for people)."""

    eta_s: float | None  # None: nothing to estimate it from (see `how`)
    queued: int
    slots: int  # runs at a time: the runs running now (busy slots)
    run_s: dict[str, float]  # experiment → the expected seconds of one of its queued runs
    basis: dict[str, str]  # experiment → where that number comes from
    unestimated: int  # queued runs of experiments with nothing to time them by (not in eta_s)
    how: str


@dataclass
class Busy:
    """A running run as the queue ETA sees it."""

    experiment: str | None
    eta_s: float | None  # its own ETA (tokens left at its tokens/s), if it has reported a step
    elapsed_s: float | None  # since its claim


def queue_eta(running: list[Busy], queued: list[str | None], finished: dict[str, list[float]]) -> QueueEta:
    """Estimate when the last queued run ends: each queued run (in claim order, `queued` holds its experiment)
    takes the slot that frees first; the slots are the running runs', each free at that run's ETA.

    A queued run is expected to take the median claim-to-finish time of its experiment's finished runs
    (started_at → finished_at), else the median projected duration (elapsed + ETA) of its running runs, else
    nothing says, and it is left out (counted in `unestimated`; the ETA is then a lower bound, "≥"). It
    assumes the busy slots stay as many as the runs running now: more workers finish sooner."""
    run_s: dict[str, float] = {}
    basis: dict[str, str] = {}
    for experiment in dict.fromkeys([*queued, *(r.experiment for r in running)]):
        if experiment is None:
            continue
        done = finished.get(experiment) or []
        projected = [r.elapsed_s + r.eta_s for r in running if r.experiment == experiment and _known(r)]
        if done:
            run_s[experiment] = statistics.median(done)
            basis[experiment] = (
                f"the {duration(run_s[experiment])} median of {_runs(len(done), 'finished', experiment)}"
            )
        elif projected:
            run_s[experiment] = statistics.median(projected)
            basis[experiment] = (
                f"{duration(run_s[experiment])} each, projected from {_runs(len(projected), 'running', experiment)}"
            )
    slots, known = len(running), [e for e in queued if e in run_s]
    unestimated = len(queued) - len(known)
    if not running:
        how = (
            f"queue ETA unknown: {len(queued)} queued and nothing running, so no worker is taking runs "
            "(start one: orch worker)"
            if queued
            else "queue empty: nothing queued or running"
        )
        return QueueEta(None if queued else 0.0, len(queued), 0, run_s, basis, unestimated, how)
    free = [_left(r, run_s) for r in running]  # when each slot frees, in seconds from now
    heapq.heapify(free)
    for experiment in known:
        heapq.heappush(free, heapq.heappop(free) + run_s[experiment])
    eta = max(free)
    groups = {e: known.count(e) for e in dict.fromkeys(known)}
    if not known:
        how = f"the last of {_runs(slots, 'running')} ends then"
    elif len(groups) == 1:
        ((e, n),) = groups.items()
        how = f"{n} queued at {basis[e]}, {slots} running at a time"
    else:
        how = f"{len(known)} queued (" + "; ".join(f"{n} at {basis[e]}" for e, n in groups.items())
        how += f"), {slots} running at a time"
    if unestimated:
        how += (
            f"; not counting {_runs(unestimated, 'queued')} that nothing times yet (no run of their experiment "
            "has finished or reported a step)"
        )
    how = f"queue ETA {'≥' if unestimated else '≈'} {duration(eta)}: {how}"
    return QueueEta(eta, len(queued), slots, run_s, basis, unestimated, how)


def _known(r: Busy) -> bool:
    return r.eta_s is not None and r.elapsed_s is not None


def _left(r: Busy, run_s: dict[str, float]) -> float:
    """Seconds until a running run's slot frees: its ETA, else its experiment's expected time less its time so
    far, else now (a run that has not reported a step, of an experiment with nothing to time it by)."""
    if r.eta_s is not None:
        return r.eta_s
    if r.experiment in run_s and r.elapsed_s is not None:
        return max(0.0, run_s[r.experiment] - r.elapsed_s)
    return 0.0


def _runs(n: int, what: str, experiment: str | None = None) -> str:
    """ "8 finished quickstart runs", "1 running run"."""
    return f"{n} {what} {experiment + ' ' if experiment else ''}run{'' if n == 1 else 's'}"

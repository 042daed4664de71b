"""The queue at a glance (`orch status`): how many runs are in each state, each running run's progress and
ETA, the whole queue's ETA, the runs waiting for the run they start from, and this user's Slurm pilots."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import progress, queries
from orchestrator.api.connection import connect
from orchestrator.api.runs import Db
from orchestrator.db import Run
from orchestrator.progress import QueueEta
from orchestrator.states import RunState


@dataclass
class Running:
    """A running run as `orch status` shows it."""

    id: str
    experiment: str
    arm: str
    seed: int
    step: int | None
    total_steps: int | None
    train_loss: float | None
    tokens_per_s: float | None
    eta_s: float | None  # the tokens left at the current throughput
    worker: str | None
    elapsed_s: float | None = None  # since its claim (database clock)


@dataclass
class Waiting:
    """A queued run that no worker claims before the run it starts from (run.init_from) has succeeded."""

    run_id: str
    source: str
    source_state: str

    @property
    def fix(self) -> str | None:
        """What lets it go on, when the source can no longer succeed by itself."""
        if self.source_state in (str(RunState.FAILED), str(RunState.CANCELLED)):
            return f"orch retry {self.source[:8]} (or orch cancel {self.run_id[:8]})"
        if self.source_state in (str(RunState.DIVERGED), str(RunState.PRUNED)):  # a retry would end alike
            return f"orch cancel {self.run_id[:8]}: its source {self.source_state}"
        return None


@dataclass
class Status:
    counts: dict[str, int]  # every state, 0 where no run is in it
    running: list[Running]
    pilots: list = field(default_factory=list)  # slurm.Pilot: this user's pilot jobs, where Slurm is installed
    queue_eta: QueueEta | None = None  # when the queue should be empty, and how that was estimated
    waiting: list[Waiting] = field(default_factory=list)  # queued runs held back by the run they start from


def eta_s(run: Run) -> float | None:
    """Seconds left for a running run: the tokens of its remaining steps at its current tokens/s."""
    return progress.eta_s(run.step, run.total_steps, run.tokens_per_s, progress.tokens_per_step(run.config))


def status(db: Db = None, *, pilots: bool = True) -> Status:
    """Queued / running / done counts, each running run's step, loss, tokens/s and ETA, the whole queue's ETA
    (progress.queue_eta: from the running runs' ETAs and the durations of finished runs of the queued runs'
    experiments), and Slurm pilots (`pilots=False` skips the squeue call: a refreshing view asks Slurm less
    often than the database)."""
    from orchestrator import slurm

    engine = connect(db)
    counts = queries.counts(engine)
    now = queries.now(engine)
    running = [
        Running(
            r.id,
            e,
            a,
            r.seed,
            r.step,
            r.total_steps,
            r.train_loss,
            r.tokens_per_s,
            eta_s(r),
            r.worker,
            max(0.0, now - r.started_at) if r.started_at is not None else None,
        )
        for e, a, r in queries.running(engine)
    ]
    queue_eta = progress.queue_eta(
        [progress.Busy(r.experiment, r.eta_s, r.elapsed_s) for r in running],
        [experiment for _, experiment in queries.queued(engine)],
        queries.durations(engine),
    )
    waiting = [Waiting(*w) for w in queries.waiting(engine)]
    return Status(
        {str(s): counts.get(s, 0) for s in RunState}, running, slurm.pilots() if pilots else [], queue_eta, waiting
    )

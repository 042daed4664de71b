"""Runs and the queue: submit an experiment, run a worker, and look at, cancel or retry runs."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from orchestrator import dependencies, progress, queries, queue, specs, states
from orchestrator.api.connection import RUN_PREFIX, at_least, check_data, connect, refuse_password
from orchestrator.db import Run
from orchestrator.progress import QueueEta
from orchestrator.queries import Member
from orchestrator.states import RunState
from orchestrator.tracking import open_tracker

if TYPE_CHECKING:
    from orchestrator.plan import Plan

Db = str | Engine | None


@dataclass
class Submitted:
    """What a submit (or a noise study, or a sweep's confirmation) queued and what it reused."""

    experiment: str
    queued: list[specs.RunSpec] = field(default_factory=list)
    reused: list[tuple[specs.RunSpec, str]] = field(default_factory=list)  # (run, its current state)
    runs: list[specs.RunSpec] = field(default_factory=list)  # every run of the experiment, queued or not
    identical: list[tuple[str, str]] = field(default_factory=list)  # arms that are the same runs at this preset
    dry_run: bool = False
    plan: Plan | None = None  # how --seeds auto chose the seeds per arm

    @classmethod
    def of(cls, experiment: str, report: queue.SubmitReport) -> Submitted:
        return cls(experiment, report.queued, report.reused)

    def __str__(self) -> str:
        if self.dry_run:
            counts = f"would queue {len(self.queued)}, reuse {len(self.reused)}"
            return f"{self.experiment}: {counts} (dry run: nothing written)"
        return f"{self.experiment}: {len(self.queued)} queued, {len(self.reused)} reused"


def submit(
    path: str | Path,
    *,
    preset: str | None = None,
    seeds: int | str | None = None,
    overrides: dict | None = None,
    dry_run: bool = False,
    check_data_here: bool = True,
    effect: float | None = None,
    power: float | None = None,
    sigma: float | None = None,
    db: Db = None,
) -> Submitted:
    """Queue an experiment file's runs; runs that exist already (same config, seed, repeat) are reused. Each
    data.path is checked first (shard headers, evaluation slices) unless `check_data_here` is False.

    `seeds`: per arm, overriding the file; "auto" (with `effect`) takes the paired count of `plan` for the
    file's experiment: the seeds per arm that detect a true improvement `effect` (test-loss nats) with `power`
    (default 0.8), from the σ the database measured for it or `sigma` (orchestrator/plan.py); `.plan` says how."""
    seeds = _seeds(seeds)
    if seeds != "auto" and (effect, power, sigma) != (None, None, None):
        given = [f"--{k}" for k, v in dict(effect=effect, power=power, sigma=sigma).items() if v is not None]
        raise ValueError(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} for --seeds auto only: add --seeds auto "
            f"(seeds planned for that effect), or drop {' and '.join(given)}"
        )
    if seeds == "auto":
        from orchestrator import plan as plan_

        if effect is None:
            raise ValueError(
                "--seeds auto needs --effect, the true improvement to detect in test-loss nats: e.g. "
                "--seeds auto --effect 0.01 (or give a number: --seeds 3)"
            )
        plan_.check(effect, 0.8 if power is None else power, 0.05, sigma, "holm")
    refuse_password(db)
    exp = specs.load_experiment(path)
    plan = None
    if seeds == "auto":
        plan = _auto_seeds(exp, path, effect, 0.8 if power is None else power, sigma, db)
        seeds = plan.paired.n
    runs = specs.expand(exp, source=str(path), preset=preset, seeds=seeds, overrides=overrides or {})
    if check_data_here:
        check_data([r.config for r in runs])
    # A run id in run.init_from: a run of this submission or of the database (a dry run creates none).
    dependencies.check_sources(runs, lambda: _existing_db(db) if dry_run else connect(db, create=True))
    out = Submitted(exp.name, runs=runs, identical=specs.identical_arms(runs), dry_run=dry_run, plan=plan)
    if dry_run:  # the same sorting as submit's, over the runs the database holds: the same counts
        report = queue.sort_submission(runs, _existing_states(db, [r.id for r in runs]))
    else:
        report = queue.submit(connect(db, create=True), exp, runs, source=str(path))
    out.queued, out.reused = report.queued, report.reused
    return out


def _existing_states(db: Db, ids: list[str]) -> dict[str, str]:
    """id -> state of those runs the database holds, for a dry run, which must not create a database: where
    there is none yet (no SQLite file, or no orch schema), none (a submit would create it and queue them all).
    A database that cannot be reached or used fails here as it would for a submit."""
    import sqlalchemy as sa

    from orchestrator import migrations
    from orchestrator.db import resolve_url

    if not isinstance(db, Engine):
        try:
            url = sa.engine.make_url(resolve_url(db))
        except (sa.exc.ArgumentError, ValueError):
            url = None  # connect() below says what is wrong with it
        if url is not None and url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            path = Path(url.database)
            if not path.exists() or (path.is_file() and path.stat().st_size == 0):
                return {}
        if migrations.current(connect(db, check_schema=False)) is None:
            return {}
    return {r.id: r.state for r in queries.runs(connect(db), ids)}


def _existing_db(db: Db) -> Engine | None:
    """The database, if there is one."""
    from orchestrator.db import SchemaError

    try:
        return connect(db)
    except SchemaError:
        return None


def _seeds(seeds: int | str | None) -> int | str | None:
    """--seeds: a number of seeds per arm (as text from the command line, too), "auto", or None (the file's)."""
    if seeds is None or seeds == "auto":
        return seeds
    if isinstance(seeds, str):
        try:
            seeds = int(seeds.strip())
        except ValueError:
            raise ValueError(
                f"--seeds takes a number of seeds per arm or auto, e.g. --seeds 3 or --seeds auto --effect 0.01, "
                f"not {seeds!r}"
            ) from None
    at_least("--seeds", seeds, example="3")
    return seeds


def _auto_seeds(exp: specs.Experiment, path: str | Path, effect: float, power: float, sigma: float | None, db: Db):
    """The plan behind --seeds auto: from the runs the database measured for the experiment, or --sigma alone
    when it has none (no database at all, even: a dry run must not create one)."""
    from orchestrator import plan as plan_
    from orchestrator.db import SchemaError

    arms = [i.name for i in exp.interventions]
    try:
        engine = connect(db)
    except SchemaError:
        if sigma is None:
            raise
        engine = None
    if engine is not None and exp.name in queries.experiment_names(engine):
        measured = plan_.measure(engine, exp.name, arms)
    elif sigma is not None:
        measured = plan_.Measured(exp.name, exp.vary, interventions=arms)
    else:
        raise ValueError(
            f"--seeds auto plans from the runs the database measured for experiment {exp.name!r}, and it has "
            f"none: run `orch submit {path} --seeds 2` (then `orch worker`) first, or pass --sigma, e.g. --sigma 0.01"
        )
    plan = plan_.make(measured, effect, power, sigma=sigma, fix=f"orch submit {path} --seeds 2")
    if plan.paired.n is None:
        raise ValueError(
            f"--seeds auto: an improvement of {effect:g} needs {plan.paired.seeds} seeds per arm at σ_d "
            f"{plan.sigma_d:.4g}; plan for a larger --effect (see `orch plan {exp.name} --effect ...`)"
        )
    return plan


@dataclass
class WorkerReport:
    name: str
    finished: int


def worker(
    *,
    gpus: str | Sequence[str] | None = None,
    gpus_per_run: int = 1,
    nproc_per_node: int = 1,
    parallel: int = 1,
    until_empty: bool = False,
    runs_dir: str | Path = "runs",
    heartbeat: float = 5.0,
    grace: float = 60.0,
    mlflow: str | None = None,
    track: bool = True,
    slurm_requeue: bool = False,
    nodes: int | None = None,
    db: Db = None,
    echo: Callable[[str], None] = print,
) -> WorkerReport:
    """Claim queued runs and train them, one per free GPU slot (all GPUs unless `gpus` lists some; none: CPU
    slots, `parallel` of them), until stopped or, with `until_empty`, until nothing is queued or running.

    `nodes` (default: $SLURM_JOB_NUM_NODES inside a Slurm allocation, else 1): above 1, the worker has one slot
    spanning that many nodes of its allocation and claims only runs asking for as many (launchers/slurm.py);
    each node trains one rank per GPU of the slot, or `nproc_per_node` CPU ranks."""
    if nodes is None:
        found = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or "1"
        nodes = int(found) if found.isdigit() else 1
    at_least("--nodes", nodes, example="2")
    allocated = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if nodes > 1 and not (allocated and allocated.isdigit() and int(allocated) >= nodes):
        # Refused here, not at each launch: outside such an allocation every claimed run would fail to start.
        raise ValueError(
            f"--nodes {nodes} needs a Slurm allocation of at least {nodes} nodes (this process has "
            f"{allocated or 'none'}): run it inside `salloc -N {nodes}`, or use `orch slurm workers "
            f"--nodes-per-job {nodes}`"
        )
    at_least("--gpus-per-run", gpus_per_run, example="2")
    at_least("--nproc-per-node", nproc_per_node, example="2")
    at_least("--parallel", parallel, example="2")
    if not heartbeat > 0:
        raise ValueError(f"--heartbeat must be a positive number of seconds, not {heartbeat:g}; e.g. --heartbeat 5")
    if not grace > heartbeat:
        raise ValueError(
            f"--grace ({grace:g} s) must be longer than --heartbeat ({heartbeat:g} s), or live runs "
            f"would be requeued between two beats; e.g. --grace {max(60, 12 * heartbeat):g}"
        )
    if isinstance(gpus, str):
        text = gpus.replace(" ", "")
        gpus = [] if text.lower() in ("none", "cpu") else [g for g in text.split(",") if g]  # none: CPU slots
        if not all(g.isdigit() for g in gpus) or len(set(gpus)) < len(gpus):
            raise ValueError(
                f"--gpus takes distinct GPU indices separated by commas, e.g. --gpus 0,1,2,3; got {text!r}"
            )
    refuse_password(db)
    from orchestrator.node import detect_gpus, plan_slots
    from orchestrator.worker import Worker

    gpu_list = list(gpus) if gpus is not None else detect_gpus()
    # Over several nodes: one slot of every GPU this node has (each node the same), or one CPU slot.
    slots = plan_slots(gpu_list, len(gpu_list) or 1, 1) if nodes > 1 else plan_slots(gpu_list, gpus_per_run, parallel)
    engine = connect(db, create=True)
    w = Worker(
        engine,
        runs_dir=runs_dir,
        slots=slots,
        nproc_per_node=nproc_per_node,
        nodes=nodes,
        tracker=open_tracker(mlflow, track),
        heartbeat_s=heartbeat,
        grace_s=grace,
        echo=echo,
    )
    where = f"{len(slots)} GPU slot(s)" if gpu_list else f"{len(slots)} CPU slot(s)"
    if nodes > 1:
        where = f"one slot over {nodes} nodes ({len(gpu_list) or nproc_per_node} rank(s) per node), {nodes}-node runs"
    echo(f"worker {w.name}: {where}" + (", until the queue is empty" if until_empty else ""))
    finished = w.run(until_empty=until_empty)
    # A Slurm pilot warned of its walltime has handed its runs back; while work remains, it comes back.
    if slurm_requeue and w.warned and queries.claimable(engine, nodes=nodes):
        from orchestrator import slurm

        slurm.requeue_self(echo)
    return WorkerReport(w.name, finished)


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


def known_experiments(engine: Engine, names: Sequence[str]) -> list[str]:
    """The experiments in the database; ValueError naming them if any of `names` is not one."""
    known = queries.experiment_names(engine)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"no experiment named {', '.join(map(repr, unknown))}; known: {', '.join(known) or 'none'}")
    return known


def ls(experiments: Sequence[str] | None = None, *, state: str | None = None, db: Db = None) -> list[Member]:
    """Runs as (experiment, arm, run), of the named experiments (default: all), optionally in one state."""
    names = [str(s) for s in RunState]
    if state is not None and state not in names:
        raise ValueError(f"--state must be one of {', '.join(names)}, not {state!r}")
    engine = connect(db)
    if experiments:
        known_experiments(engine, experiments)
    return [m for m in queries.runs_of(engine, experiments) if state is None or m.run.state == state]


def find_run(prefix: str, *, db: Db = None) -> Run:
    """The one run whose id starts with `prefix`."""
    if not RUN_PREFIX.fullmatch(prefix):
        raise ValueError(f"{prefix!r} is not a run id or a prefix of one (hex digits, e.g. 3f2a; see `orch ls`)")
    matches = queries.find(connect(db), prefix)
    if not matches:
        raise ValueError(f"no run id starts with {prefix!r} (see `orch ls`)")
    if len(matches) > 1:
        raise ValueError(f"{prefix!r} matches {len(matches)} runs; give more of the id")
    return matches[0]


@dataclass
class Log:
    run: str
    state: str
    path: Path
    text: str | None  # the last lines of the trainer's log; None where there is none yet
    error: str | None  # the stored error of a failed run
    node: str | None = None  # where its latest launch trained
    slurm_job: str | None = None


def logs(run: str, *, lines: int = 50, db: Db = None) -> Log:
    """The trainer's log of a run (a unique id prefix is enough), and its error if it failed."""
    at_least("-n", lines, example="50")
    r = find_run(run, db=db)
    path = Path(r.run_dir or f"runs/{r.id}") / "train.log"
    text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else None
    return Log(r.id, r.state, path, text, r.error, r.node, r.slurm_job)


@dataclass
class CancelReport:
    cancelled: list[str]
    already_final: int  # asked for, but finished already
    kept: dict[str, list[str]]  # run → the other experiments that share it, left running for them


def cancel(target: str, *, include_shared: bool = False, db: Db = None) -> CancelReport:
    """Cancel the queued and running runs of an experiment, or of a run id prefix (running trainers
    checkpoint and stop). An experiment's runs that other experiments share (the same config, trained once
    for all) are kept unless `include_shared`: cancelling one study must not take the baseline from under
    another."""
    engine = connect(db)
    runs = [m.run for m in queries.runs_of(engine, [target])]
    ids = [r.id for r in runs]
    kept: dict[str, list[str]] = {}
    if ids and not include_shared:
        active = {r.id for r in runs if r.state in states.ACTIVE}
        kept = {i: names for i, names in queries.shared(engine, ids, target).items() if i in active}
        ids = [i for i in ids if i not in kept]
    elif not ids:
        ids = [r.id for r in queries.find(engine, target)] if RUN_PREFIX.fullmatch(target) else []
        if not ids:
            raise ValueError(f"no run or experiment matches {target!r} (see `orch ls`)")
    done = queue.cancel(engine, ids).done
    return CancelReport(done, len(ids) - len(done), kept)


def retry(run: str, *, db: Db = None) -> str:
    """Requeue a failed, diverged, cancelled or pruned run with its attempts reset; return its id."""
    r = find_run(run, db=db)
    moves = queue.retry(connect(db), [r.id])
    if moves.refused:
        raise ValueError(str(moves.refused[0]))
    return r.id


@dataclass
class SyncReport:
    synced: int
    pending: list[tuple[str, str]]  # (run, why MLflow does not have it yet)


def sync(*, runs_dir: str | Path = "runs", mlflow: str | None = None, db: Db = None) -> SyncReport:
    """Send MLflow whatever it is missing of finished runs (after an outage, or runs trained without
    tracking); workers do this by themselves, this does it now. Safe beside running workers."""
    from orchestrator import outbox

    engine = connect(db)
    box = outbox.Outbox(engine, open_tracker(mlflow), f"sync:{socket.gethostname()}:{os.getpid()}", runs_dir)
    return SyncReport(*outbox.sync_all(box))


def ui(
    experiment: str | None = None,
    *,
    port: int = 5000,
    mlflow: str | None = None,
    echo: Callable[[str], None] = print,
    in_process: bool = False,
) -> int:
    """Serve the MLflow UI on 127.0.0.1 over the same tracking store until stopped; return its exit code.
    Prints the URL of the experiment's runs page (without one, of every experiment holding orch runs): model
    training rather than MLflow's GenAI pages, in orch's saved view (tracking.py). One light server process
    (tracking.ui_server). A tracking server as the store (http://…) is served already: its URLs, nothing
    started. `in_process`: run MLflow's server command in this process rather than in a child (`orch ui`:
    faster to start, and no orch process waits beside the server)."""
    from urllib.parse import urlsplit, urlunsplit

    from orchestrator import tracking

    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, not {port}")
    uri = tracking.resolve_uri(mlflow)
    remote = uri.startswith(("http://", "https://"))
    parts = urlsplit(uri)
    if parts.password:  # $ORCH_MLFLOW may hold one: never on the screen
        uri_shown = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
    else:
        uri_shown = uri
    if remote:  # the server's own pages, without the credentials
        base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")
    else:
        base = f"http://127.0.0.1:{port}"
    pages = tracking.Tracker(uri).ui_pages(experiment)
    if experiment is not None:
        echo(f"MLflow UI for {uri_shown}, experiment {experiment}: {tracking.runs_url(base, pages[0][1])}")
    else:
        echo(f"MLflow UI for {uri_shown} at {tracking.experiments_url(base)}")
        width = max((len(name) for name, _ in pages), default=0)
        for name, exp_id in pages:
            echo(f"  {name:<{width}}  {tracking.runs_url(base, exp_id)}")
    if remote:
        return 0
    if in_process:
        return tracking.serve_ui(uri, port)
    cmd, env = tracking.ui_server(uri, port)
    return subprocess.call(cmd, env=env)


def upgrade(db: Db = None) -> tuple[str | None, str]:
    """Migrate a database written by an older orch to this version's schema: (revision before, after)."""
    from orchestrator import migrations

    return migrations.upgrade(connect(db, check_schema=False))

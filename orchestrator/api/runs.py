"""Runs and the queue: run a worker, and list, find, read the logs of, cancel or retry runs; sync MLflow,
serve its UI, upgrade the database. Submitting is submitting.py's, the queue's status monitoring.py's."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from orchestrator import queries, queue, states
from orchestrator.api.connection import RUN_PREFIX, at_least, connect, refuse_password
from orchestrator.db import Run
from orchestrator.queries import Member
from orchestrator.states import RunState
from orchestrator.tracking import open_tracker

Db = str | Engine | None


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
    training rather than MLflow's GenAI pages, in orch's saved view (mlflow_ui.py). One light server process
    (mlflow_ui.ui_server). A tracking server as the store (http://…) is served already: its URLs, nothing
    started. `in_process`: run MLflow's server command in this process rather than in a child (`orch ui`:
    faster to start, and no orch process waits beside the server)."""
    from urllib.parse import urlsplit, urlunsplit

    from orchestrator import mlflow_ui, tracking

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
        echo(f"MLflow UI for {uri_shown}, experiment {experiment}: {mlflow_ui.runs_url(base, pages[0][1])}")
    else:
        echo(f"MLflow UI for {uri_shown} at {mlflow_ui.experiments_url(base)}")
        width = max((len(name) for name, _ in pages), default=0)
        for name, exp_id in pages:
            echo(f"  {name:<{width}}  {mlflow_ui.runs_url(base, exp_id)}")
    if remote:
        return 0
    if in_process:
        return mlflow_ui.serve_ui(uri, port)
    cmd, env = mlflow_ui.ui_server(uri, port)
    return subprocess.call(cmd, env=env)


def upgrade(db: Db = None) -> tuple[str | None, str]:
    """Migrate a database written by an older orch to this version's schema: (revision before, after)."""
    from orchestrator import migrations

    return migrations.upgrade(connect(db, check_schema=False))

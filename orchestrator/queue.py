"""Every write of a stored run: each one short transaction, conditioned on the state it leaves (states.py's
table). Runs are created by submission.py (submit, import); from then on they change only here.

The state machine itself is states.MOVES; this module makes every move of a stored run. Each state change
names its event, updates only rows in one of the event's source states, and sets the event's target state
(`_move`); a user's request that the table refuses (`orch retry` of a succeeded run) comes back as
states.IllegalMove. A final run is never modified except by an explicit retry. Claiming is the one contended
transition: on PostgreSQL the candidate rows are locked with FOR UPDATE SKIP LOCKED, so concurrent claimers
take different rows without waiting (procrastinate's design); on SQLite the whole transaction holds the write
lock from BEGIN IMMEDIATE (db.py), and the state condition guards the rest. Either way each run is claimed by
exactly one worker.

Attempts count crashes, never preemptions. A launch counts one when its trainer is actually started
(start), and an ending that says "preempted" (the trainer checkpointed: SIGTERM, STOP, Slurm's warning, or
the death of its launcher) gives it back; a claim that never got to start a trainer costs nothing. When the
worker that would have recorded an ending died, the run goes stale and is requeued with that launch still
open (`open_launch`); the next launcher reads that launch's own result.json and records what it says
(judge_lost) before it starts its own: a preemption costs nothing, a launch that left no ending was a crash.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from orchestrator import dependencies
from orchestrator.db import Run, db_now
from orchestrator.states import Event, IllegalMove, RunState, ending_event, stored_sources, target
from trainer.rundir import Status


def _in(event: Event):
    """SQL: the run is in a state that `event` may leave."""
    return Run.state.in_(stored_sources(event))


def _move(conn: Connection | Session, event: Event, where, **values) -> list[str]:
    """The one UPDATE that changes runs' state: those matching `where` and in one of `event`'s source states
    take its target state. Returns the ids moved."""
    return list(
        conn.execute(
            sa.update(Run)
            .where(where, _in(event))
            .values(state=str(target(event)), **values)
            .returning(Run.id)
            .execution_options(synchronize_session=False)
        )
        .scalars()
        .all()
    )


@dataclass
class Moves:
    """What a user's state change did: the runs moved, and per run refused, why (the table's own words)."""

    done: list[str] = field(default_factory=list)
    refused: list[IllegalMove] = field(default_factory=list)


def claim(engine: Engine, worker: str, limit: int = 1, skip: Collection[str] = (), nodes: int = 1) -> list[Run]:
    """Atomically move up to `limit` queued runs to running for this worker and return them; never one of
    `skip` (runs this worker has found it cannot train: their checkpoints are on another host). Only runs
    asking for exactly `nodes` nodes (the worker's span): a one-node worker never takes a two-node run, and a
    two-node pilot never spends its allocation on a one-node run."""
    with Session(engine, expire_on_commit=False) as conn, conn.begin():
        # Two statements: the SELECT locks (and skips locked) candidate rows; the UPDATE takes them. (One
        # UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED) can take more than n rows on
        # PostgreSQL, which may re-run the subquery.)
        candidates = (
            conn.execute(
                sa.select(Run.id)
                .where(_in(Event.CLAIM), Run.nodes == nodes, Run.id.not_in(list(skip)) if skip else sa.true())
                .where(dependencies.ready())  # a run starting from another waits until that one has succeeded
                .order_by(Run.priority.desc(), Run.created_at, Run.id)
                .limit(limit)
                .with_for_update(skip_locked=True)  # SQLite ignores this; BEGIN IMMEDIATE serialises
            )
            .scalars()
            .all()
        )
        if not candidates:
            return []
        now = db_now()
        ids = _move(
            conn,
            Event.CLAIM,
            Run.id.in_(candidates),
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            finished_at=None,
            exit_code=None,
            stop=None,
            launches=Run.launches + 1,
        )
        if not ids:
            return []
        rows = conn.execute(sa.select(Run).where(Run.id.in_(ids))).scalars().all()
        return sorted(rows, key=lambda r: (-r.priority, r.created_at, r.id))


def finite(obj):
    """JSON-safe: NaN and infinities (a diverged run's losses) become None. PostgreSQL's json type refuses
    them, where SQLite would store them silently."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


@dataclass
class Beat:
    """What a heartbeat learnt: per run still ours, its stop request (request_stop) or None; per run taken
    away, why: "cancelled", or "taken over" (requeued after our beats stopped arriving in time, perhaps
    already claimed by another worker)."""

    owned: dict[str, str | None] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)


def _ours(run_id: str, worker: str):
    return (Run.id == run_id) & (Run.worker == worker) & (Run.state == str(RunState.RUNNING))


def heartbeat(engine: Engine, worker: str, progress: dict[str, dict]) -> Beat:
    """Beat for each of this worker's runs (with its progress columns: progress.Progress.columns()). A run
    taken away must have its trainer stopped; only a cancelled one is this worker's to close in MLflow
    (outbox.py decides by the state). Progress is not a state change: no event."""
    beat = Beat()
    with engine.begin() as conn:
        for run_id, fields in progress.items():
            stop = conn.execute(
                sa.update(Run)
                .where(_ours(run_id, worker))
                .values(heartbeat_at=db_now(), **finite(fields))
                .returning(Run.stop)
            ).first()
            if stop is not None:
                beat.owned[run_id] = stop[0]
            else:
                state = conn.execute(sa.select(Run.state).where(Run.id == run_id)).scalar()
                beat.lost[run_id] = "cancelled" if state == RunState.CANCELLED else "taken over"
    return beat


def request_stop(engine: Engine, run_ids: Iterable[str], reason: str = Status.PRUNED.value) -> list[str]:
    """Ask the workers of running runs to stop them (through the trainer's STOP file) with this reason; the
    worker records the ending as usual. Only a run that the reason's event may leave is asked.

    The database carries the request, so whoever asks (a sweep on another machine) needs no access to
    the run directories."""
    event = Event.PRUNE if reason == Status.PRUNED else Event.PREEMPT
    with engine.begin() as conn:
        return list(
            conn.execute(
                sa.update(Run).where(Run.id.in_(list(run_ids)), _in(event)).values(stop=reason).returning(Run.id)
            ).scalars()
        )


def requeue_stale(engine: Engine, grace_s: float, except_worker: str | None = None) -> list[str]:
    """Runs whose worker has not beaten for `grace_s` seconds go back to the queue (lose), their launch left open.

    Whether that launch used up an attempt is not known here: its trainer may have checkpointed and ended
    as preempted after its worker died. The next launcher reads its result.json and decides (judge_lost).
    A worker never reaps its own runs (`except_worker`): it is alive, only late.
    """
    with engine.begin() as conn:
        stale = Run.heartbeat_at < db_now() - grace_s
        if except_worker is not None:
            stale = stale & (Run.worker != except_worker)
        return _move(conn, Event.LOSE, stale, worker=None)


def start(engine: Engine, run: Run, worker: str, node: str | None = None, slurm_job: str | None = None) -> bool:
    """This claim's trainer is about to start on `node` (in `slurm_job`): count the attempt and open the
    launch. False if the run is no longer ours, or an earlier launch is still open (judge_lost it first).
    Not a state change."""
    with engine.begin() as conn:
        ok = conn.execute(
            sa.update(Run)
            .where(_ours(run.id, worker), Run.open_launch.is_(None))
            .values(attempts=Run.attempts + 1, open_launch=Run.launches, node=node, slurm_job=slurm_job)
            .returning(Run.attempts)
        ).scalar()
    if ok is None:
        return False
    run.attempts, run.open_launch, run.node, run.slurm_job = ok, run.launches, node, slurm_job
    return True


def judge_lost(engine: Engine, run: Run, worker: str, ending: dict | None) -> str | None:
    """Account for a launch that a dead worker left open (run.open_launch, before this claim starts its own),
    from what that launch wrote.

    `ending` is its result.json (None if it wrote none, or one of another launch). Returns "launch" when this
    claim should go ahead; the state the run took instead (the lost launch's own ending: it finished after
    all; or failed, a crash with no attempts left); or None when the run is no longer ours."""
    n = run.open_launch
    if n is None:
        return "launch"
    status = (ending or {}).get("status")
    if status in (Status.SUCCEEDED, Status.DIVERGED, Status.PRUNED, Status.FAILED):  # it ended after its worker died
        return finish(
            engine, run.id, worker, status, result=ending, exit_code=ending.get("exit_code"), error=ending.get("error")
        )
    if status != Status.PREEMPTED and run.attempts >= run.max_attempts:  # a crash, and it was the last attempt
        return finish(
            engine,
            run.id,
            worker,
            Status.FAILED,
            error=f"launch {n} ended without a result after its "
            f"worker stopped heartbeating; no attempts left (of {run.max_attempts})",
            count=False,
        )
    refund = 1 if status == Status.PREEMPTED else 0  # checkpointed: the attempt it used is given back
    with engine.begin() as conn:
        done = conn.execute(
            sa.update(Run)
            .where(_ours(run.id, worker), Run.open_launch == n)
            .values(attempts=Run.attempts - refund, open_launch=None)
            .returning(Run.attempts)
        ).scalar()
        if done is None:  # judged already (a retry after a database error), or no longer ours
            return "launch" if conn.execute(sa.select(Run.id).where(_ours(run.id, worker))).first() else None
    run.attempts, run.open_launch = done, None
    return "launch"


def finish(
    engine: Engine,
    run_id: str,
    worker: str,
    status: str,
    *,
    result: dict | None = None,
    exit_code: int | None = None,
    error: str | None = None,
    count: bool = True,
) -> str | None:
    """Record how an attempt ended; return the run's new state (None if the run was no longer ours).

    status is the trainer's (succeeded, diverged, pruned, preempted, or failed for a bad config or missing
    data, which no retry can fix) or "failed" for a crash. A preempted attempt goes back to the queue
    without using up an attempt; a crash is retried while attempts remain (`count=False`: fail now).
    """
    with engine.begin() as conn:
        run = conn.execute(
            sa.select(Run.attempts, Run.max_attempts, Run.stop, Run.open_launch)
            .where(_ours(run_id, worker))
            .with_for_update()
        ).first()
        if run is None:
            return None
        try:
            ending = Status(status)
        except ValueError:  # a result.json this trainer version would not write: not an ending to trust
            ending = Status.FAILED
        event = _ending(ending, run, count, result)
        values: dict = dict(
            exit_code=exit_code, open_launch=None, worker=None if event in (Event.PREEMPT, Event.CRASH) else worker
        )
        started = run.open_launch is not None  # its attempt was counted by start()
        if result is not None:
            result = finite(result)
            values.update(
                result=result,
                test_loss=result.get("test_loss"),
                step=result.get("step"),
                train_loss=result.get("train_loss"),
                tokens_per_s=result.get("tokens_per_s"),
            )
        if error is not None:
            values["error"] = error
        if event == Event.PREEMPT:
            values["attempts"] = run.attempts - (1 if started else 0)
        elif event in (Event.CRASH, Event.FAIL):
            values["attempts"] = run.attempts + (0 if started else 1)  # one that failed before its start counts too
        if target(event) != RunState.QUEUED:
            values["finished_at"] = db_now()
        _move(conn, event, _ours(run_id, worker), **values)
        return str(target(event))


def _ending(status: Status, run, count: bool, result: dict | None) -> Event:
    """The event an attempt's ending is for its run, with the accounting: a prune request outlives the
    preemption or crash that ended the attempt; a crash is retried while attempts remain and the trainer did
    not say that no retry can fix it."""
    if run.stop == Status.PRUNED and status in (Status.PREEMPTED, Status.FAILED):
        return Event.PRUNE
    if status == Status.PREEMPTED:
        return Event.PREEMPT
    if status == Status.FAILED:
        attempts = run.attempts + (0 if run.open_launch is not None else 1)
        if count and attempts < run.max_attempts and (result or {}).get("retryable", True):
            return Event.CRASH
        return Event.FAIL
    return ending_event(status)


def set_mlflow_run(engine: Engine, run_id: str, mlflow_run_id: str) -> str:
    """Record the run's MLflow id unless one is recorded already; return the one on record (stable for
    the run's life, whichever worker or outage comes between)."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(Run).where(Run.id == run_id, Run.mlflow_run_id.is_(None)).values(mlflow_run_id=mlflow_run_id)
        )
        return conn.execute(sa.select(Run.mlflow_run_id).where(Run.id == run_id)).scalar_one()


def set_tracked(engine: Engine, run_id: str, state: str) -> None:
    """MLflow now holds the whole of this finished run (outbox.py); bookkeeping, not a state change."""
    with engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id, Run.state == state).values(tracked=state))


def cancel(engine: Engine, run_ids: Iterable[str]) -> Moves:
    """Queued or running → cancelled. A running run's worker notices at its next heartbeat and stops it."""
    return _user_move(engine, Event.CANCEL, list(run_ids), finished_at=db_now())


def retry(engine: Engine, run_ids: Iterable[str]) -> Moves:
    """A finished run that did not succeed goes back to the queue with its attempts reset."""
    return _user_move(
        engine, Event.RETRY, list(run_ids), attempts=0, worker=None, finished_at=None, open_launch=None, tracked=None
    )


def _user_move(engine: Engine, event: Event, run_ids: list[str], **values) -> Moves:
    """A state change a user asked for, run by run: moved, or refused with the table's reason."""
    out = Moves()
    with engine.begin() as conn:
        for chunk in chunks(run_ids, 500):
            out.done += _move(conn, event, Run.id.in_(chunk), **values)
        moved = set(out.done)
        for chunk in chunks([i for i in run_ids if i not in moved], 500):
            for rid, state in conn.execute(sa.select(Run.id, Run.state).where(Run.id.in_(chunk))).all():
                out.refused.append(IllegalMove(RunState(state), event, rid))
    return out


def chunks(items: list, n: int):
    """`items` in slices of at most `n`: one statement's parameters stay within the database's limits (also
    submission.py's)."""
    for i in range(0, len(items), n):
        yield items[i : i + n]

"""Every state transition of a run, each one short transaction conditioned on the state it leaves.

    queued ──claim──▶ running ──finish──▶ succeeded | diverged | pruned | failed (attempts used up)
       ▲                 │  └─ preempted, or failed with attempts left ─▶ queued
       └─ stale heartbeat┘
    queued | running ──cancel──▶ cancelled        failed | diverged | cancelled | pruned ──retry──▶ queued

A finished run is never modified except by an explicit retry (Optuna's storage contract). Claiming is the
one contended transition: on PostgreSQL the candidate rows are locked with FOR UPDATE SKIP LOCKED, so
concurrent claimers take different rows without waiting (procrastinate's design); on SQLite the whole
transaction holds the write lock from BEGIN IMMEDIATE (db.py), and `state = 'queued'` in the UPDATE
guards the rest. Either way each run is claimed by exactly one worker.

Attempts count crashes, never preemptions. A launch counts one when its trainer is actually started
(start), and an ending that says "preempted" (the trainer checkpointed: SIGTERM, STOP, Slurm's warning, or
the death of its launcher) gives it back; a claim that never got to start a trainer costs nothing. When the
worker that would have recorded an ending died, the run goes stale and is requeued with that launch still
open (`open_launch`); the next launcher reads that launch's own result.json and records what it says
(judge_lost) before it starts its own: a preemption costs nothing, a launch that left no ending was a crash.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator.db import Experiment as ExperimentRow
from orchestrator.db import Lease, Membership, Run, db_now
from orchestrator.specs import Experiment, Intervention, Looks, RunSpec

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, DIVERGED, CANCELLED, PRUNED = "succeeded", "failed", "diverged", "cancelled", "pruned"
FINAL = (SUCCEEDED, FAILED, DIVERGED, CANCELLED, PRUNED)
ACTIVE = (QUEUED, RUNNING)


@dataclass
class SubmitReport:
    queued: list[RunSpec] = field(default_factory=list)
    reused: list[tuple[RunSpec, str]] = field(default_factory=list)  # (run, its current state)


def submit(engine: Engine, exp: Experiment, runs: Sequence[RunSpec], source: str | None = None,
           max_attempts: int = 3, priority: int = 0) -> SubmitReport:
    """Queue the runs that do not exist yet and record the experiment's membership of all of them."""
    report = SubmitReport()
    with engine.begin() as conn:
        existing: dict[str, str] = {}
        ids = [r.id for r in runs]
        for chunk in _chunks(ids, 500):
            existing.update(conn.execute(sa.select(Run.id, Run.state).where(Run.id.in_(chunk))).all())
        members = set(conn.execute(sa.select(Membership.arm, Membership.run_id)
                                   .where(Membership.experiment == exp.name)).all())
        now = conn.execute(sa.select(db_now())).scalar_one()
        new_runs, new_members = [], []
        for r in runs:
            if r.id in existing:
                report.reused.append((r, existing[r.id]))
            else:
                new_runs.append(dict(id=r.id, state=QUEUED, config=r.config.model_dump(mode="json"), seed=r.seed,
                                     data_seed=r.data_seed, repeat=r.repeat, priority=priority, attempts=0,
                                     max_attempts=max_attempts, created_at=now + len(new_runs) * 1e-6))
                report.queued.append(r)
                existing[r.id] = QUEUED
            if (r.arm, r.id) not in members:
                new_members.append(dict(experiment=exp.name, arm=r.arm, run_id=r.id))
                members.add((r.arm, r.id))
        for chunk in _chunks(new_runs, 500):
            conn.execute(sa.insert(Run), chunk)
        for chunk in _chunks(new_members, 500):
            conn.execute(sa.insert(Membership), chunk)
        # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises): a concurrent more-seeds
        # must not have its looks overwritten by this submit's spec.
        exists = conn.execute(sa.select(ExperimentRow.spec, ExperimentRow.source)
                              .where(ExperimentRow.name == exp.name).with_for_update()).first()
        if exists and (stored := (exists.spec or {}).get("looks")):
            # Looks already taken stay on record: a resubmitted file must not turn sequential verdicts
            # back into fixed-sample ones.
            exp = exp.model_copy(update={"looks": Looks.model_validate(stored).union(exp.looks)})
        row = dict(description=exp.description, spec=exp.model_dump(mode="json"), source=source)
        if exists:
            row["source"] = source or exists.source  # a spec change keeps where it first came from
        if exists:
            conn.execute(sa.update(ExperimentRow).where(ExperimentRow.name == exp.name).values(**row))
        else:
            conn.execute(sa.insert(ExperimentRow).values(name=exp.name, created_at=now, **row))
    if engine.dialect.name == "postgresql" and len(report.queued) >= 1000:
        # A freshly filled table has no planner statistics; without them the next submit's id lookups
        # take ~90 ms per 500 ids instead of ~1 ms (bench/orchestrator.py).
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE runs, memberships")
    return report


def claim(engine: Engine, worker: str, limit: int = 1) -> list[Run]:
    """Atomically move up to `limit` queued runs to running for this worker and return them."""
    with Session(engine, expire_on_commit=False) as conn, conn.begin():
        # Two statements, as the design says: the SELECT locks (and skips locked) candidate rows; the UPDATE
        # takes them. (One UPDATE … WHERE id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED) can take more than n
        # rows on PostgreSQL, which may re-run the subquery.)
        candidates = conn.execute(
            sa.select(Run.id).where(Run.state == QUEUED).order_by(Run.priority.desc(), Run.created_at, Run.id)
            .limit(limit).with_for_update(skip_locked=True)  # SQLite ignores this; BEGIN IMMEDIATE serialises
        ).scalars().all()
        if not candidates:
            return []
        now = db_now()
        ids = conn.execute(
            sa.update(Run).where(Run.id.in_(candidates), Run.state == QUEUED)
            .values(state=RUNNING, worker=worker, started_at=now, heartbeat_at=now, finished_at=None,
                    exit_code=None, stop=None, launches=Run.launches + 1)
            .returning(Run.id).execution_options(synchronize_session=False)
        ).scalars().all()
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


def heartbeat(engine: Engine, worker: str, progress: dict[str, dict]) -> Beat:
    """Beat for each of this worker's runs (with its progress). A run taken away must have its trainer
    stopped; only a cancelled one is this worker's to close in MLflow (outbox.py decides by the state)."""
    beat = Beat()
    with engine.begin() as conn:
        for run_id, fields in progress.items():
            stop = conn.execute(sa.update(Run).where(Run.id == run_id, Run.worker == worker, Run.state == RUNNING)
                                .values(heartbeat_at=db_now(), **finite(fields)).returning(Run.stop)).first()
            if stop is not None:
                beat.owned[run_id] = stop[0]
            else:
                state = conn.execute(sa.select(Run.state).where(Run.id == run_id)).scalar()
                beat.lost[run_id] = "cancelled" if state == CANCELLED else "taken over"
    return beat


def request_stop(engine: Engine, run_ids: Iterable[str], reason: str = "pruned") -> list[str]:
    """Ask the workers of running runs to stop them (through the trainer's STOP file) with this reason.

    The database carries the request, so whoever asks (a sweep on another machine) needs no access to
    the run directories."""
    with engine.begin() as conn:
        return list(conn.execute(sa.update(Run).where(Run.id.in_(list(run_ids)), Run.state == RUNNING)
                                 .values(stop=reason).returning(Run.id)).scalars())


def requeue_stale(engine: Engine, grace_s: float, except_worker: str | None = None) -> list[str]:
    """Runs whose worker has not beaten for `grace_s` seconds go back to the queue, their launch left open.

    Whether that launch used up an attempt is not known here: its trainer may have checkpointed and ended
    as preempted after its worker died. The next launcher reads its result.json and decides (judge_lost).
    A worker never reaps its own runs (`except_worker`): it is alive, only late.
    """
    with engine.begin() as conn:
        stale = (Run.state == RUNNING) & (Run.heartbeat_at < db_now() - grace_s)
        if except_worker is not None:
            stale = stale & (Run.worker != except_worker)
        return list(conn.execute(sa.update(Run).where(stale).values(state=QUEUED, worker=None)
                                 .returning(Run.id)).scalars().all())


def start(engine: Engine, run: Run, worker: str) -> bool:
    """This claim's trainer is about to start: count the attempt and open the launch. False if the run is
    no longer ours, or an earlier launch is still open (judge_lost it first)."""
    with engine.begin() as conn:
        ok = conn.execute(sa.update(Run).where(Run.id == run.id, Run.worker == worker, Run.state == RUNNING,
                                               Run.open_launch.is_(None))
                          .values(attempts=Run.attempts + 1, open_launch=Run.launches)
                          .returning(Run.attempts)).scalar()
    if ok is None:
        return False
    run.attempts, run.open_launch = ok, run.launches
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
    if status in (SUCCEEDED, DIVERGED, PRUNED, FAILED):  # it ended for good after its worker died
        return finish(engine, run.id, worker, status, result=ending, exit_code=ending.get("exit_code"),
                      error=ending.get("error"))
    if status != "preempted" and run.attempts >= run.max_attempts:  # a crash, and it was the last attempt
        return finish(engine, run.id, worker, FAILED, error=f"launch {n} ended without a result after its "
                      f"worker stopped heartbeating; no attempts left (of {run.max_attempts})", count=False)
    refund = 1 if status == "preempted" else 0  # checkpointed: the attempt it used is given back
    with engine.begin() as conn:
        mine = (Run.id == run.id) & (Run.worker == worker) & (Run.state == RUNNING)
        done = conn.execute(sa.update(Run).where(mine, Run.open_launch == n)
                            .values(attempts=Run.attempts - refund, open_launch=None).returning(Run.attempts)).scalar()
        if done is None:  # judged already (a retry after a database error), or no longer ours
            return "launch" if conn.execute(sa.select(Run.id).where(mine)).first() else None
    run.attempts, run.open_launch = done, None
    return "launch"


def finish(engine: Engine, run_id: str, worker: str, status: str, *, result: dict | None = None,
           exit_code: int | None = None, error: str | None = None, count: bool = True) -> str | None:
    """Record how an attempt ended; return the run's new state (None if the run was no longer ours).

    status is the trainer's (succeeded, diverged, pruned, preempted, or failed for a bad config or missing
    data, which no retry can fix) or "failed" for a crash. A preempted attempt goes back to the queue
    without using up an attempt; a crash is retried while attempts remain (`count=False`: fail now).
    """
    with engine.begin() as conn:
        run = conn.execute(sa.select(Run.attempts, Run.max_attempts, Run.stop, Run.open_launch)
                           .where(Run.id == run_id, Run.worker == worker, Run.state == RUNNING)
                           .with_for_update()).first()
        if run is None:
            return None
        if run.stop == PRUNED and status in ("preempted", FAILED):
            status = PRUNED  # a prune request outlives the preemption or crash that ended this attempt
        values: dict = dict(exit_code=exit_code, worker=None if status in ("preempted", FAILED) else worker,
                            open_launch=None)
        started = run.open_launch is not None  # its attempt was counted by start()
        if result is not None:
            result = finite(result)
            values.update(result=result, test_loss=result.get("test_loss"), step=result.get("step"),
                          train_loss=result.get("train_loss"), tokens_per_s=result.get("tokens_per_s"))
        if error is not None:
            values["error"] = error
        attempts = run.attempts + (0 if started else 1)  # a launch that failed before its trainer started counts too
        if status == "preempted":
            new = QUEUED
            values["attempts"] = run.attempts - (1 if started else 0)
        elif status == FAILED and count and attempts < run.max_attempts and (result or {}).get("retryable", True):
            new = QUEUED
            values["attempts"] = attempts
        else:
            new = status if status in FINAL else FAILED
            values["finished_at"] = db_now()
            if new == FAILED:
                values["attempts"] = attempts
        conn.execute(sa.update(Run).where(Run.id == run_id, Run.worker == worker, Run.state == RUNNING)
                     .values(state=new, **values))
        return new


def set_mlflow_run(engine: Engine, run_id: str, mlflow_run_id: str) -> str:
    """Record the run's MLflow id unless one is recorded already; return the one on record (stable for
    the run's life, whichever worker or outage comes between)."""
    with engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id, Run.mlflow_run_id.is_(None))
                     .values(mlflow_run_id=mlflow_run_id))
        return conn.execute(sa.select(Run.mlflow_run_id).where(Run.id == run_id)).scalar_one()


def set_tracked(engine: Engine, run_id: str, state: str) -> None:
    """MLflow now holds the whole of this finished run (outbox.py); bookkeeping, not a state change."""
    with engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id, Run.state == state).values(tracked=state))


def untracked(engine: Engine, finished_before_s: float | None = None, limit: int = 100) -> list[str]:
    """Finished runs that MLflow does not hold whole yet (some of them), optionally only those finished at
    least `finished_before_s` seconds ago (their owner had its chance). Imported results have no MLflow run."""
    with engine.connect() as conn:
        q = sa.select(Run.id, Run.result).where(Run.state.in_(FINAL),
                                                sa.or_(Run.tracked.is_(None), Run.tracked != Run.state))
        if finished_before_s is not None:
            q = q.where(Run.finished_at < db_now() - finished_before_s)
        # In random order: runs that this process cannot send (their directory is on another machine) must
        # not fill every pass.
        rows = conn.execute(q.order_by(sa.func.random()).limit(limit)).all()
    return [r.id for r in rows if not (r.result or {}).get("imported")]


def cancel(engine: Engine, run_ids: Iterable[str]) -> list[str]:
    """Queued or running → cancelled. A running run's worker notices at its next heartbeat and stops it."""
    done: list[str] = []
    with engine.begin() as conn:
        for chunk in _chunks(list(run_ids), 500):
            done += conn.execute(sa.update(Run).where(Run.id.in_(chunk), Run.state.in_(ACTIVE))
                                 .values(state=CANCELLED, finished_at=db_now()).returning(Run.id)).scalars().all()
    return done


def shared(engine: Engine, run_ids: Iterable[str], experiment: str, arm: str | None = None) -> dict[str, list[str]]:
    """Of these runs, those that other experiments share (same config hash) — or, with `arm`, other arms too
    (two sweep trials with the same parameters) — with the names of those experiments. Cancelling or pruning
    a run on behalf of one experiment or arm must leave these alone: they are not its own."""
    out: dict[str, set[str]] = {}
    other = Membership.experiment != experiment
    if arm is not None:
        other = sa.or_(other, Membership.arm != arm)
    with engine.connect() as conn:
        for chunk in _chunks(list(run_ids), 500):
            for run_id, name in conn.execute(sa.select(Membership.run_id, Membership.experiment)
                                             .where(Membership.run_id.in_(chunk), other).distinct()):
                out.setdefault(run_id, set()).add(name)
    return {k: sorted(v) for k, v in out.items()}


def retry(engine: Engine, run_ids: Iterable[str]) -> list[str]:
    """A finished run that did not succeed goes back to the queue with its attempts reset."""
    done: list[str] = []
    with engine.begin() as conn:
        for chunk in _chunks(list(run_ids), 500):
            done += conn.execute(sa.update(Run).where(Run.id.in_(chunk), Run.state.in_((FAILED, DIVERGED, CANCELLED, PRUNED)))
                                 .values(state=QUEUED, attempts=0, worker=None, finished_at=None,
                                         open_launch=None, tracked=None)
                                 .returning(Run.id)).scalars().all()
    return done


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(Run.state, sa.func.count()).group_by(Run.state)).all())


def runs_of(engine: Engine, experiments: Sequence[str] | None = None) -> list[tuple[str, str, Run]]:
    """(experiment, arm, run) for the named experiments, or all of them."""
    with Session(engine, expire_on_commit=False) as conn:
        q = sa.select(Membership.experiment, Membership.arm, Run).join(Run, Run.id == Membership.run_id)
        if experiments:
            q = q.where(Membership.experiment.in_(experiments))
        rows = conn.execute(q.order_by(Membership.experiment, Membership.arm, Run.seed, Run.repeat)).all()
    return [(e, a, r) for e, a, r in rows]


def experiment_names(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(ExperimentRow.name).order_by(ExperimentRow.name)).scalars())


def specs(engine: Engine) -> dict[str, Experiment]:
    """experiment name → its spec as last submitted (stacks and looks for `orch table`)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(ExperimentRow.name, ExperimentRow.spec)).all()
    out = {}
    for name, raw in rows:
        if not raw:
            continue
        try:
            out[name] = Experiment.model_validate(raw)
        except ValidationError:
            # Written by another orch version: keep what the table needs, so that one old row cannot
            # stop the leaderboard of every experiment, and sequential looks are never forgotten.
            try:
                looks = Looks.model_validate(raw["looks"]) if raw.get("looks") else None
            except ValidationError:
                looks = Looks(first=2, last=100)  # unreadable looks: assume many, the strict side
            out[name] = Experiment.model_construct(
                name=name, interventions=[Intervention.model_construct(name=i["name"], stack=list(i.get("stack") or []))
                                          for i in raw.get("interventions") or [] if isinstance(i, dict) and "name" in i],
                looks=looks)
    return out


def memberships(engine: Engine, run_id: str) -> list[tuple[str, str]]:
    """(experiment, arm) pairs that include this run, oldest experiment first."""
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(Membership.experiment, Membership.arm).join(ExperimentRow, ExperimentRow.name == Membership.experiment)
            .where(Membership.run_id == run_id).order_by(ExperimentRow.created_at, Membership.experiment)).all()]


def find(engine: Engine, prefix: str) -> list[Run]:
    """Runs whose id starts with `prefix` (ids are 16 hex digits; a few are usually enough)."""
    with Session(engine, expire_on_commit=False) as s:
        # startswith escapes LIKE's own wildcards: `orch cancel %` must match no run, not all of them.
        return list(s.execute(sa.select(Run).where(Run.id.startswith(prefix, autoescape=True))).scalars().all())


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ---------------------------------------------------------------------------------------------------------
# Leases: one driver per sweep.

def take_lease(engine: Engine, name: str, holder: str, grace_s: float) -> str | None:
    """Take or renew the lease `name` for `holder`. Returns None when `holder` holds it now, or a line
    saying who does: a holder keeps the lease while it beats at least every `grace_s` seconds (database
    clock), and loses it to the next taker once it has not."""
    for _ in range(3):  # two first takers on PostgreSQL: one insert wins, the other reads it next pass
        try:
            with engine.begin() as conn:
                now = conn.execute(sa.select(db_now())).scalar_one()
                row = conn.execute(sa.select(Lease.holder, Lease.heartbeat_at).where(Lease.name == name)
                                   .with_for_update()).first()
                if row is None:
                    conn.execute(sa.insert(Lease).values(name=name, holder=holder, heartbeat_at=now))
                    return None
                if row.holder == holder or row.heartbeat_at < now - grace_s:
                    conn.execute(sa.update(Lease).where(Lease.name == name).values(holder=holder, heartbeat_at=now))
                    return None
                return f"{row.holder} (last beat {now - row.heartbeat_at:.0f} s ago)"
        except sa.exc.IntegrityError:
            continue
    raise RuntimeError(f"could not take or read lease {name!r}")


def release_lease(engine: Engine, name: str, holder: str) -> None:
    """Give the lease up (a clean exit), so that a standby takes over at once rather than after the grace."""
    with engine.begin() as conn:
        conn.execute(sa.delete(Lease).where(Lease.name == name, Lease.holder == holder))

"""Named read queries: what `orch table`, `status`, `ls`, the noise and more-seeds studies, sweeps, reports and
the MLflow outbox read from the database. Nothing here writes; writes are queue.py's."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, aliased

from orchestrator import dependencies
from orchestrator.db import Experiment as ExperimentRow
from orchestrator.db import Lease, Membership, Run, db_now
from orchestrator.specs import Experiment, Intervention, Looks, SpecError
from orchestrator.states import ACTIVE, FINAL, RunState


class Member(NamedTuple):
    """A run as one arm of one experiment (a run may be a member of several)."""

    experiment: str
    arm: str
    run: Run


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(Run.state, sa.func.count()).group_by(Run.state)).all())


def claimable(engine: Engine, skip: Sequence[str] = (), nodes: int | None = None) -> int:
    """How many queued runs there are, not counting `skip` (runs a worker cannot train where it is) nor runs
    waiting for the run they start from (orchestrator/dependencies.py), and, given `nodes`, only those asking
    for that many nodes (what a worker of that span can claim)."""
    with engine.connect() as conn:
        q = sa.select(sa.func.count()).select_from(Run).where(Run.state == RunState.QUEUED, dependencies.ready())
        if nodes is not None:
            q = q.where(Run.nodes == nodes)
        return conn.execute(q.where(Run.id.not_in(list(skip))) if skip else q).scalar_one()


def runs_of(engine: Engine, experiments: Sequence[str] | None = None) -> list[Member]:
    """(experiment, arm, run) for the named experiments, or all of them."""
    with Session(engine, expire_on_commit=False) as conn:
        q = sa.select(Membership.experiment, Membership.arm, Run).join(Run, Run.id == Membership.run_id)
        if experiments:
            q = q.where(Membership.experiment.in_(experiments))
        rows = conn.execute(q.order_by(Membership.experiment, Membership.arm, Run.seed, Run.repeat)).all()
    return [Member(e, a, r) for e, a, r in rows]


def running(engine: Engine) -> list[Member]:
    """The running runs, each once (under its first experiment and arm), for `orch status`."""
    seen: dict[str, Member] = {}
    for m in runs_of(engine):
        if m.run.state == RunState.RUNNING:
            seen.setdefault(m.run.id, m)
    return list(seen.values())


def queued(engine: Engine) -> list[tuple[str, str | None]]:
    """(run id, its first experiment) of each queued run, in the order workers claim them, for a queue ETA."""
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(Run.id, sa.func.min(Membership.experiment))
                .outerjoin(Membership, Membership.run_id == Run.id)
                .where(Run.state == RunState.QUEUED)
                .group_by(Run.id, Run.priority, Run.created_at)
                .order_by(Run.priority.desc(), Run.created_at, Run.id)
            ).all()
        ]


def waiting(engine: Engine) -> list[tuple[str, str, str]]:
    """(run id, source run id, the source's state) of each queued run held back until the run it starts from
    (run.init_from, orchestrator/dependencies.py) has succeeded, in claim order."""
    source = aliased(Run)
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(Run.id, source.id, source.state)
                .join(source, source.id == dependencies.source_id())
                .where(Run.state == RunState.QUEUED, source.state != str(RunState.SUCCEEDED))
                .order_by(Run.priority.desc(), Run.created_at, Run.id)
            ).all()
        ]


def durations(engine: Engine) -> dict[str, list[float]]:
    """experiment → seconds from claim to end of each of its succeeded runs (of their last launch: a resumed
    run counts its last stretch only), for a queue ETA. Imported results were never claimed: none of theirs."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(Membership.experiment, Run.finished_at - Run.started_at)
            .join(Run, Run.id == Membership.run_id)
            .where(Run.state == RunState.SUCCEEDED, Run.started_at.is_not(None), Run.finished_at.is_not(None))
        ).all()
    out: dict[str, list[float]] = {}
    for experiment, seconds in rows:
        out.setdefault(experiment, []).append(float(seconds))
    return out


def now(engine: Engine) -> float:
    """The database's clock (what started_at and heartbeats are on), in seconds since the epoch."""
    with engine.connect() as conn:
        return float(conn.execute(sa.select(db_now())).scalar_one())


def active(engine: Engine, experiments: Sequence[str]) -> int:
    """How many of these experiments' runs are still queued or running."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count(sa.distinct(Run.id)))
            .join(Membership, Membership.run_id == Run.id)
            .where(Membership.experiment.in_(experiments), Run.state.in_([str(s) for s in ACTIVE]))
        ).scalar_one()


def has_table(engine: Engine, name: str) -> bool:
    """Whether the database has this table (Optuna's `studies` exists only once a sweep ran)."""
    return sa.inspect(engine).has_table(name)


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
                name=name,
                interventions=[
                    Intervention.model_construct(name=i["name"], stack=list(i.get("stack") or []))
                    for i in raw.get("interventions") or []
                    if isinstance(i, dict) and "name" in i
                ],
                looks=looks,
            )
    return out


def memberships(engine: Engine, run_id: str) -> list[tuple[str, str]]:
    """(experiment, arm) pairs that include this run, oldest experiment first."""
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(Membership.experiment, Membership.arm)
                .join(ExperimentRow, ExperimentRow.name == Membership.experiment)
                .where(Membership.run_id == run_id)
                .order_by(ExperimentRow.created_at, Membership.experiment)
            ).all()
        ]


def find(engine: Engine, prefix: str) -> list[Run]:
    """Runs whose id starts with `prefix` (ids are 16 hex digits; a few are usually enough)."""
    with Session(engine, expire_on_commit=False) as s:
        # startswith escapes LIKE's own wildcards: `orch cancel %` must match no run, not all of them.
        return list(s.execute(sa.select(Run).where(Run.id.startswith(prefix, autoescape=True))).scalars().all())


def untracked(engine: Engine, finished_before_s: float | None = None, limit: int = 100) -> list[str]:
    """Finished runs that MLflow does not hold whole yet (some of them), optionally only those finished at
    least `finished_before_s` seconds ago (their owner had its chance). Imported results have no MLflow run."""
    with engine.connect() as conn:
        q = sa.select(Run.id, Run.result).where(
            Run.state.in_([str(s) for s in FINAL]), sa.or_(Run.tracked.is_(None), Run.tracked != Run.state)
        )
        if finished_before_s is not None:
            q = q.where(Run.finished_at < db_now() - finished_before_s)
        # In random order: runs that this process cannot send (their directory is on another machine) must
        # not fill every pass.
        rows = conn.execute(q.order_by(sa.func.random()).limit(limit)).all()
    return [r.id for r in rows if not (r.result or {}).get("imported")]


def shared(engine: Engine, run_ids: Iterable[str], experiment: str, arm: str | None = None) -> dict[str, list[str]]:
    """Of these runs, those that other experiments share (same config hash) — or, with `arm`, other arms too
    (two sweep trials with the same parameters) — with the names of those experiments. Cancelling or pruning
    a run on behalf of one experiment or arm must leave these alone: they are not its own."""
    out: dict[str, set[str]] = {}
    other = Membership.experiment != experiment
    if arm is not None:
        other = sa.or_(other, Membership.arm != arm)
    with engine.connect() as conn:
        for chunk in _chunks(list(run_ids)):
            for run_id, name in conn.execute(
                sa.select(Membership.run_id, Membership.experiment)
                .where(Membership.run_id.in_(chunk), other)
                .distinct()
            ):
                out.setdefault(run_id, set()).add(name)
    return {k: sorted(v) for k, v in out.items()}


def spec(engine: Engine, experiment: str) -> Experiment:
    """The experiment's spec as last submitted; SpecError naming the known ones if there is none."""
    with engine.connect() as conn:
        raw = conn.execute(sa.select(ExperimentRow.spec).where(ExperimentRow.name == experiment)).scalar()
    if raw is None:
        known = ", ".join(experiment_names(engine)) or "none"
        raise SpecError(f"no experiment named {experiment!r}; known: {known}")
    return Experiment.model_validate(raw)


def runs(engine: Engine, ids: Sequence[str]) -> list[Run]:
    """These runs, in the order of `ids` (those that exist)."""
    with Session(engine, expire_on_commit=False) as s:
        found = {
            r.id: r
            for chunk in _chunks(list(ids))
            for r in s.execute(sa.select(Run).where(Run.id.in_(chunk))).scalars()
        }
    return [found[i] for i in ids if i in found]


# Sweeps, read without optuna (a worker must not import it): the driver's lease (leases.py, "sweep:<name>")
# and three of Optuna's RDB tables, whose layout Optuna has kept since its 1.x schema. sweep.py writes the
# two study attributes each time a driver takes the lease.
SWEEP_LEASE = "sweep:"
SWEEP_TARGET = "orch_target"  # the trials the driver runs to (its budget, after --trials)
SWEEP_GRACE = "orch_lease_grace_s"  # the driver's --grace
_studies = sa.table("studies", sa.column("study_id"), sa.column("study_name"))
_study_attrs = sa.table("study_user_attributes", sa.column("study_id"), sa.column("key"), sa.column("value_json"))
_trials = sa.table("trials", sa.column("study_id"), sa.column("state"))


class SweepDriver(NamedTuple):
    """A sweep whose driver holds (or held, and died holding) its lease."""

    name: str
    holder: str
    age_s: float  # since the holder last renewed the lease, on the database's clock
    finished: int  # trials complete, pruned or failed
    target: int | None  # the driver's budget; None where no driver recorded one
    grace_s: float | None  # the driver's lease grace; None where not recorded


def sweep_drivers(engine: Engine) -> list[SweepDriver]:
    """Every sweep with a lease: a driver that exits cleanly gives its lease up, one that died leaves it to
    age."""
    with engine.connect() as conn:
        now = conn.execute(sa.select(db_now())).scalar_one()
        leases = conn.execute(
            sa.select(Lease.name, Lease.holder, Lease.heartbeat_at).where(
                Lease.name.startswith(SWEEP_LEASE, autoescape=True)
            )
        ).all()
        if not leases:
            return []
        names = [name[len(SWEEP_LEASE) :] for name, _, _ in leases]
        ids, attrs, finished = {}, {}, {}
        if sa.inspect(conn).has_table("studies"):
            ids = dict(
                conn.execute(
                    sa.select(_studies.c.study_name, _studies.c.study_id).where(_studies.c.study_name.in_(names))
                ).all()
            )
            for study_id, key, value in conn.execute(
                sa.select(_study_attrs.c.study_id, _study_attrs.c.key, _study_attrs.c.value_json).where(
                    _study_attrs.c.study_id.in_(list(ids.values())),
                    _study_attrs.c.key.in_([SWEEP_TARGET, SWEEP_GRACE]),
                )
            ):
                attrs[study_id, key] = json.loads(value)
            finished = dict(
                conn.execute(
                    sa.select(_trials.c.study_id, sa.func.count())
                    .where(
                        _trials.c.study_id.in_(list(ids.values())),
                        # a native enum on PostgreSQL, which a text parameter cannot be compared with
                        sa.cast(_trials.c.state, sa.String).in_(["COMPLETE", "PRUNED", "FAIL"]),
                    )
                    .group_by(_trials.c.study_id)
                ).all()
            )
    out = []
    for (_, holder, beat), name in zip(leases, names):
        study = ids.get(name)
        out.append(
            SweepDriver(
                name,
                holder,
                now - beat,
                finished.get(study, 0),
                attrs.get((study, SWEEP_TARGET)),
                attrs.get((study, SWEEP_GRACE)),
            )
        )
    return out


def sweep_names(engine: Engine) -> list[str]:
    """The sweeps (Optuna studies) in the database; none where no sweep ever ran (nothing is created)."""
    if not has_table(engine, "studies"):
        return []
    with engine.connect() as conn:
        return list(conn.execute(sa.select(_studies.c.study_name).order_by(_studies.c.study_name)).scalars())


def sweeps_asking(engine: Engine) -> list[str]:
    """Sweeps whose driver may still ask for trials: fewer of their trials have finished than the target,
    and the driver renewed its lease within twice its grace. Twice, because a standby takes over within one
    grace and a poll (the grace is at least three polls): a sweep changing drivers keeps its workers, one
    whose driver died with no standby lets them go after that."""
    return [
        d.name
        for d in sweep_drivers(engine)
        if d.age_s <= 2 * (d.grace_s or 60.0) and (d.target is None or d.finished < d.target)
    ]


def _chunks(items: list, n: int = 500):
    for i in range(0, len(items), n):
        yield items[i : i + n]

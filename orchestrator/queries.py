"""Named read queries: what `orch table`, `status`, `ls`, the noise and more-seeds studies, sweeps, reports and
the MLflow outbox read from the database. Nothing here writes; writes are queue.py's."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator.db import Experiment as ExperimentRow
from orchestrator.db import Membership, Run, db_now
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
    """How many queued runs there are, not counting `skip` (runs a worker cannot train where it is), and, given
    `nodes`, only those asking for that many nodes (what a worker of that span can claim)."""
    with engine.connect() as conn:
        q = sa.select(sa.func.count()).select_from(Run).where(Run.state == RunState.QUEUED)
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


def _chunks(items: list, n: int = 500):
    for i in range(0, len(items), n):
        yield items[i : i + n]

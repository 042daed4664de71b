"""Runs entering the database: `submit` queues an experiment's runs, `add_imported` stores results measured
elsewhere as finished runs, and `annotate` edits a stored experiment's tags and notes.

These are the writes that create runs. Each new row takes the state the transition table (states.py) gives a
run not stored yet, `move(None, Event.SUBMIT)` or `move(None, Event.IMPORT)`; every later write of a run is
queue.py's. A run is its config: one that exists already (from this experiment or another) is reused, never
queued twice, and only the experiment's membership of it is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from orchestrator.db import Experiment as ExperimentRow
from orchestrator.db import Membership, Run, db_now
from orchestrator.queue import chunks, finite
from orchestrator.runspec import RunSpec
from orchestrator.specs import Experiment, Looks, SpecError
from orchestrator.states import Event, move


@dataclass
class SubmitReport:
    queued: list[RunSpec] = field(default_factory=list)
    reused: list[tuple[RunSpec, str]] = field(default_factory=list)  # (run, its current state)


@dataclass
class Imported:
    """A result measured elsewhere, to be stored as a finished run of an arm. `repeat` tells apart runs of
    one arm that share a seed (or have none); result["seed"] is the seed the source gave, or None."""

    id: str
    arm: str
    seed: int
    test_loss: float
    result: dict
    repeat: int = 0


def submit(
    engine: Engine,
    exp: Experiment,
    runs: Sequence[RunSpec],
    source: str | None = None,
    max_attempts: int = 3,
    priority: int = 0,
) -> SubmitReport:
    """Queue the runs that do not exist yet and record the experiment's membership of all of them."""
    queued = str(move(None, Event.SUBMIT))
    with engine.begin() as conn:
        existing: dict[str, str] = {}
        ids = [r.id for r in runs]
        for chunk in chunks(ids, 500):
            existing.update(conn.execute(sa.select(Run.id, Run.state).where(Run.id.in_(chunk))).all())
        members = set(
            conn.execute(sa.select(Membership.arm, Membership.run_id).where(Membership.experiment == exp.name)).all()
        )
        now = conn.execute(sa.select(db_now())).scalar_one()
        report = sort_submission(runs, existing)
        new_runs = [
            dict(
                id=r.id,
                state=queued,
                config=r.config.model_dump(mode="json"),
                seed=r.seed,
                data_seed=r.data_seed,
                repeat=r.repeat,
                priority=priority,
                attempts=0,
                max_attempts=max_attempts,
                nodes=r.nodes,
                created_at=now + i * 1e-6,
            )
            for i, r in enumerate(report.queued)
        ]
        new_members = []
        for r in runs:
            if (r.arm, r.id) not in members:
                new_members.append(dict(experiment=exp.name, arm=r.arm, run_id=r.id))
                members.add((r.arm, r.id))
        for chunk in chunks(new_runs, 500):
            conn.execute(sa.insert(Run), chunk)
        for chunk in chunks(new_members, 500):
            conn.execute(sa.insert(Membership), chunk)
        # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises): a concurrent more-seeds
        # must not have its looks overwritten by this submit's spec.
        exists = conn.execute(
            sa.select(ExperimentRow.spec, ExperimentRow.source).where(ExperimentRow.name == exp.name).with_for_update()
        ).first()
        if exists and (stored := (exists.spec or {}).get("looks")):
            # Looks already taken stay on record: a resubmitted file must not turn sequential verdicts
            # back into fixed-sample ones.
            exp = exp.model_copy(update={"looks": Looks.model_validate(stored).union(exp.looks)})
        if exists:
            exp = _keep_annotations(exp, exists.spec or {})
        row = dict(description=exp.description, spec=exp.model_dump(mode="json"), source=source)
        if exists:
            row["source"] = source or exists.source  # a spec change keeps where it first came from
            conn.execute(sa.update(ExperimentRow).where(ExperimentRow.name == exp.name).values(**row))
        else:
            conn.execute(sa.insert(ExperimentRow).values(name=exp.name, created_at=now, **row))
    if engine.dialect.name == "postgresql" and len(report.queued) >= 1000:
        # A freshly filled table has no planner statistics; without them the next submit's id lookups
        # take ~90 ms per 500 ids instead of ~1 ms (bench/orchestrator.py).
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE runs, memberships")
    return report


def sort_submission(runs: Sequence[RunSpec], existing: dict[str, str]) -> SubmitReport:
    """Which of `runs` a submit queues and which it reuses, given the states of the runs that exist already
    (id -> state): submit itself and a dry run (api.submit) both decide here, so they count alike. Of several
    runs with one id (arms that change nothing), the first is queued and the rest reuse it."""
    report, seen = SubmitReport(), dict(existing)
    for r in runs:
        if r.id in seen:
            # A run is its config: submitted again with another `nodes` (launch resources, not part of its
            # id), it keeps the node count it was first queued with, as it keeps its results. Refusing would
            # break every other experiment sharing the run; re-placing it would strand a half-trained run.
            report.reused.append((r, seen[r.id]))
        else:
            report.queued.append(r)
            seen[r.id] = str(move(None, Event.SUBMIT))
    return report


def _keep_annotations(exp: Experiment, stored: dict) -> Experiment:
    """Tags and notes added by `orch tag` / `orch note` survive a resubmitted file (the file's tags win)."""
    notes = [*stored.get("notes", []), *(n for n in exp.notes if n not in stored.get("notes", []))]
    return exp.model_copy(update={"tags": {**stored.get("tags", {}), **exp.tags}, "notes": notes})


def annotate(
    engine: Engine, experiment: str, note: str | None = None, tags: dict[str, str] | None = None, drop=()
) -> Experiment:
    """Add a note, set tags and drop tags on a stored experiment's spec; returns the spec as stored."""
    with engine.begin() as conn:
        raw = conn.execute(
            sa.select(ExperimentRow.spec).where(ExperimentRow.name == experiment).with_for_update()
        ).scalar()
        if raw is None:
            raise SpecError(f"no experiment named {experiment!r}; see `orch ls`")
        spec = Experiment.model_validate(raw)
        merged = {k: v for k, v in {**spec.tags, **(tags or {})}.items() if k not in drop}
        spec = spec.model_copy(update={"tags": merged, "notes": [*spec.notes, *([note] if note else [])]})
        conn.execute(
            sa.update(ExperimentRow).where(ExperimentRow.name == experiment).values(spec=spec.model_dump(mode="json"))
        )
    return spec


def add_imported(engine: Engine, spec: Experiment, source: str, runs: Sequence[Imported]) -> int:
    """Store results measured elsewhere as finished runs of experiment `spec.name` (the import event); a run
    already stored (the same import again) is left as it is. Into an existing experiment the imported arms
    just join; its own spec stays as submitted. Returns how many runs were new."""
    state = str(move(None, Event.IMPORT))
    added = 0
    with engine.begin() as conn:
        now = conn.execute(sa.select(db_now())).scalar_one()
        for r in runs:
            stored = conn.execute(sa.select(Run.id, Run.result).where(Run.id == r.id)).first()
            if stored is not None and "seed" not in (stored.result or {}) and "seed" in r.result:
                # Imported before imports recorded the seed (so it pairs with nothing): the same file
                # imported again says whether it had one.
                conn.execute(sa.update(Run).where(Run.id == r.id).values(result=finite({**stored.result, **r.result})))
            if stored is None:
                conn.execute(
                    sa.insert(Run).values(
                        id=r.id,
                        state=state,
                        config={"imported": True},
                        seed=r.seed,
                        data_seed=0,
                        repeat=r.repeat,
                        priority=0,
                        attempts=0,
                        max_attempts=0,
                        created_at=now,
                        finished_at=now,
                        test_loss=r.test_loss,
                        result=finite(r.result),
                    )
                )
                added += 1
            member = (Membership.experiment == spec.name) & (Membership.arm == r.arm) & (Membership.run_id == r.id)
            if conn.execute(sa.select(Membership.run_id).where(member)).first() is None:
                conn.execute(sa.insert(Membership).values(experiment=spec.name, arm=r.arm, run_id=r.id))
        if conn.execute(sa.select(ExperimentRow.name).where(ExperimentRow.name == spec.name)).first() is None:
            conn.execute(
                sa.insert(ExperimentRow).values(
                    name=spec.name,
                    created_at=now,
                    description=spec.description,
                    spec=spec.model_dump(mode="json"),
                    source=source,
                )
            )
    return added

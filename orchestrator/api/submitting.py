"""Submitting an experiment file (`orch submit`): its runs expanded, checked and queued, or with a dry run
only counted, and with `--seeds auto` as many seeds per arm as the plan for an effect asks (plan.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from orchestrator import dependencies, queries, runspec, specs, submission
from orchestrator.api.connection import at_least, check_data, connect, refuse_password
from orchestrator.api.runs import Db

if TYPE_CHECKING:
    from orchestrator.plan import Plan


@dataclass
class Submitted:
    """What a submit (or a noise study, or a sweep's confirmation) queued and what it reused."""

    experiment: str
    queued: list[runspec.RunSpec] = field(default_factory=list)
    reused: list[tuple[runspec.RunSpec, str]] = field(default_factory=list)  # (run, its current state)
    runs: list[runspec.RunSpec] = field(default_factory=list)  # every run of the experiment, queued or not
    identical: list[tuple[str, str]] = field(default_factory=list)  # arms that are the same runs at this preset
    dry_run: bool = False
    plan: Plan | None = None  # how --seeds auto chose the seeds per arm

    @classmethod
    def of(cls, experiment: str, report: submission.SubmitReport) -> Submitted:
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
    runs = runspec.expand(exp, source=str(path), preset=preset, seeds=seeds, overrides=overrides or {})
    if check_data_here:
        check_data([r.config for r in runs])
    # A run id in run.init_from: a run of this submission or of the database (a dry run creates none).
    dependencies.check_sources(runs, lambda: _existing_db(db) if dry_run else connect(db, create=True))
    out = Submitted(exp.name, runs=runs, identical=runspec.identical_arms(runs), dry_run=dry_run, plan=plan)
    if dry_run:  # the same sorting as submit's, over the runs the database holds: the same counts
        report = submission.sort_submission(runs, _existing_states(db, [r.id for r in runs]))
    else:
        report = submission.submit(connect(db, create=True), exp, runs, source=str(path))
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

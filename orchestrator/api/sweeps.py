"""Sweeps: run (or resume) an Optuna search whose trials the workers train, and look at its result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.api.connection import at_least, check_data, connect, refuse_password
from orchestrator.api.runs import Db
from orchestrator.api.submitting import Submitted
from orchestrator.tracking import open_tracker


def sweep_run(
    path: str | Path,
    *,
    preset: str | None = None,
    overrides: dict | None = None,
    trials: int | None = None,
    in_flight: int | None = None,
    poll: float = 2.0,
    grace: float = 60.0,
    mlflow: str | None = None,
    track: bool = True,
    check_data_here: bool = True,
    db: Db = None,
    echo: Callable[[str], None] = print,
):
    """Create or resume the study of a sweep file and drive it until its budget is spent (`orch worker`s
    train the trials meanwhile). A second driver of the same study waits as a standby and takes over once
    the first has not renewed its lease for `grace` seconds. `trials` and `in_flight` replace the file's
    values (the budget and how many trials train at once). Returns the sweep's status at the end."""
    from orchestrator import runspec, specs, sweep_views
    from orchestrator.sweep import Driver
    from trainer.config import TrainConfig

    if not Path(path).is_file():
        raise ValueError(
            f"no sweep file {str(path)!r}: run `orch sweep FILE` (e.g. experiments/sweep_lr_wd.py), "
            "or `orch sweep status|plot|confirm NAME`"
        )
    if not poll > 0:
        raise ValueError(f"--poll must be a positive number of seconds, not {poll:g}")
    if not grace >= 3 * poll:
        raise ValueError(
            f"--grace ({grace:g} s) must be at least 3 polls ({3 * poll:g} s), or a live driver would "
            "lose its sweep between two passes"
        )
    for option, value, example in (("--trials", trials, "20"), ("--in-flight", in_flight, "2")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(
                f"{option} must be a positive whole number of trials, not {value!r}; e.g. {option} {example}"
            )
    refuse_password(db)
    spec = specs.load_sweep(path)
    changes = {k: v for k, v in (("trials", trials), ("in_flight", in_flight)) if v is not None}
    if changes:  # the values from the command line, which the file's own checks (≥ 1) have now seen
        spec = spec.model_copy(update=changes)
    base = runspec.sweep_base(spec, preset, overrides)
    if check_data_here:
        check_data([TrainConfig.model_validate(base)])
    engine = connect(db, create=True)
    driver = Driver(
        engine,
        spec,
        preset=preset,
        overrides=overrides,
        tracker=open_tracker(mlflow, track),
        poll_s=poll,
        echo=echo,
        lease_grace_s=grace,
    )
    echo(
        f"sweep {spec.name}: {spec.trials} trials, {spec.in_flight} in flight, {spec.sampler} sampler, "
        f"{spec.pruner} pruner (needs `orch worker` running)"
    )
    driver.run()
    return sweep_views.status(engine, spec.name)


def sweep_status(name: str | None = None, *, db: Db = None):
    """Trials, best so far, counts by state (sweep_views.SweepStatus: str() is the text, to_json()); with no
    name, every sweep: trials finished of its target, best objective, state (sweep_views.SweepList)."""
    from orchestrator import sweep_views

    if name is None:
        return sweep_views.list_sweeps(connect(db))
    return sweep_views.status(connect(db), name)


def sweep_plot(
    name: str, *, out: str | Path = "sweep-plots", db: Db = None, echo: Callable[[str], None] = print
) -> list[Path]:
    """Optimisation history, λ × η contour and importances as PNGs and an HTML page in `out`; the paths. A
    plot that needs more completed trials than the sweep has (a contour 3, importances 5) is left out, with
    a warning through `echo`."""
    from orchestrator import sweep_views

    return sweep_views.plot(connect(db), name, out, echo=echo)


def sweep_confirm(name: str, *, seeds: int = 4, db: Db = None) -> Submitted:
    """Queue the best trial's parameters against the baseline, `seeds` seeds each, as experiment
    NAME.confirm, whose table then gives the noise-aware verdict."""
    from orchestrator import sweep_views

    at_least("--seeds", seeds, example="4")
    exp, report = sweep_views.confirm(connect(db), name, seeds)
    return Submitted.of(exp.name, report)

"""A sweep seen from outside its driver: where it stands, its plots, and the confirmation of its best trial.
Each reads the study from the queue's database (Optuna's storage beside the runs) and changes nothing in it,
except `confirm`, which queues the best parameters against the baseline as an ordinary experiment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import Engine

from orchestrator import queries, runspec, specs, submission
from orchestrator.specs import Experiment
from orchestrator.sweep import RUNS_ATTR, STOPPED_ATTR, best_trial, format_params, storage, trial_counts

# Completed trials a plot needs before it says anything. A contour interpolates a surface over two
# parameters: under three points there is no triangle to interpolate on. Importances come from a random
# forest (fANOVA) fitted to the completed trials: on fewer than five its ranking changes with the forest's
# seed, i.e. it is noise drawn as a bar chart.
MIN_CONTOUR = 3
MIN_IMPORTANCES = 5


def sweep_names(engine: Engine) -> list[str]:
    """The studies in the database; none, without creating Optuna's tables, where no sweep ever ran."""
    return queries.sweep_names(engine)


def load(engine: Engine, name: str) -> optuna.Study:
    """A sweep's study, or ValueError naming the known ones. Building Optuna's storage creates its tables, so
    a mistyped name must be answered before that: looking must not change the database."""
    known = sweep_names(engine)
    if name not in known:
        raise ValueError(
            f"no sweep named {name!r}; known: {', '.join(known) or 'none (start one with `orch sweep FILE`)'}"
        )
    return optuna.load_study(study_name=name, storage=storage(engine))


@dataclass
class Trial:
    number: int
    state: str
    value: float | None  # the mean final validation loss; None unless complete
    params: dict
    runs: list[str]
    last_step: int | None  # the last step whose validation loss the driver reported
    stopped_at: int | None = None  # a pruned trial: the step its trainers stopped at


@dataclass
class TrialSummary:
    number: int
    value: float
    params: dict


@dataclass
class SweepStatus:
    name: str
    counts: dict[str, int]
    best: TrialSummary | None
    trials: list[Trial] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def __str__(self) -> str:
        lines = [f"sweep {self.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(self.counts.items()))]
        for t in self.trials:
            value = f"{t.value:.4f}" if t.value is not None else "—"
            step = f"stopped at {t.stopped_at:>5}" if t.stopped_at is not None else f"last step {t.last_step or '—':>5}"
            lines.append(f"  trial {t.number:>3}  {t.state:<9} {value:>8}  {step}  {format_params(t.params)}")
        if self.best:
            lines.append(
                f"best: trial {self.best.number} val loss {self.best.value:.4f}  {format_params(self.best.params)}"
            )
        return "\n".join(lines)


def status(engine: Engine, name: str) -> SweepStatus:
    study = load(engine, name)
    best = best_trial(study)
    return SweepStatus(
        name=name,
        counts=trial_counts(study),
        best=None if best is None else TrialSummary(best.number, best.value, best.params),
        # A pruned trial's Optuna value is an early validation loss: not comparable, so not shown as one.
        trials=[
            Trial(
                t.number,
                t.state.name.lower(),
                t.value if t.state == TrialState.COMPLETE else None,
                t.params,
                t.user_attrs.get(RUNS_ATTR, []),
                max(t.intermediate_values, default=None),
                t.user_attrs.get(STOPPED_ATTR) if t.state == TrialState.PRUNED else None,
            )
            for t in study.get_trials(deepcopy=False)
        ],
    )


@dataclass
class SweepSummary:
    name: str
    finished: int  # trials complete, pruned or failed
    target: int | None  # the trials its (last) driver runs to; None if no driver recorded it
    best: float | None  # the best final validation loss (the objective)
    state: str  # running (a driver holds its lease) | finished | stopped (no live driver: `orch sweep FILE`)
    driver: str | None = None  # who drives it, while one does


@dataclass
class SweepList:
    sweeps: list[SweepSummary]

    def to_json(self) -> str:
        return json.dumps([asdict(s) for s in self.sweeps], indent=2)

    def __str__(self) -> str:
        if not self.sweeps:
            return "no sweeps yet (start one with `orch sweep FILE`)"
        width = max(len("sweep"), *(len(s.name) for s in self.sweeps))
        lines = [f"{'sweep':<{width}}  {'trials':>7}  {'best val loss':>13}  state"]
        for s in self.sweeps:
            trials = f"{s.finished}/{s.target if s.target is not None else '?'}"
            best = f"{s.best:.4f}" if s.best is not None else "—"
            state = f"{s.state} ({s.driver})" if s.driver else s.state
            lines.append(f"{s.name:<{width}}  {trials:>7}  {best:>13}  {state}")
        return "\n".join(lines)


def list_sweeps(engine: Engine) -> SweepList:
    """Every sweep: trials finished of its target, the best objective, and whether a driver drives it."""
    names = sweep_names(engine)
    if not names:
        return SweepList([])
    drivers = {d.name: d for d in queries.sweep_drivers(engine)}
    store = storage(engine)
    out = []
    for name in names:
        study = optuna.load_study(study_name=name, storage=store)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
        target = study.user_attrs.get(queries.SWEEP_TARGET)
        best = best_trial(study)
        d = drivers.get(name)
        if d is not None and d.age_s <= (d.grace_s or 60.0):  # as a standby judges it
            state, driver = "running", d.holder
        elif target is not None and finished >= target:
            state, driver = "finished", None
        else:
            state, driver = "stopped", None
        out.append(SweepSummary(name, finished, target, None if best is None else best.value, state, driver))
    return SweepList(out)


def plot(engine: Engine, name: str, out_dir: str | Path, echo: Callable[[str], None] = print) -> list[Path]:
    """Optimisation history, λ × η contour and parameter importances, as PNGs and one HTML page; a plot that
    needs more completed trials (MIN_CONTOUR, MIN_IMPORTANCES) is left out, with a warning through `echo`."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    study = load(engine, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("history", lambda: ovm.plot_optimization_history(study))]
    keys = list(complete[0].params) if complete else []
    n = len(complete)
    if not complete:
        echo(f"warning: sweep {name} has no completed trial yet: the history is empty")
    if len(keys) >= 2 and n >= MIN_CONTOUR:
        plots.append(("contour", lambda: ovm.plot_contour(study, params=keys[:2])))
    elif len(keys) >= 2 and n:
        echo(f"warning: no contour from {n} completed trial(s): it needs at least {MIN_CONTOUR}")
    if keys and n >= MIN_IMPORTANCES:
        plots.append(("importances", lambda: ovm.plot_param_importances(study)))
    elif keys:
        echo(f"warning: no importances from {n} completed trial(s): they need at least {MIN_IMPORTANCES}")
    written = []
    for stem, make in plots:
        ax = make()
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 6)
        fig.tight_layout()
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    images = "".join(
        f'<h2>{p.stem}</h2><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in written
    )
    html = out / "index.html"
    html.write_text(f"<!doctype html><meta charset=utf-8><title>sweep {name}</title><h1>sweep {name}</h1>{images}")
    return [html, *written]


def confirm(engine: Engine, name: str, seeds: int) -> tuple[Experiment, submission.SubmitReport]:
    """Queue the best trial's parameters as an intervention against the sweep's base, with `seeds` seeds
    each, as experiment NAME.confirm: `orch table NAME.confirm` then gives the noise-aware verdict."""
    best = status(engine, name).best
    if best is None:
        raise ValueError(f"sweep {name!r} has no completed trial yet")
    sweep = queries.spec(engine, name)
    exp = Experiment(
        name=f"{name}.confirm",
        description=f"best trial of sweep {name}",
        preset=sweep.preset,
        base=sweep.base,
        seeds=seeds,
        interventions=[specs.Intervention(name=f"best-trial-{best.number}", set=best.params)],
    )
    return exp, submission.submit(engine, exp, runspec.expand(exp, source=f"sweep {name} confirm"))

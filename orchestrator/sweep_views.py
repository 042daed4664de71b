"""A sweep seen from outside its driver: where it stands, its plots, and the confirmation of its best trial.
Each reads the study from the queue's database (Optuna's storage beside the runs) and changes nothing in it,
except `confirm`, which queues the best parameters against the baseline as an ordinary experiment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import Engine

from orchestrator import queries, queue, specs
from orchestrator.specs import Experiment
from orchestrator.sweep import RUNS_ATTR, best_trial, format_params, storage, trial_counts


def sweep_names(engine: Engine) -> list[str]:
    """The studies in the database; none, without creating Optuna's tables, where no sweep ever ran."""
    if not queries.has_table(engine, "studies"):
        return []
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage(engine)))


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
            lines.append(
                f"  trial {t.number:>3}  {t.state:<9} {value:>8}  last step {t.last_step or '—':>5}  "
                f"{format_params(t.params)}"
            )
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
            )
            for t in study.get_trials(deepcopy=False)
        ],
    )


def plot(engine: Engine, name: str, out_dir: str | Path) -> list[Path]:
    """Optimisation history, λ × η contour and parameter importances, as PNGs and one HTML page."""
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
    if len(keys) >= 2:
        plots.append(("contour", lambda: ovm.plot_contour(study, params=keys[:2])))
    if len(complete) >= 2 and keys:
        plots.append(("importances", lambda: ovm.plot_param_importances(study)))
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


def confirm(engine: Engine, name: str, seeds: int) -> tuple[Experiment, queue.SubmitReport]:
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
    return exp, queue.submit(engine, exp, specs.expand(exp, source=f"sweep {name} confirm"))

"""One run in detail (`orch show`) and two runs side by side (`orch diff`).

A run's view: the experiments and arms it belongs to with each intervention's declared changes, what its
config differs in from the baseline run it is compared with (the baseline of that experiment on the same seed,
data seed and repeat — the run a paired test pairs it with), its state and progress, its result, where it
trained, and where to look next: its run directory and its MLflow run. A diff: every config key in which
two runs differ, and their results side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from orchestrator import queries
from orchestrator.db import Run
from orchestrator.specs import BASELINE
from orchestrator.tracking import flatten

# Results shown for a run, in this order: (label, how to read it from the run).
RESULTS = (
    ("state", lambda r: r.state),
    ("test loss", lambda r: r.test_loss),
    ("final val loss", lambda r: (r.result or {}).get("val_loss")),
    ("step", lambda r: r.step if r.total_steps is None else f"{r.step or 0}/{r.total_steps}"),
    ("train loss", lambda r: r.train_loss),
    ("tokens/s", lambda r: None if r.tokens_per_s is None else round(r.tokens_per_s)),
    ("diverged at step", lambda r: (r.result or {}).get("diverged_step")),
    ("attempts", lambda r: f"{r.attempts}/{r.max_attempts}"),
    ("node", lambda r: r.node),
    ("slurm job", lambda r: r.slurm_job),
)


@dataclass
class Membership:
    experiment: str
    arm: str
    changes: dict[str, Any]  # the intervention's declared dotted changes ({} for the baseline)
    baseline_run: str | None = None  # the baseline run it pairs with, where there is one
    differs: dict[str, list] = field(default_factory=dict)  # key -> [baseline value, this run's value]


@dataclass
class RunView:
    id: str
    state: str
    seed: int
    data_seed: int
    repeat: int
    memberships: list[Membership]
    config: dict[str, Any]  # flattened: dotted key -> value
    results: dict[str, Any]  # RESULTS that have a value
    run_dir: str
    mlflow_run_id: str | None
    error: str | None  # the last lines of the stored error of a failed attempt


@dataclass
class RunDiff:
    a: str
    b: str
    differs: dict[str, list]  # dotted key -> [a's value, b's value], keys in either config
    results: dict[str, list]  # RESULTS label -> [a's, b's]
    same_keys: int  # how many config keys agree


def show(engine: Engine, run: Run, runs_dir: str = "runs") -> RunView:
    specs = queries.specs(engine)
    members = []
    for experiment, arm in queries.memberships(engine, run.id):
        spec = specs.get(experiment)
        changes = spec.changes(arm) if spec is not None and arm != BASELINE and _declared(spec, arm) else {}
        m = Membership(experiment, arm, changes)
        if arm != BASELINE:
            base = _paired_baseline(engine, experiment, run)
            if base is not None:
                m.baseline_run = base.id
                m.differs = config_diff(base.config, run.config)
        members.append(m)
    error = "\n".join((run.error or "").splitlines()[-5:]) or None
    return RunView(
        run.id,
        run.state,
        run.seed,
        run.data_seed,
        run.repeat,
        members,
        flatten(run.config or {}),
        results(run),
        run.run_dir or f"{runs_dir}/{run.id}",
        run.mlflow_run_id,
        error,
    )


def diff(a: Run, b: Run) -> RunDiff:
    flat_a, flat_b = flatten(a.config or {}), flatten(b.config or {})
    differs = config_diff(a.config or {}, b.config or {})
    ra, rb = results(a, keep_empty=True), results(b, keep_empty=True)
    side_by_side = {k: [ra[k], rb[k]] for k in ra if ra[k] is not None or rb[k] is not None}
    return RunDiff(a.id, b.id, differs, side_by_side, len(set(flat_a) & set(flat_b)) - len(differs))


def config_diff(a: dict, b: dict) -> dict[str, list]:
    """Dotted keys whose values differ between two configs (a key one of them lacks shows None there)."""
    fa, fb = flatten(a), flatten(b)
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def results(run: Run, keep_empty: bool = False) -> dict[str, Any]:
    out = {label: read(run) for label, read in RESULTS}
    return out if keep_empty else {k: v for k, v in out.items() if v is not None}


def _declared(spec, arm: str) -> bool:
    return any(i.name == arm for i in spec.interventions)


def _paired_baseline(engine: Engine, experiment: str, run: Run) -> Run | None:
    """The experiment's baseline run on the same seed, data seed and repeat; else its first baseline run."""
    bases = [m.run for m in queries.runs_of(engine, [experiment]) if m.arm == BASELINE]
    same = [b for b in bases if (b.seed, b.data_seed, b.repeat) == (run.seed, run.data_seed, run.repeat)]
    return (same or bases or [None])[0]

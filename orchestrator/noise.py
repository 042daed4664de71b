"""Noise studies: repeat an experiment's baseline varying one source of randomness at a time —
initialisation, data order, both, or nothing (the hardware's nondeterminism alone, which is all that the
blog series' seven byte-identical repeats measured). Each study is experiment "EXP.noise-VARY"; the
leaderboard of EXP shows its σ by source, so whichever view shows EXP takes its studies with it
(`with_studies`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.engine import Engine

from orchestrator import queries, submission
from orchestrator.db import Run
from orchestrator.runspec import RunSpec, run_id, seeded
from orchestrator.specs import BASELINE, Experiment, SpecError

VARY = ("init", "data", "both", "none")
NOISE_SEP = ".noise-"  # `orch noise EXP --vary V` writes experiment "EXP.noise-V"


def study_name(experiment: str, vary: str) -> str:
    return f"{experiment}{NOISE_SEP}{vary}"


def parent(name: str) -> str | None:
    """The experiment a noise study repeats the baseline of, or None for an ordinary experiment."""
    return name.split(NOISE_SEP, 1)[0] if NOISE_SEP in name else None


def with_studies(engine: Engine, experiments: Sequence[str]) -> list[str]:
    """The experiments followed by their noise studies: what a view of them (table, report) must read."""
    return [*experiments, *(n for n in queries.experiment_names(engine) if parent(n) in experiments)]


def seed0_configs(engine: Engine, experiment: str) -> dict[str, dict]:
    """Per arm, the config of its first seed (lowest seed and data seed, repeat 0): the seed-0 template."""
    first: dict[str, Run] = {}
    for _, arm, r in queries.runs_of(engine, [experiment]):
        if (r.result or {}).get("imported"):
            continue
        if arm not in first or (r.seed, r.data_seed, r.repeat) < (
            first[arm].seed,
            first[arm].data_seed,
            first[arm].repeat,
        ):
            first[arm] = r
    return {arm: r.config for arm, r in first.items()}


def noise(engine: Engine, experiment: str, repeats: int, vary: str) -> submission.SubmitReport:
    """Queue `repeats` runs of the experiment's baseline varying `vary` only, as experiment EXP.noise-VARY."""
    if vary not in VARY:
        raise SpecError(f"--vary must be one of {', '.join(VARY)}, not {vary!r}")
    if repeats < 2:
        raise SpecError("a noise study needs at least 2 repeats to estimate a σ; use --repeats 8, say")
    spec = queries.spec(engine, experiment)
    base = seed0_configs(engine, experiment).get(BASELINE)
    if base is None:
        raise SpecError(f"experiment {experiment!r} has no baseline runs to repeat")
    name = study_name(experiment, vary)
    study = Experiment(
        name=name,
        description=f"noise study of {experiment}: vary {vary}",
        preset=spec.preset,
        base=spec.base,
        seeds=repeats,
        vary=vary,
    )
    runs = []
    for s in range(repeats):
        cfg, repeat = seeded(base, vary, s, 0, 1, source=name)
        runs.append(RunSpec(run_id(cfg, repeat), name, BASELINE, cfg, repeat))
    return submission.submit(engine, study, runs, source=f"orch noise {experiment} --vary {vary}")

"""Runs that start from another run's weights (run.init_from), from the experiment file to the launch.

    Intervention(name="ctx-3072", init_from="baseline", set={"model.context_length": 3072, ...})

Submit. An arm's `init_from` names another arm of the experiment: each of its runs starts from that arm's run
of the same seed index and repeat, so its run.init_from holds that run's id. The id is part of the new run's
config, so of its own id: two runs from different sources never share one. A path in run.init_from (from the
base, a `set` or --set) is pinned instead: the checkpoint file it resolves to now, as an absolute path, with
its sha256 in run.init_sha256, so that the content and not the name identifies the source. A run id must name
a run of the same submission or of the database that can still succeed; and a source whose model the new run
cannot take (trainer/init_from.py) is refused, with the keys, before anything is queued.

Queue. A run whose source is a run of the database is not claimed before that source has succeeded (`ready`,
one NOT EXISTS in the claim's WHERE): it stays queued meanwhile, and `orch worker --until-empty` does not wait
for it once nothing else is queued or running. If the source fails or is cancelled, its dependents stay queued:
`orch retry SOURCE` lets both go on, `orch cancel DEPENDENT` drops one. A wait rather than a refusal at submit,
because an experiment file holds a source and its dependents together; and no failing of the dependents,
because a retried source should not need each of them retried too.

Launch. The worker writes the run's config.json with run.init_from set to the source's directory (under its
own runs directory, else where the source's worker recorded it), from which the trainer takes the newest
checkpoint. A source directory this host cannot see hands the run back, as a checkpoint on another host does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.states import RunState
from trainer.config import ConfigError, TrainConfig
from trainer.init_from import RUN_ID, check_compatible, resolve, sha256_of
from trainer.presets import validate
from trainer.rundir import CONFIG

if TYPE_CHECKING:  # SQLAlchemy is imported where SQL is made: specs.py imports this module
    from sqlalchemy.engine import Engine

    from orchestrator.db import Run
    from orchestrator.runspec import RunSpec
    from orchestrator.specs import Experiment, Intervention

BASELINE = "baseline"  # as orchestrator/specs.py names it


def source_id():
    """SQL: the run's run.init_from, as text (NULL when it starts from scratch)."""
    from orchestrator.db import Run

    return Run.config[("run", "init_from")].as_string()


def ready():
    """SQL: the run does not wait for a source: it has none, names none of the database's runs (a path), or
    that run has succeeded."""
    import sqlalchemy as sa
    from sqlalchemy.orm import aliased

    from orchestrator.db import Run

    source = aliased(Run)
    return ~sa.exists().where(source.id == source_id(), source.state != str(RunState.SUCCEEDED))


# ---------------------------------------------------------------------------------------------------------
# Submit


def check_starts(interventions: Sequence[Intervention]) -> None:
    """Each intervention's init_from names the baseline or another intervention, with no circle; and an
    intervention that stacks one starting from another arm starts from that arm too (stacking carries `set`)."""
    starts = {i.name: i.init_from for i in interventions}
    for i in interventions:
        if i.init_from is not None and (i.init_from == i.name or i.init_from not in [BASELINE, *starts]):
            raise ValueError(
                f"intervention {i.name!r} starts from {i.init_from!r}, which is not {BASELINE!r} or another "
                "intervention of this experiment"
            )
        if i.init_from is not None and "run.init_from" in i.set:
            raise ValueError(
                f"intervention {i.name!r} sets both init_from (an arm) and run.init_from in `set`; keep one"
            )
        chain, arm = [i.name], i.init_from
        while arm in starts and starts[arm] is not None:
            if arm in chain:
                raise ValueError(f"interventions start from each other in a circle: {' -> '.join([*chain, arm])}")
            chain.append(arm)
            arm = starts[arm]
        for part in i.stack:
            if starts.get(part) is not None and starts[part] != i.init_from:
                raise ValueError(
                    f"intervention {i.name!r} stacks {part!r}, which starts from {starts[part]!r}: stacking "
                    f"carries `set` only, so give {i.name!r} init_from={starts[part]!r} too (or another arm)"
                )


def arm_order(exp: Experiment) -> list[str]:
    """Every arm, the baseline first, each after the arm it starts from (otherwise in the file's order)."""
    starts = {i.name: i.init_from for i in exp.interventions}
    order: list[str] = []

    def visit(arm: str) -> None:
        if arm not in order:
            if starts.get(arm):
                visit(starts[arm])
            order.append(arm)

    for arm in [BASELINE, *starts]:
        visit(arm)
    return order


def from_arm(data: dict[str, Any], source: RunSpec) -> dict[str, Any]:
    """An arm's config dict starting from `source`'s run (the same seed index and repeat of another arm)."""
    data = json.loads(json.dumps(data))
    data["run"]["init_from"] = source.id
    return data


def pinned(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict with run.init_from as a run id wants it: a path becomes the absolute checkpoint file it
    resolves to now, with that file's sha256 in run.init_sha256 (a run directory's config.json is checked
    against this model on the way); a run id, or no source, stays as it is. ConfigError says what is wrong."""
    value = data["run"].get("init_from")
    if value is None or _is_run_id(value):
        return data
    file = resolve(value).resolve()
    sha = _sha256(str(file), *_stamp(file))
    pinned_sha = data["run"].get("init_sha256")
    if pinned_sha not in (None, sha):
        raise ConfigError(f"run.init_from: {file} has sha256 {sha[:12]}…, not run.init_sha256 {pinned_sha[:12]}…")
    run_dir = file.parent.parent if file.parent.name == "checkpoints" else None
    if run_dir is not None and (run_dir / CONFIG).is_file():  # the source's model, without loading the file
        cfg = validate(data)  # ConfigError, one line a key, for a config that is wrong besides
        check_compatible(json.loads((run_dir / CONFIG).read_text()).get("model", {}), cfg, str(file))
    data = json.loads(json.dumps(data))
    data["run"].update(init_from=str(file), init_sha256=sha)
    return data


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=64)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    """A file's sha256, hashed once per process while it is unchanged (every seed of an arm pins the same)."""
    return sha256_of(Path(path))


def check_arm_source(data: dict[str, Any], source: TrainConfig, arm: str) -> None:
    """Refuse an arm whose model cannot take the weights of the arm it starts from (ConfigError)."""
    check_compatible(source.model.model_dump(mode="json"), TrainConfig.model_validate(data), f"arm {arm!r}")


def check_sources(runs: Sequence[RunSpec], open_db: Callable[[], Engine | None]) -> None:
    """Refuse runs whose run.init_from is a run id that names no run of this submission or of the database
    (`open_db()`, asked only if some run names one; None: there is no database yet), a run that has no
    weights or can no longer succeed, or a run whose model the new run cannot take."""
    import sqlalchemy as sa

    from orchestrator.db import Run
    from orchestrator.specs import SpecError

    here = {r.id: r for r in runs}
    wanted = {r.config.run.init_from for r in runs if _is_run_id(r.config.run.init_from)} - set(here)
    stored: dict[str, tuple[str, dict]] = {}
    engine = open_db() if wanted else None
    if engine is not None:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(Run.id, Run.state, Run.config).where(Run.id.in_(sorted(wanted))))
            stored = {rid: (state, config) for rid, state, config in rows}
    for r in runs:
        source = r.config.run.init_from
        if not _is_run_id(source) or source in here:
            continue
        what = f"{r.experiment}: intervention {r.arm!r}: run.init_from={source}"
        if source not in stored:
            raise SpecError(
                f"{what} names no run of the database (see `orch ls`): give a whole run id, another arm "
                "(Intervention(init_from='baseline'), whose runs this submission must hold: with "
                "include_baseline=False the baseline is not submitted, so set it to True), or the path of a run "
                "directory or checkpoint"
            )
        state, config = stored[source]
        if (config or {}).get("imported"):
            raise SpecError(f"{what} is an imported result, which has no weights to start from")
        if state in (RunState.FAILED, RunState.DIVERGED, RunState.CANCELLED, RunState.PRUNED):
            raise SpecError(f"{what} is {state} and would never be waited out: `orch retry {source}` first")
        try:
            check_compatible(config.get("model", {}), r.config, f"run {source}")
        except ConfigError as exc:
            raise SpecError(f"{what}: {exc}") from None


def _is_run_id(value: str | None) -> bool:
    return value is not None and bool(RUN_ID.fullmatch(value)) and not Path(value).exists()


# ---------------------------------------------------------------------------------------------------------
# Launch


def launch_config(engine: Engine, run: Run, runs_dir: Path) -> tuple[dict, str | None]:
    """The config.json a launch writes: run.init_from a run id becomes the source's directory. Returns it and
    None, or a config and the reason this host cannot launch the run (the source's directory is not here)."""
    import sqlalchemy as sa

    from orchestrator.db import Run

    config = json.loads(json.dumps(run.config))
    source = (config.get("run") or {}).get("init_from")
    if not _is_run_id(source):
        return config, None
    with engine.connect() as conn:
        row = conn.execute(sa.select(Run.run_dir, Run.node).where(Run.id == source)).first()
    if row is None:  # not one of ours after all: the trainer says what is wrong with the value
        return config, None
    candidates = [runs_dir / source, *([Path(row.run_dir)] if row.run_dir else [])]
    found = next((d for d in candidates if (d / CONFIG).is_file()), None)
    if found is None:
        return config, (
            f"{run.id} starts from run {source}, whose directory is not visible here (looked in "
            f"{', '.join(map(str, candidates))}; it trained on {row.node or 'another host'}): put --runs-dir on "
            "a filesystem every worker shares, or run a worker where it is"
        )
    config["run"]["init_from"] = str(found.resolve())
    return config, None

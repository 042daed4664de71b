"""Specs expanded into concrete runs: an experiment's arms × seeds × repeats (`expand`) and a sweep trial's
seeds (`trial_runs`), each a RunSpec whose config is validated before anything is queued; and the checks a
submit makes of them first (`identical_arms`, `check_data`).

A run's identity is a hash of its resolved config (which holds the seed and the data seed) and its repeat
number: the same run submitted from two files is one run, trained once — every file that shares the baseline
shares its runs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from orchestrator import dependencies
from orchestrator.specs import BASELINE, Experiment, SpecError, Sweep
from trainer import presets
from trainer.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class RunSpec:
    """One concrete run: what `orch submit` queues."""

    id: str
    experiment: str
    arm: str  # "baseline" or an intervention name
    config: TrainConfig
    repeat: int
    nodes: int = 1  # launch resources (Experiment.nodes), stored on the run row; not in its id

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def data_seed(self) -> int:
        return self.config.data.seed


def run_id(cfg: TrainConfig, repeat: int) -> str:
    """16 hex digits of sha256 over the canonical resolved config and the repeat number."""
    canonical = json.dumps({"config": cfg.identity(), "repeat": repeat}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def expand(
    exp: Experiment,
    *,
    source: str = "experiment",
    preset: str | None = None,
    seeds: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """Every run of the experiment: arms × seeds × repeats, each config validated before anything is queued.

    A bad file is reported whole: every unknown key and every impossible value, of the base, of the --set
    overrides and of every arm, in one SpecError (one problem a line), so one edit fixes them all. A problem
    of the base is named once, not again for each arm that inherits it."""
    try:
        base = presets.preset(preset or exp.preset)
    except ConfigError as exc:
        raise SpecError(f"{source}: base config: {exc}") from None
    problems: list[str] = []
    base = _apply(base, exp.base, "base config", problems)
    base = _apply(base, overrides or {}, "--set", problems)
    base_invalid = _invalid(base)
    problems += [f"base config: {line}" for line in base_invalid]
    runs: list[RunSpec] = []
    made: dict[tuple[str, int, int], RunSpec] = {}  # (arm, seed index, repeat): what other arms start from
    starts = {i.name: i.init_from for i in exp.interventions}
    for arm in dependencies.arm_order(exp):  # the baseline first, and any arm after the arm it starts from
        where = f"intervention {arm!r}"
        try:
            changes = {} if arm == BASELINE else exp.changes(arm)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        arm_problems: list[str] = []
        arm_data = _apply(base, changes, where, arm_problems)
        arm_problems += [f"{where}: {line}" for line in _invalid(arm_data) if line not in base_invalid]
        problems += arm_problems
        start = starts.get(arm)
        if arm_problems or base_invalid or (start is not None and (start, 0, 0) not in made):
            continue  # (an arm whose source has problems: they are named already)
        try:  # run.init_from: a path pinned to its checkpoint's sha256; the source's model checked
            arm_data = dependencies.pinned(arm_data)
            if start is not None:
                dependencies.check_arm_source(arm_data, made[(start, 0, 0)].config, start)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            continue
        for s in range(seeds or exp.seeds):
            for r in range(exp.repeats):
                data = arm_data if start is None else dependencies.from_arm(arm_data, made[(start, s, r)])
                cfg, repeat = seeded(data, exp.vary, s, r, exp.repeats, source=f"{source}: {where}")
                made[(arm, s, r)] = RunSpec(run_id(cfg, repeat), exp.name, arm, cfg, repeat, exp.nodes)
                if arm != BASELINE or exp.include_baseline:
                    runs.append(made[(arm, s, r)])
    problems += _other_test_tokens(made)
    if problems:
        raise SpecError(
            f"{source}: {len(problems)} problem{'s' * (len(problems) > 1)}, nothing queued:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    return runs


def _other_test_tokens(made: dict[tuple[str, int, int], RunSpec]) -> list[str]:
    """An arm whose test loss would be over other tokens than the baseline's (a longer context keeping
    eval.test_sequences scores n·T′ tokens, not n·T): its comparison with the baseline would not be honest."""
    base = next((spec.config for (arm, _, _), spec in made.items() if arm == BASELINE), None)
    if base is None:
        return []
    arms = {arm: made[(arm, 0, 0)].config for arm, _, _ in made}
    step = math.lcm(*(cfg.model.context_length for cfg in arms.values()))
    fix = -(-_test_tokens(base) // step) * step  # the baseline's test tokens, rounded up to whole windows of all
    return [
        f"intervention {arm!r}: its test loss would be over {_test_tokens(cfg):,} tokens ({cfg.test_windows()} × "
        f"{cfg.model.context_length}), the baseline's over {_test_tokens(base):,} ({base.test_windows()} × "
        f"{base.model.context_length}); set eval.test_tokens={fix} in the base (a multiple of every "
        "model.context_length) so that every arm is scored on the same tokens"
        for arm, cfg in arms.items()
        if _test_tokens(cfg) != _test_tokens(base)
    ]


def _test_tokens(cfg: TrainConfig) -> int:
    """The test slice in tokens (its targets are tokens 1 … n·T of the test split)."""
    return cfg.test_windows() * cfg.model.context_length


def _apply(data: dict[str, Any], changes: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any]:
    """`data` with the known keys of `changes` set; each unknown key is appended to `problems`, named."""
    unknown = []
    for key, value in changes.items():
        try:
            presets.apply_overrides(data, {key: value})
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            unknown.append(key)
    return presets.apply_overrides(data, {k: v for k, v in changes.items() if k not in unknown})


def _invalid(data: dict[str, Any]) -> list[str]:
    """Each impossible value of a config, one line per key (trainer.config's messages, with their fixes)."""
    try:
        presets.validate(data)
    except ConfigError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return []


def seeded(
    data: dict[str, Any], vary: str, s: int, r: int, repeats: int, source: str = "config"
) -> tuple[TrainConfig, int]:
    """The config and repeat number of seed index s, repeat r, under a `vary` mode."""
    changes: dict[str, Any] = {}
    if vary in ("init", "both"):
        changes["run.seed"] = data["run"]["seed"] + s
    if vary in ("data", "both"):
        changes.update({"data.order": "shuffled", "data.seed": data["data"]["seed"] + s})
    repeat = s * repeats + r if vary == "none" else r  # "none": seeds are identical repeats
    try:
        return presets.validate(presets.apply_overrides(data, changes), source=source), repeat
    except ConfigError as exc:
        raise SpecError(str(exc)) from None


def identical_arms(runs: list[RunSpec]) -> list[tuple[str, str]]:
    """Pairs of arms that resolve to the same runs (an intervention that changes nothing at this preset)."""
    first: dict[str, str] = {}
    pairs = set()
    for r in runs:
        other = first.setdefault(r.id, r.arm)
        if other != r.arm:
            pairs.add((other, r.arm))
    return sorted(pairs)


def check_data(configs: Iterable[TrainConfig]) -> None:
    """Refuse runs whose data directory is missing or damaged, or too small for their evaluation slices, from
    the shards' headers (trainer.data.check_dataset): otherwise a worker finds out only at launch."""
    from trainer.data import DataError, check_dataset

    seen = set()
    for cfg in configs:
        d = cfg.data
        key = (d.path, cfg.model.context_length, cfg.eval.val_sequences, cfg.test_windows())
        named = dict(dataset=d.dataset, start_train_token=d.start_train_token, start_val_token=d.start_val_token)
        if (key, *named.values()) in seen:
            continue
        seen.add((key, *named.values()))
        try:
            check_dataset(*key, **named)
        except DataError as exc:
            raise SpecError(f"data.path: {exc}") from None


def sweep_base(sweep: Sweep, preset: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep's base config as a dict, with validation every eval.interval steps for the pruner."""
    try:
        data = presets.apply_overrides(presets.preset(preset or sweep.preset), sweep.base)
        data = presets.apply_overrides(data, overrides or {})
        steps = presets.validate(data, source=f"sweep {sweep.name!r}").total_steps()
        for key in sweep.space:
            presets.apply_overrides(data, {key: None})  # an unknown key fails here, named
    except ConfigError as exc:
        raise SpecError(f"sweep {sweep.name!r}: {exc}") from None
    if not data["eval"]["interval"]:
        data["eval"]["interval"] = max(1, steps // 8)
    return data


def trial_runs(sweep: Sweep, base: dict[str, Any], params: dict[str, Any], arm: str) -> list[RunSpec]:
    """The runs of one trial: the base with the trial's parameters, one per seed."""
    try:
        data = dependencies.pinned(presets.apply_overrides(base, params))  # a path in run.init_from pinned
    except ConfigError as exc:
        raise SpecError(f"sweep {sweep.name!r}: {exc}") from None
    runs = []
    for s in range(sweep.seeds):
        cfg, repeat = seeded(data, "init", s, 0, 1, source=f"sweep {sweep.name!r} {arm}")
        runs.append(RunSpec(run_id(cfg, repeat), sweep.name, arm, cfg, repeat))
    return runs

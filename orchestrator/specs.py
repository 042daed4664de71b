"""Experiment specs: a baseline plus named interventions, expanded into concrete runs.

An experiment file is plain Python that defines `experiment = Experiment(...)`:

    from orchestrator.specs import Experiment, Intervention

    experiment = Experiment(
        name="gradient-clipping",
        interventions=[Intervention(name="clip-3.5", set={"optim.grad_clip": 3.5})],
        seeds=2,
    )

Interventions are changes to the baseline, written as dotted config keys, so one file runs at any scale:
`--preset tiny` on a laptop, `--preset gpt2-small` on a GPU node. A run's identity is a hash of its resolved
config (which holds the seed and the data seed) and its repeat number: the same run submitted from two files
is one run, trained once — every file that shares the baseline shares its runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import runpy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import dependencies
from trainer import config as train_config
from trainer.config import ConfigError, TrainConfig

BASELINE = "baseline"


class SpecError(ValueError):
    """A bad experiment file, with the file, the intervention and the key in the message."""


# Experiment, sweep and intervention names become MLflow experiment names, artifact folders and file names:
# no path separators, no '..', nothing hidden, no control characters.
NAME_RULE = "letters, digits and . _ - + =, not starting with '.' or '-', at most 200 characters"
_NAME = re.compile(r"[A-Za-z0-9_+=][A-Za-z0-9._+=-]{0,199}")


def check_name(name: object, what: str = "") -> str:
    """`name` if it is a valid experiment / sweep / intervention name, else ValueError saying what is allowed."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    shown = repr(name) if not isinstance(name, str) or len(name) <= 60 else f"{name[:40]!r}… ({len(name)} characters)"
    raise ValueError(f"{what + ' ' if what else ''}{shown} is not a valid name: use {NAME_RULE}")


class Intervention(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    set: dict[str, Any] = Field(default_factory=dict, description="dotted config keys and their new values")
    stack: list[str] = Field(default_factory=list, description="names of other interventions applied together")
    description: str = ""
    # orchestrator/dependencies.py: run.init_from becomes the id of that arm's run of the same seed and repeat.
    init_from: str | None = Field(
        None,
        description="another arm ('baseline' or an intervention) whose run of the same seed this arm starts "
        "from: its weights, once it has succeeded",
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name)


class Looks(BaseModel):
    """The run counts at which `orch more-seeds` looked at an experiment's verdicts: after every run added,
    from `first` to `last` per arm. `orch table` then tests each verdict at the sequential level
    (orchestrator/stats.py), so that looking again and again cannot manufacture a verdict. The tool records
    it, and a resubmission never drops it (queue.submit); a file may also declare it up front."""

    model_config = ConfigDict(extra="forbid")

    first: int = Field(2, ge=2)
    last: int = Field(ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> Looks:
        if self.first > self.last:
            raise ValueError(f"looks: first ({self.first}) must not exceed last ({self.last})")
        return self

    def union(self, other: Looks | None) -> Looks:
        return self if other is None else Looks(first=min(self.first, other.first), last=max(self.last, other.last))


class Experiment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    preset: str = "tiny"
    base: dict[str, Any] = Field(default_factory=dict, description="changes to the preset shared by every run")
    interventions: list[Intervention] = Field(default_factory=list)
    seeds: int = Field(1, ge=1, description="seeds per arm: run.seed, run.seed+1, …")
    # What a seed varies: the initialisation (and dropout) seed, the data order (shuffled, data.seed), both,
    # or nothing at all (identical configs as repeats: the nondeterminism of the hardware alone).
    vary: Literal["init", "data", "both", "none"] = "init"
    repeats: int = Field(1, ge=1, description="identical repeats per seed (measure nondeterminism alone)")
    include_baseline: bool = True
    looks: Looks | None = None  # set by `orch more-seeds`: verdicts are sequential tests from then on
    # Labels and notes for people (and MLflow, where they become the experiment's tags and note): set in the
    # file, or added later with `orch tag` / `orch note`, which a resubmitted file keeps.
    tags: dict[str, str] = Field(default_factory=dict, description="labels, e.g. {'owner': 'ana'}")
    notes: list[str] = Field(default_factory=list, description="notes added with `orch note`, oldest first")
    # The smallest effect of interest δ in test-loss nats: an arm whose improvement is shown to lie within ±δ
    # is "equivalent" to the baseline (a TOST test, orchestrator/stats.py); without one, an arm that is
    # neither better nor worse stays "undecided". `orch table --sesoi` overrides it.
    sesoi: float | None = Field(None, gt=0, description="smallest improvement that matters, in nats (equivalence)")
    # Nodes each run trains on (a Slurm pilot of as many nodes, one torchrun agent per node): launch
    # resources, not training semantics (the trainer's numbers depend on the world size only), so not a
    # config key and not part of a run's id.
    nodes: int = Field(1, ge=1, description="nodes per run (Slurm pilots of --nodes-per-job N claim it)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("interventions")
    @classmethod
    def _unique_names(cls, interventions: list[Intervention]) -> list[Intervention]:
        names = [i.name for i in interventions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"intervention names must be unique; repeated: {', '.join(dupes)}")
        if BASELINE in names:
            raise ValueError(f"{BASELINE!r} is reserved for the baseline; rename that intervention")
        for i in interventions:
            unknown = [n for n in i.stack if n not in names or n == i.name]
            if unknown:
                raise ValueError(
                    f"intervention {i.name!r} stacks {', '.join(map(repr, unknown))}, which "
                    f"{'is' if len(unknown) == 1 else 'are'} not another intervention of this experiment"
                )
        dependencies.check_starts(interventions)
        return interventions

    def changes(self, name: str, _inside: tuple[str, ...] = ()) -> dict[str, Any]:
        """The dotted changes of an intervention, its stacked parts' included; a key two parts set
        differently is an error naming both."""
        if name in _inside:
            raise ValueError(f"interventions stack each other in a circle: {' -> '.join([*_inside, name])}")
        by_name = {i.name: i for i in self.interventions}
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for part in [*by_name[name].stack, name]:
            part_changes = self.changes(part, (*_inside, name)) if part != name else by_name[name].set
            for key, value in part_changes.items():
                if key in merged and merged[key] != value and part != name:
                    raise ValueError(
                        f"intervention {name!r} stacks {owner[key]!r} and {part!r}, which set {key} "
                        f"differently ({merged[key]!r} vs {value!r}); set {key} in {name!r} itself "
                        "to say which wins"
                    )
                merged[key] = value
                owner[key] = part
        return merged


class LogUniform(BaseModel):
    """A positive float searched on a log scale (learning rates, weight decays)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["log"] = "log"
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class Uniform(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["uniform"] = "uniform"
    low: float
    high: float


class Choice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["choice"] = "choice"
    choices: list[Any] = Field(min_length=1)


Param = LogUniform | Uniform | Choice


class Sweep(BaseModel):
    """A search over config keys, run as ordinary queued runs (orchestrator/sweep.py).

    The objective is the final validation loss (mean over the trial's seeds): tuning on the test set would
    leak it into every comparison made later. Pruning reads the intermediate validation losses, so runs
    evaluate every eval.interval steps (set to an eighth of the run when the base leaves it at 0).
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    preset: str = "tiny"
    base: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, Param] = Field(
        default_factory=lambda: {
            "optim.lr": LogUniform(low=1e-4, high=1e-2),
            "optim.weight_decay": LogUniform(low=1e-3, high=1.0),
        }
    )
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    grid_points: int = Field(4, ge=2, description="grid sampler: values per searched key")
    pruner: Literal["median", "hyperband", "none"] = "median"
    trials: int = Field(20, ge=1, description="trials that complete or are pruned")
    in_flight: int = Field(2, ge=1, description="trials queued or running at once")
    seeds: int = Field(1, ge=1, description="runs per trial (the objective is their mean)")
    sampler_seed: int = 0
    # Known configurations to evaluate first (e.g. the published ones), before the sampler proposes any.
    start_with: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return check_name(name)

    @field_validator("space")
    @classmethod
    def _ranges(cls, space: dict[str, Param]) -> dict[str, Param]:
        if not space:
            raise ValueError("space is empty: name at least one config key to search, e.g. 'optim.lr'")
        for key, p in space.items():
            if isinstance(p, (LogUniform, Uniform)) and not p.low < p.high:
                raise ValueError(f"space[{key!r}]: low ({p.low}) must be below high ({p.high})")
        return space

    @model_validator(mode="after")
    def _start_inside_space(self) -> Sweep:
        for point in self.start_with:
            extra = set(point) - set(self.space)
            if extra:
                raise ValueError(
                    f"start_with point {point} sets {', '.join(sorted(extra))}, which the space "
                    f"does not search (space: {', '.join(self.space)})"
                )
        return self


def load_sweep(path: str | Path) -> Sweep:
    """Execute a sweep file and return its `sweep`, or raise SpecError saying what is wrong."""
    return _load(path, "sweep", Sweep, "see experiments/sweep_lr_wd.py")


def sweep_base(sweep: Sweep, preset: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sweep's base config as a dict, with validation every eval.interval steps for the pruner."""
    try:
        data = train_config.apply_overrides(train_config.preset(preset or sweep.preset), sweep.base)
        data = train_config.apply_overrides(data, overrides or {})
        steps = train_config.validate(data, source=f"sweep {sweep.name!r}").total_steps()
        for key in sweep.space:
            train_config.apply_overrides(data, {key: None})  # an unknown key fails here, named
    except ConfigError as exc:
        raise SpecError(f"sweep {sweep.name!r}: {exc}") from None
    if not data["eval"]["interval"]:
        data["eval"]["interval"] = max(1, steps // 8)
    return data


def trial_runs(sweep: Sweep, base: dict[str, Any], params: dict[str, Any], arm: str) -> list[RunSpec]:
    """The runs of one trial: the base with the trial's parameters, one per seed."""
    try:
        data = dependencies.pinned(train_config.apply_overrides(base, params))  # a path in run.init_from pinned
    except ConfigError as exc:
        raise SpecError(f"sweep {sweep.name!r}: {exc}") from None
    runs = []
    for s in range(sweep.seeds):
        cfg, repeat = seeded(data, "init", s, 0, 1, source=f"sweep {sweep.name!r} {arm}")
        runs.append(RunSpec(run_id(cfg, repeat), sweep.name, arm, cfg, repeat))
    return runs


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


def load_experiment(path: str | Path) -> Experiment:
    """Execute an experiment file and return its `experiment`, or raise SpecError saying what is wrong."""
    return _load(path, "experiment", Experiment, "see experiments/ for examples")


def _load(path: str | Path, kind: str, cls: type, example: str):
    """Run a spec file (user code: any exception is a spec error, reported with its line) and take `kind`."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{kind} file {path} does not exist ({example})")
    try:
        namespace = runpy.run_path(str(path), run_name=f"__orch_{kind}__")
    except ValidationError as exc:
        inner = "" if exc.title == cls.__name__ else f"{exc.title} "  # e.g. an Intervention(...) inside it
        raise SpecError(f"{path}: invalid {kind}: {inner}{_pydantic_lines(exc)}") from None
    except SystemExit as exc:
        raise SpecError(f"{path}: the file calls exit({exc.code!r}); it should only define `{kind} = ...`") from None
    except Exception as exc:
        raise SpecError(f"{path}{_user_line(exc, path)}: {type(exc).__name__}: {exc}") from None
    spec = namespace.get(kind)
    if not isinstance(spec, cls):
        raise SpecError(f"{path} must define `{kind} = {cls.__name__}(...)` (from orchestrator.specs)")
    return spec


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
        base = train_config.preset(preset or exp.preset)
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
            train_config.apply_overrides(data, {key: value})
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            unknown.append(key)
    return train_config.apply_overrides(data, {k: v for k, v in changes.items() if k not in unknown})


def _invalid(data: dict[str, Any]) -> list[str]:
    """Each impossible value of a config, one line per key (trainer.config's messages, with their fixes)."""
    try:
        train_config.validate(data)
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
        return train_config.validate(train_config.apply_overrides(data, changes), source=source), repeat
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


def _pydantic_lines(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `loc: message (got value)` per error, joined by '; '."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        shown = (
            f" (got {got!r})"
            if isinstance(got, (int, float, str)) and err["type"] != "value_error" and len(repr(got)) < 60
            else ""
        )
        lines.append(f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}{shown}")
    return "; ".join(lines)


def _user_line(exc: BaseException, path: Path) -> str:
    tb, line = exc.__traceback__, ""
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line

"""Experiment and sweep specs, and loading them from files: an experiment is a baseline plus named
interventions, a sweep a search space over config keys. runspec.py expands them into concrete runs.

An experiment file is plain Python that defines `experiment = Experiment(...)`:

    from orchestrator.specs import Experiment, Intervention

    experiment = Experiment(
        name="gradient-clipping",
        interventions=[Intervention(name="clip-3.5", set={"optim.grad_clip": 3.5})],
        seeds=2,
    )

Interventions are changes to the baseline, written as dotted config keys, so one file runs at any scale:
`--preset tiny` on a laptop, `--preset gpt2-small` on a GPU node; and every file that shares the baseline
shares its runs (runspec.py: a run is its resolved config).
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import dependencies

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
    it, and a resubmission never drops it (submission.submit); a file may also declare it up front."""

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

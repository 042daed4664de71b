"""Results: the leaderboard, the studies that grow an experiment (noise, more seeds, imported results), the
report page and the scaling-law suggestions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator import more_seeds as seeds_
from orchestrator import noise as noise_
from orchestrator import queries, table_render
from orchestrator import table as tbl
from orchestrator.api.connection import check_alpha, connect, refuse_password
from orchestrator.api.runs import Db, known_experiments
from orchestrator.api.submitting import Submitted
from orchestrator.more_seeds import Round
from orchestrator.tracking import open_tracker


@dataclass
class Leaderboard:
    """One board per experiment (orchestrator/table.py's Board: rows, verdicts, noise, failed runs)."""

    boards: list[tbl.Board]

    def render(self, fmt: str = "markdown", stats_columns: bool = False) -> str | None:
        """markdown | blog | csv | json as text (blog: the blog series' table; `stats_columns` adds CI, p and
        verdict to it); rich prints to the terminal itself, compact where it is narrow, and returns None."""
        return table_render.render(self.boards, fmt, stats_columns=stats_columns)

    def __str__(self) -> str:
        return self.render("markdown")


def table(
    experiments: str | Sequence[str] | None = None,
    *,
    alpha: float = 0.05,
    correction: str = "holm",
    sesoi: float | str | None = None,
    target: float | None = None,
    target_alpha: float = 0.01,
    db: Db = None,
) -> Leaderboard:
    """The leaderboard of the named experiments (default: all), each with its noise studies: arms ranked by
    mean test loss, improvement vs baseline with a CI, p-value and verdict — better, worse, equivalent (within
    ±`sesoi` nats; "auto": the baseline's σ; default: the experiment's own sesoi) or undecided — corrected
    across each board's arms (`correction`: holm | bh | none) and for more_seeds' looks. With `target`, each
    arm is also tested for a mean test loss below it (one-sided, p < `target_alpha`)."""
    options = _options(alpha, correction, sesoi, target, target_alpha)
    names = [experiments] if isinstance(experiments, str) else list(experiments or [])
    engine = connect(db)
    sweeps: set[str] = set()
    if names:
        members = queries.runs_of(engine, noise_.with_studies(engine, names))
    else:
        # All experiments but the sweeps: a sweep's trials are one run each, unconfirmed, chosen on the
        # validation loss; `orch sweep status` shows them, `orch table SWEEP` still does when asked, and the
        # verdict on its best trial is `orch sweep confirm`'s experiment SWEEP.confirm, which is listed.
        sweeps = set(queries.sweep_names(engine))
        members = [m for m in queries.runs_of(engine) if (noise_.parent(m.experiment) or m.experiment) not in sweeps]
    boards = tbl.build(members, queries.specs(engine), options=options)
    known_experiments(engine, names)
    if not boards:
        if sweeps:
            raise ValueError(
                f"no runs yet outside the sweeps ({', '.join(sorted(sweeps))}): `orch table SWEEP` shows "
                "a sweep's trials, `orch sweep status` where the sweeps stand"
            )
        raise ValueError("no runs yet: queue some with `orch submit experiments/quickstart.py`")
    return Leaderboard(boards)


def _options(alpha: float, correction: str, sesoi, target=None, target_alpha: float = 0.01) -> tbl.Options:
    check_alpha(alpha)
    return tbl.Options(alpha, correction, sesoi, target, target_alpha)


def noise(experiment: str, *, repeats: int = 8, vary: str = "init", db: Db = None) -> Submitted:
    """Repeat an experiment's baseline varying one source of noise (init | data | both | none) as experiment
    EXP.noise-VARY; the table then shows σ per source."""
    report = noise_.noise(connect(db), experiment, repeats, vary)
    return Submitted.of(noise_.study_name(experiment, vary), report)


def more_seeds(
    experiment: str,
    *,
    max_seeds: int = 8,
    alpha: float = 0.05,
    correction: str = "holm",
    sesoi: float | str | None = None,
    until_decided: bool = False,
    poll: float = 10.0,
    db: Db = None,
    on_round: Callable[[Round], None] | None = None,
) -> list[Round]:
    """Queue extra seeds only where a verdict is still open and more seeds could still close it; with
    `until_decided`, wait for them and look again until no verdict is open (workers must be running).
    Judge with the same `alpha`, `correction` and `sesoi` as the `table` you will read."""
    options = _options(alpha, correction, sesoi)
    return seeds_.grow(connect(db), experiment, max_seeds, options, until_decided, poll, on_round)


@dataclass
class ImportReport:
    experiment: str
    count: int


def import_results(
    path: str | Path, *, experiment: str | None = None, baseline: str = "baseline", db: Db = None
) -> ImportReport:
    """Add results measured elsewhere (CSV or JSON: name, test_loss and optional seed, stack "a+b") to the
    table as experiment `experiment` (default: the file's name), marked as imported."""
    from orchestrator import imports

    name = experiment or Path(path).stem
    refuse_password(db)
    imports.plan_import(path, name, baseline)  # every row checked before the database is opened
    return ImportReport(name, imports.import_results(connect(db, create=True), path, name, baseline))


def report(
    experiment: str,
    *,
    out: str | Path = "report",
    alpha: float = 0.05,
    correction: str = "holm",
    sesoi: float | str | None = None,
    runs_dir: str | Path = "runs",
    mlflow: str | None = None,
    track: bool = True,
    db: Db = None,
) -> Path:
    """One self-contained HTML page (and PNGs) with loss curves, improvements with CIs and the table, also
    attached to the experiment in MLflow unless `track` is False; returns the page's path."""
    from orchestrator.report import write_report

    options = _options(alpha, correction, sesoi)
    engine = connect(db)
    known_experiments(engine, [experiment])
    return write_report(
        engine, experiment, Path(out), options, tracker=open_tracker(mlflow, track), runs_dir=Path(runs_dir)
    )


@dataclass
class Suggestions:
    items: list  # scaling.Suggestion: value, unit, formula, inputs, source
    emitted: Path | None = None  # the experiment file written with the suggested η and λ

    def text(self) -> str:
        from orchestrator import scaling

        return scaling.render_text(self.items)

    def to_json(self) -> str:
        from orchestrator import scaling

        return scaling.to_json(self.items)


def suggest(
    *,
    params: int | None = None,
    preset: str | None = None,
    tokens: int | None = None,
    batch: int | None = None,
    lr: float | None = None,
    context: int | None = None,
    flops: float | None = None,
    emit: str | Path | None = None,
) -> Suggestions:
    """Scaling-law suggestions (Chinchilla, DeepSeek, Cerebras), each with its formula, inputs and source;
    N, shape and batch come from `preset` unless given. With `emit`, also write an experiment file."""
    from orchestrator import scaling
    from trainer import presets

    inputs = scaling.config_inputs(presets.load(preset_name=preset)) if preset else {}
    given = dict(params=params, tokens=tokens, batch_sequences=batch, lr=lr, context=context, flops=flops)
    inputs.update({k: v for k, v in given.items() if v is not None})
    if "params" not in inputs:
        raise ValueError("give --params N or --preset NAME")
    out = Suggestions(scaling.suggest(**inputs))
    if emit:
        # λ was computed for the η given (keep that η: emit λ alone) or for DeepSeek's η_opt (emit both).
        which = ("weight_decay",) if lr is not None else ("lr", "weight_decay")
        out.emitted = Path(emit)
        out.emitted.write_text(
            scaling.emit_experiment_file(
                out.items, name=out.emitted.stem.replace("_", "-"), preset=preset or "gpt2-small", which=which
            )
        )
    return out

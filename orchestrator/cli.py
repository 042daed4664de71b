"""`orch`: a thin typer layer over the Python API. Heavy modules (torch, SQLAlchemy, MLflow) are imported
inside the commands, so `orch --help` answers at once. User errors print one line with the fix, never a
traceback.
"""

from __future__ import annotations

from orchestrator import states
from orchestrator.states import RunState

import sys
import time
from contextlib import contextmanager
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

# The error classes whose messages are written for users (the module, the class): any of them escaping a
# command is still one line. Looked up only in modules already imported, so `orch --help` stays instant.
USER_ERRORS = (("orchestrator.specs", "SpecError"), ("trainer.config", "ConfigError"),
               ("orchestrator.db", "SchemaError"), ("trainer.data", "DataError"))
_opened: dict = {}  # the URL of the database this command opened, for messages about it


class Commands(TyperGroup):
    """Every `orch` command: a user error that surfaces anywhere inside one (a database file found damaged
    mid-command, a server gone, a spec or data error past the command's own checks) ends as one line with
    exit 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _user_message(exc)
            if message is None:
                raise
            fail(message)


def _usage_errors() -> tuple[type, type | tuple]:
    try:  # typer >= 0.2x carries its own copy of click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:
        from click.exceptions import UsageError

        NoArgsIsHelpError = ()  # noqa: N806
    return UsageError, NoArgsIsHelpError


def _user_message(exc: BaseException) -> str | None:
    usage, no_args_help = _usage_errors()
    if isinstance(exc, usage) and not isinstance(exc, no_args_help):  # typer's own parse errors, as one line too
        command = ["orch", *(exc.ctx.command_path.split()[1:] if exc.ctx is not None else [])]
        return f"{exc.format_message()} (see `{' '.join(command)} --help`)"
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return str(exc)
    if "sqlalchemy" in sys.modules:
        from orchestrator import dberrors

        for e in (exc, exc.__cause__):  # Optuna wraps SQLAlchemy's errors in its own
            message = e is not None and dberrors.describe(e, _opened.get("url"))
            if message:
                return message
    return None


app = typer.Typer(help="Queue, train and compare GPT-2 pre-training interventions.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, cls=Commands)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DbOpt = Annotated[Optional[str], typer.Option("--db", help="SQLAlchemy URL (default $ORCH_DB or sqlite:///results.db)")]
MlflowOpt = Annotated[Optional[str], typer.Option("--mlflow", help="MLflow tracking URI (default $ORCH_MLFLOW or sqlite:///mlflow.db)")]
NoCheckDataOpt = Annotated[bool, typer.Option("--no-check-data", help="do not check data.path here (the data lives only on the worker nodes)")]


def fail(message: str) -> None:
    """Print `error: message` as one line (a multi-line message is joined) and exit 2."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()] or ["failed"]
    text = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    if "://" in text or "password" in text.lower():
        from orchestrator.dberrors import redact

        text = redact(text)
    typer.secho(f"error: {text}", fg="red", err=True)
    raise typer.Exit(2)


@contextmanager
def user_errors():
    """Turn the errors a user can fix into one line each."""
    from orchestrator.db import SchemaError
    from orchestrator.specs import SpecError
    from trainer.config import ConfigError

    try:
        yield
    except (SpecError, ConfigError, SchemaError, ValueError) as exc:
        fail(str(exc))


def engine(db: str | None, create: bool = False, check_schema: bool = True):
    """The runs database; only commands that write runs (submit, worker, import, sweep) may create it."""
    from orchestrator.db import connect

    refuse_password(db)
    with user_errors():
        eng = connect(db, create=create, check_schema=check_schema)
    _opened["url"] = eng.url
    return eng


def refuse_password(db: str | None) -> None:
    """A password in --db is on the command line, which every user of the machine can read (ps, /proc)."""
    import sqlalchemy as sa

    if db is None:
        return
    try:
        url = sa.engine.make_url(db)
        has_password = bool(url.password) or "password" in {k.lower() for k in url.query}
    except (sa.exc.ArgumentError, ValueError):  # connect() says what is wrong with it, unless it shows a password
        from orchestrator.dberrors import redact

        has_password = redact(db) != db
    if has_password:
        fail("--db holds a password, which anyone on this machine can read in `ps`: put the password in "
             "~/.pgpass or $PGPASSWORD (libpq reads both), or in $ORCH_DB, not on the command line")


def open_tracker(mlflow: str | None):
    """The MLflow tracker; a password in --mlflow is refused like one in --db (MLflow reads
    $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, or $ORCH_MLFLOW may hold the whole URI)."""
    from urllib.parse import urlsplit

    if mlflow is not None and urlsplit(mlflow).password:
        fail("--mlflow holds a password, which anyone on this machine can read in `ps`: set "
             "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, or give the URI in $ORCH_MLFLOW")
    from orchestrator.tracking import Tracker

    return Tracker(mlflow)


def check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        fail(f"--alpha must be between 0 and 1, e.g. 0.05, not {alpha}")


def check_positive(option: str, value: float, minimum: float = 1, example: str = "") -> None:
    if not value >= minimum:  # `not >=` also refuses NaN
        fail(f"{option} must be at least {minimum:g}, not {value:g}" + (f"; e.g. {option} {example}" if example else ""))


def check_run_prefix(prefix: str) -> None:
    """Run ids are 16 hex digits (imported ones: imp + 13); a prefix must look like one, not like a LIKE pattern."""
    import re

    if not re.fullmatch(r"[0-9a-z]{1,16}", prefix):
        fail(f"{prefix!r} is not a run id or a prefix of one (hex digits, e.g. 3f2a; see `orch ls`)")


def check_data(configs) -> None:
    from orchestrator import specs

    try:
        specs.check_data(configs)
    except specs.SpecError as exc:
        fail(f"{exc} (or pass --no-check-data if the data lives only on the worker nodes)")


def parse_sets(items: list[str]) -> dict:
    from trainer.config import parse_value

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"--set expects key=value (e.g. --set optim.lr=1e-3), got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="an experiment file, e.g. experiments/quickstart.py")],
    preset: Annotated[Optional[str], typer.Option(help="scale preset: tiny | gpt2-small")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="seeds per arm (overrides the file)")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key for every run")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be queued; queue nothing")] = False,
    no_check_data: NoCheckDataOpt = False,
    db: DbOpt = None,
):
    """Queue an experiment's runs; runs that exist already (same config, seed, repeat) are reused. Each
    data.path is checked first (shard headers, evaluation slices) unless --no-check-data."""
    from orchestrator import queue, specs

    if seeds is not None:
        check_positive("--seeds", seeds, example="3")
    refuse_password(db)
    with user_errors():
        exp = specs.load_experiment(file)
        runs = specs.expand(exp, source=file, preset=preset, seeds=seeds, overrides=parse_sets(set_))
    if not no_check_data:
        check_data([r.config for r in runs])
    for a, b in specs.identical_arms(runs):
        typer.secho(f"warning: {b!r} is identical to {a!r} at this preset; they share runs", fg="yellow", err=True)
    if dry_run:
        for r in runs:
            typer.echo(f"would queue {r.id}  {exp.name}/{r.arm}  seed {r.seed}  repeat {r.repeat}")
        typer.echo(f"{len(runs)} runs (dry run: nothing queued)")
        return
    report = queue.submit(engine(db, create=True), exp, runs, source=file)
    for r in report.queued:
        typer.echo(f"queued {r.id}  {r.arm}  seed {r.seed}" + (f"  repeat {r.repeat}" if r.repeat else ""))
    for r, state in report.reused:
        typer.echo(f"reused {r.id}  {r.arm}  seed {r.seed}  ({state})")
    typer.echo(f"{exp.name}: {len(report.queued)} queued, {len(report.reused)} reused")


@app.command()
def worker(
    gpus: Annotated[Optional[str], typer.Option(help="GPU indices to use, e.g. 0,1,2,3 (default: all; none → CPU)")] = None,
    gpus_per_run: Annotated[int, typer.Option(help="GPUs per run (torchrun processes)")] = 1,
    nproc_per_node: Annotated[int, typer.Option(help="processes per run on CPU")] = 1,
    parallel: Annotated[int, typer.Option(help="CPU runs at once (no GPUs)")] = 1,
    until_empty: Annotated[bool, typer.Option("--until-empty", help="exit when nothing is queued or running")] = False,
    runs_dir: Annotated[str, typer.Option(help="where run directories go")] = "runs",
    heartbeat: Annotated[float, typer.Option(help="seconds between heartbeats")] = 5.0,
    grace: Annotated[float, typer.Option(help="seconds without heartbeat before a run is requeued")] = 60.0,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not track in MLflow")] = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Claim queued runs and train them with torchrun, one per free GPU slot (or CPU slot)."""
    check_positive("--gpus-per-run", gpus_per_run, example="2")
    check_positive("--nproc-per-node", nproc_per_node, example="2")
    check_positive("--parallel", parallel, example="2")
    if not heartbeat > 0:
        fail(f"--heartbeat must be a positive number of seconds, not {heartbeat:g}; e.g. --heartbeat 5")
    if not grace > heartbeat:
        fail(f"--grace ({grace:g} s) must be longer than --heartbeat ({heartbeat:g} s), or live runs would be "
             f"requeued between two beats; e.g. --grace {max(60, 12 * heartbeat):g}")
    if gpus is not None:
        gpus = gpus.replace(" ", "")
        listed = [g for g in gpus.split(",") if g]
        if not all(g.isdigit() for g in listed) or len(set(listed)) < len(listed):
            fail(f"--gpus takes distinct GPU indices separated by commas, e.g. --gpus 0,1,2,3; got {gpus!r}")
    refuse_password(db)
    from orchestrator.worker import Worker, detect_gpus, plan_slots

    gpu_list = [g for g in gpus.split(",") if g] if gpus is not None else detect_gpus()
    with user_errors():
        slots = plan_slots(gpu_list, gpus_per_run, parallel)
    eng = engine(db, create=True)
    tracker = None
    if not no_mlflow:
        tracker = open_tracker(mlflow)
    w = Worker(eng, runs_dir=runs_dir, slots=slots, nproc_per_node=nproc_per_node, tracker=tracker,
               heartbeat_s=heartbeat, grace_s=grace)
    where = f"{len(slots)} GPU slot(s)" if gpu_list else f"{len(slots)} CPU slot(s)"
    typer.echo(f"worker {w.name}: {where}" + (", until the queue is empty" if until_empty else ""))
    n = w.run(until_empty=until_empty)
    typer.echo(f"worker {w.name}: {n} run(s) finished")


@app.command()
def table(
    experiments: Annotated[Optional[list[str]], typer.Argument(help="experiment names (default: all)")] = None,
    format: Annotated[str, typer.Option("--format", help="rich | markdown | csv | json")] = "rich",
    alpha: Annotated[float, typer.Option(help="significance level of the verdicts")] = 0.05,
    db: DbOpt = None,
):
    """The leaderboard: arms ranked by mean test loss; improvement vs baseline with a CI (95% at --alpha 0.05),
    p-value and verdict; sequential levels once `orch more-seeds` has looked at an experiment."""
    from orchestrator import queries
    from orchestrator import table as tbl

    if format not in ("rich", "markdown", "csv", "json"):
        fail(f"--format must be rich, markdown, csv or json, not {format!r}")
    check_alpha(alpha)
    eng = engine(db)
    names = experiments and [*experiments, *(n for n in queries.experiment_names(eng)
                                               if n.split(tbl.NOISE_SEP)[0] in experiments)]
    boards = tbl.build(queries.runs_of(eng, names), queries.specs(eng), alpha)
    known = queries.experiment_names(eng)
    unknown = sorted(set(experiments or []) - set(known))
    if unknown:
        fail(f"no experiment named {', '.join(map(repr, unknown))}; known: {', '.join(known) or 'none'}")
    if not boards:
        fail("no runs yet: queue some with `orch submit experiments/quickstart.py`")
    out = tbl.render(boards, format)
    if out is not None:
        typer.echo(out)


@app.command()
def noise(
    experiment: Annotated[str, typer.Argument(help="the experiment whose baseline to repeat")],
    repeats: Annotated[int, typer.Option(help="runs of the baseline")] = 8,
    vary: Annotated[str, typer.Option(help="init | data | both | none (nondeterminism alone)")] = "init",
    db: DbOpt = None,
):
    """Repeat an experiment's baseline varying one source of noise; `orch table` shows σ per source."""
    from orchestrator import studies

    eng = engine(db)
    with user_errors():
        report = studies.noise(eng, experiment, repeats, vary)
    typer.echo(f"{experiment}.noise-{vary}: {len(report.queued)} queued, {len(report.reused)} reused")


@app.command("more-seeds")
def more_seeds(
    experiment: Annotated[str, typer.Argument()],
    max_seeds: Annotated[int, typer.Option(help="never more runs than this per arm")] = 8,
    until_decided: Annotated[bool, typer.Option("--until-decided", help="wait for the runs and repeat until no verdict is open")] = False,
    alpha: Annotated[float, typer.Option(help="significance level of the verdicts")] = 0.05,
    poll: Annotated[float, typer.Option(help="seconds between checks with --until-decided")] = 10.0,
    db: DbOpt = None,
):
    """Queue extra seeds only where a verdict is still open and more seeds could still close it."""
    from orchestrator import queries, studies

    check_alpha(alpha)
    if not poll > 0:
        fail(f"--poll must be a positive number of seconds, not {poll:g}")
    eng = engine(db)
    while True:
        with user_errors():
            report, reasons = studies.more_seeds(eng, experiment, max_seeds, alpha)
        for arm, why in sorted(reasons.items()):
            typer.echo(f"  {arm}: {why}")
        typer.echo(f"{len(report.queued)} run(s) queued")
        pending = [r for _, _, r in queries.runs_of(eng, [experiment]) if r.state in states.ACTIVE]
        if not until_decided or not pending:
            if until_decided:
                typer.echo("every verdict is decided or at --max-seeds")
            return
        typer.echo(f"waiting for {len(pending)} run(s) (workers must be running: orch worker)")
        while any(r.state in states.ACTIVE for _, _, r in queries.runs_of(eng, [experiment])):
            time.sleep(poll)


@app.command("import")
def import_(
    file: Annotated[str, typer.Argument(help="CSV or JSON with name, test_loss and optional seed, stack (a+b)")],
    experiment: Annotated[str, typer.Option(help="experiment to add them to (default: the file's name)")] = "",
    baseline: Annotated[str, typer.Option(help="the row that is the baseline")] = "baseline",
    db: DbOpt = None,
):
    """Add results measured elsewhere to the table, marked as imported."""
    from pathlib import Path

    from orchestrator import studies

    name = experiment or Path(file).stem
    refuse_password(db)
    with user_errors():
        studies.plan_import(file, name, baseline)  # every row checked before the database is opened
    eng = engine(db, create=True)
    with user_errors():
        n = studies.import_results(eng, file, name, baseline)
    typer.echo(f"imported {n} result(s) into {name}: orch table {name}")


@app.command()
def suggest(
    params: Annotated[Optional[int], typer.Option(help="parameters N (default: from --preset)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="take N, shape and batch from a preset, e.g. gpt2-small")] = None,
    tokens: Annotated[Optional[int], typer.Option(help="training tokens D (default: Chinchilla's 20·N)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="batch B in sequences")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate η for λ (default: DeepSeek's η_opt)")] = None,
    context: Annotated[Optional[int], typer.Option(help="tokens per sequence")] = None,
    flops: Annotated[Optional[float], typer.Option(help="training compute C in FLOPs, if known")] = None,
    emit: Annotated[Optional[str], typer.Option(help="write an experiment file with the suggested η and λ")] = None,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
):
    """Scaling-law suggestions (Chinchilla, DeepSeek, Cerebras), each with its formula, inputs and source."""
    from pathlib import Path

    from orchestrator import scaling
    from trainer import config

    if format not in ("text", "json"):
        fail(f"--format must be text or json, not {format!r}")
    with user_errors():
        inputs = scaling.config_inputs(config.load(preset_name=preset)) if preset else {}
        given = dict(params=params, tokens=tokens, batch_sequences=batch, lr=lr, context=context, flops=flops)
        inputs.update({k: v for k, v in given.items() if v is not None})
        if "params" not in inputs:
            fail("give --params N or --preset NAME")
        suggestions = scaling.suggest(**inputs)
        if emit:
            # λ was computed for the η given (keep that η: emit λ alone) or for DeepSeek's η_opt (emit both).
            which = ("weight_decay",) if lr is not None else ("lr", "weight_decay")
            Path(emit).write_text(scaling.emit_experiment_file(suggestions, name=Path(emit).stem.replace("_", "-"),
                                                               preset=preset or "gpt2-small", which=which))
    if format == "json":
        typer.echo(scaling.to_json(suggestions))
    else:
        typer.echo(scaling.render_text(suggestions))
    if emit:
        typer.echo(f"wrote {emit}: orch submit {emit}", err=format == "json")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def sweep(
    target: Annotated[str, typer.Argument(help="a sweep file to run, or: status | plot | confirm")],
    name: Annotated[Optional[str], typer.Argument(help="the sweep's name (for status, plot, confirm)")] = None,
    preset: Annotated[Optional[str], typer.Option(help="scale preset for the trials")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key of every trial")] = [],
    out: Annotated[str, typer.Option(help="plot: output folder")] = "sweep-plots",
    seeds: Annotated[int, typer.Option(help="confirm: seeds for the best configuration and the baseline")] = 4,
    format: Annotated[str, typer.Option("--format", help="status: text | json")] = "text",
    poll: Annotated[float, typer.Option(help="seconds between checks of the queue")] = 2.0,
    grace: Annotated[float, typer.Option(help="seconds without a beat after which a standby `orch sweep` takes over")] = 60.0,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow")] = False,
    no_check_data: NoCheckDataOpt = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Optuna search through the queue: `orch sweep FILE` runs (or resumes) it while `orch worker`s train the
    trials; `orch sweep status NAME`, `orch sweep plot NAME --out DIR`, `orch sweep confirm NAME --seeds K`.
    optuna-dashboard works on the same database: optuna-dashboard sqlite:///results.db"""
    import json

    if target in ("status", "plot", "confirm"):
        if not name:
            fail(f"orch sweep {target} needs the sweep's name (see `orch sweep status NAME`)")
        if format not in ("text", "json"):
            fail(f"--format must be text or json, not {format!r}")
        if target == "confirm":
            check_positive("--seeds", seeds, example="4")
        eng = engine(db)
        from orchestrator import sweep as sw

        with user_errors():
            if target == "status":
                info = sw.status(eng, name)
                if format == "json":
                    typer.echo(json.dumps(info, indent=2))
                    return
                typer.echo(f"sweep {name}: " + ", ".join(f"{v} {k}" for k, v in sorted(info["counts"].items())))
                for t in info["trials"]:
                    value = f"{t['value']:.4f}" if t["value"] is not None else "—"
                    params = sw._fmt(t["params"])
                    typer.echo(f"  trial {t['number']:>3}  {t['state']:<9} {value:>8}  last step {t['last_step'] or '—':>5}  {params}")
                if info["best"]:
                    typer.echo(f"best: trial {info['best']['number']} val loss {info['best']['value']:.4f}  "
                               f"{sw._fmt(info['best']['params'])}")
            elif target == "plot":
                for path in sw.plot(eng, name, out):
                    typer.echo(f"wrote {path}")
            else:
                exp, report = sw.confirm(eng, name, seeds)
                typer.echo(f"{exp.name}: {len(report.queued)} queued, {len(report.reused)} reused; "
                           f"when trained: orch table {exp.name}")
        return
    from orchestrator import specs

    from pathlib import Path

    if not Path(target).is_file():
        fail(f"no sweep file {target!r}: run `orch sweep FILE` (e.g. experiments/sweep_lr_wd.py), or "
             "`orch sweep status|plot|confirm NAME`")
    if name is not None:
        fail(f"orch sweep FILE takes no name (got {name!r}); the name is in the file. Did you mean "
             f"`orch sweep status {name}`?")
    if not poll > 0:
        fail(f"--poll must be a positive number of seconds, not {poll:g}")
    if not grace >= 3 * poll:
        fail(f"--grace ({grace:g} s) must be at least 3 polls ({3 * poll:g} s), or a live driver would lose its "
             "sweep between two passes")
    refuse_password(db)
    with user_errors():
        spec = specs.load_sweep(target)
        overrides = parse_sets(set_)
        base = specs.sweep_base(spec, preset, overrides)
    if not no_check_data:
        from trainer.config import TrainConfig

        check_data([TrainConfig.model_validate(base)])
    eng = engine(db, create=True)
    from orchestrator import sweep as sw

    tracker = None
    if not no_mlflow:
        tracker = open_tracker(mlflow)
    with user_errors():
        driver = sw.Driver(eng, spec, preset=preset, overrides=overrides, tracker=tracker, poll_s=poll,
                           echo=typer.echo, lease_grace_s=grace)
    typer.echo(f"sweep {spec.name}: {spec.trials} trials, {spec.in_flight} in flight, {spec.sampler} sampler, "
               f"{spec.pruner} pruner (needs `orch worker` running)")
    driver.run()


@app.command()
def report(
    experiment: Annotated[str, typer.Argument()],
    out: Annotated[str, typer.Option(help="folder for index.html and the PNGs")] = "report",
    alpha: Annotated[float, typer.Option(help="significance level of the verdicts")] = 0.05,
    runs_dir: Annotated[str, typer.Option(help="where the workers' run directories are")] = "runs",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not attach the report to MLflow")] = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """One self-contained HTML page with loss curves, improvements with CIs and the table (also in MLflow)."""
    from pathlib import Path

    from orchestrator import queries
    from orchestrator.report import write_report

    check_alpha(alpha)
    eng = engine(db)
    known = queries.experiment_names(eng)
    if experiment not in known:
        fail(f"no experiment named {experiment!r}; known: {', '.join(known) or 'none'}")
    tracker = None
    if not no_mlflow:
        tracker = open_tracker(mlflow)
    with user_errors():
        path = write_report(eng, experiment, Path(out), alpha=alpha, tracker=tracker, runs_dir=Path(runs_dir))
    typer.echo(f"wrote {path}")


@app.command()
def ls(
    experiments: Annotated[Optional[list[str]], typer.Argument()] = None,
    state: Annotated[Optional[str], typer.Option(help="only runs in this state")] = None,
    db: DbOpt = None,
):
    """List runs: id, experiment, arm, seed, state, attempts, test loss."""
    from orchestrator import queries

    names = [str(s) for s in RunState]
    if state is not None and state not in names:
        fail(f"--state must be one of {', '.join(names)}, not {state!r}")
    eng = engine(db)
    if experiments:
        known = queries.experiment_names(eng)
        unknown = sorted(set(experiments) - set(known))
        if unknown:
            fail(f"no experiment named {', '.join(map(repr, unknown))}; known: {', '.join(known) or 'none'}")
    for exp, arm, r in queries.runs_of(eng, experiments):
        if state and r.state != state:
            continue
        loss = f"{r.test_loss:.4f}" if r.test_loss is not None else "—"
        typer.echo(f"{r.id}  {exp:<24} {arm:<20} seed {r.seed:<4} {r.state:<10} attempts {r.attempts}  {loss}")


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch/--once", help="refresh until interrupted")] = False,
    db: DbOpt = None,
):
    """Queued / running / done counts, and each running run's step, loss, tokens/s and ETA."""
    from rich.console import Console
    from rich.live import Live

    eng = engine(db)
    if not watch:
        Console().print(_status_view(eng))
        return
    with Live(_status_view(eng), refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(1)
                live.update(_status_view(eng))
        except KeyboardInterrupt:
            pass


def _status_view(eng):
    from rich.console import Group
    from rich.table import Table

    from orchestrator import queries

    counts = queries.counts(eng)
    summary = "  ".join(f"{k}: {counts.get(k, 0)}" for k in RunState)
    t = Table(title="running")
    for col in ("run", "experiment/arm", "seed", "step", "loss", "tokens/s", "ETA", "worker"):
        t.add_column(col)
    seen = set()
    for exp, arm, r in queries.runs_of(eng):
        if r.state != RunState.RUNNING or r.id in seen:
            continue
        seen.add(r.id)
        eta = "—"
        if r.step and r.total_steps and r.tokens_per_s:
            tokens_left = (r.total_steps - r.step) * r.config["run"]["batch_size"] * r.config["model"]["context_length"]
            eta = f"{tokens_left / r.tokens_per_s:,.0f}s"
        t.add_row(r.id, f"{exp}/{arm}", str(r.seed), f"{r.step or 0}/{r.total_steps or '?'}",
                  f"{r.train_loss:.4f}" if r.train_loss else "—",
                  f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "—", eta, r.worker or "")
    return Group(summary, t) if t.row_count else Group(summary, "nothing running")


@app.command()
def logs(run: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
         lines: Annotated[int, typer.Option("-n", help="last N lines")] = 50,
         db: DbOpt = None):
    """The trainer's log of a run (and its error, if it failed)."""
    from pathlib import Path

    check_positive("-n", lines, example="50")
    r = _one_run(engine(db), run)
    log = Path(r.run_dir or f"runs/{r.id}") / "train.log"
    if log.exists():
        typer.echo("\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
    else:
        typer.echo(f"(no log at {log} yet: state {r.state})")
    if r.error:
        typer.echo(f"--- last error ---\n{r.error}")


@app.command()
def cancel(
    target: Annotated[str, typer.Argument(help="a run id prefix or an experiment name")],
    include_shared: Annotated[bool, typer.Option("--include-shared", help="also cancel an experiment's runs that other experiments share")] = False,
    db: DbOpt = None,
):
    """Cancel queued and running runs of a run or an experiment (running trainers checkpoint and stop).

    An experiment's runs that other experiments share (the same config, trained once for all) are kept
    unless --include-shared: cancelling one study must not take the baseline from under another."""
    import re

    from orchestrator import queries, queue

    eng = engine(db)
    runs = [r for _, _, r in queries.runs_of(eng, [target])]
    ids = [r.id for r in runs]
    kept: dict[str, list[str]] = {}
    if ids and not include_shared:
        active = {r.id for r in runs if r.state in states.ACTIVE}
        kept = {i: names for i, names in queries.shared(eng, ids, target).items() if i in active}
        ids = [i for i in ids if i not in kept]
    elif not ids:
        ids = [r.id for r in queries.find(eng, target)] if re.fullmatch(r"[0-9a-z]{1,16}", target) else []
        if not ids:
            fail(f"no run or experiment matches {target!r} (see `orch ls`)")
    done = queue.cancel(eng, ids).done
    typer.echo(f"cancelled {len(done)} run(s)" + (f"; {len(ids) - len(done)} were already finished" if len(ids) > len(done) else ""))
    if kept:
        names = sorted({n for v in kept.values() for n in v})
        typer.echo(f"kept {len(kept)} run(s) that {', '.join(names)} also use(s); add --include-shared to cancel them too")


@app.command()
def retry(run: Annotated[str, typer.Argument(help="run id prefix")], db: DbOpt = None):
    """Requeue a failed, diverged, cancelled or pruned run with its attempts reset."""
    from orchestrator import queue

    eng = engine(db)
    r = _one_run(eng, run)
    moves = queue.retry(eng, [r.id])
    if moves.refused:
        fail(str(moves.refused[0]))
    typer.echo(f"requeued {r.id}")


@app.command()
def sync(
    runs_dir: Annotated[str, typer.Option(help="where the workers' run directories are")] = "runs",
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Send MLflow whatever it is missing of finished runs (after an outage, or runs trained with
    --no-mlflow); workers do this by themselves, this does it now. Safe beside running workers."""
    import socket
    import os

    from orchestrator import outbox

    eng = engine(db)
    box = outbox.Outbox(eng, open_tracker(mlflow), f"sync:{socket.gethostname()}:{os.getpid()}", runs_dir)
    done, pending = outbox.sync_all(box)
    typer.echo(f"synced {done} run(s) to MLflow" + (f"; {len(pending)} still pending:" if pending else ""))
    for run_id, why in pending:
        typer.echo(f"  {run_id}  {why}")
    if pending:
        raise typer.Exit(1)


@app.command()
def ui(port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000, mlflow: MlflowOpt = None):
    """Start the MLflow UI on 127.0.0.1 over the same tracking store."""
    import subprocess

    if not 1 <= port <= 65535:
        fail(f"--port must be between 1 and 65535, not {port}")
    from orchestrator.tracking import resolve_uri

    uri = resolve_uri(mlflow)
    typer.echo(f"MLflow UI for {uri} at http://127.0.0.1:{port}")
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", "127.0.0.1", "--port", str(port)]))


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None):
    """Migrate a database written by an older orch to this version's schema."""
    from orchestrator import migrations

    eng = engine(db, check_schema=False)
    before, after = migrations.upgrade(eng)
    typer.echo(f"schema {before or 'empty'} -> {after}")


def _one_run(eng, prefix: str):
    from orchestrator import queries

    check_run_prefix(prefix)
    matches = queries.find(eng, prefix)
    if not matches:
        fail(f"no run id starts with {prefix!r} (see `orch ls`)")
    if len(matches) > 1:
        fail(f"{prefix!r} matches {len(matches)} runs; give more of the id")
    return matches[0]


if __name__ == "__main__":
    app()

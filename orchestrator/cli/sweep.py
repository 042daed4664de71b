"""`orch sweep run FILE`, `orch sweep status NAME`, `orch sweep plot NAME`, `orch sweep confirm NAME`; and
`orch sweep FILE`, the shortcut for `orch sweep run FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from orchestrator.cli.common import (
    DbOpt,
    MlflowOpt,
    NoCheckDataOpt,
    NoMlflowOpt,
    app,
    call,
    check_format,
    fail,
    parse_sets,
)


class Verbs(TyperGroup):
    """The sweep's verbs; a first argument that is none of them (a sweep file, or a typo that `run` then
    reports with the verbs it could have been) goes to `run`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["run", *args]
        return super().parse_args(ctx, args)


sweep_app = typer.Typer(
    cls=Verbs,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Optuna search through the queue: `orch sweep FILE` runs (or resumes) it while `orch "
    "worker`s train the trials. optuna-dashboard works on the same database: "
    "optuna-dashboard sqlite:///results.db",
)
app.add_typer(sweep_app, name="sweep")
NameArg = Annotated[Optional[str], typer.Argument(help="the sweep's name (the `name` in its file)", show_default=False)]


def need(verb: str, name: str | None) -> str:
    if not name:
        fail(f"orch sweep {verb} needs the sweep's name (see `orch sweep status NAME`)")
    return name


@sweep_app.command()
def run(
    file: Annotated[str, typer.Argument(help="a sweep file, e.g. experiments/sweep_lr_wd.py")],
    name: Annotated[Optional[str], typer.Argument(hidden=True)] = None,
    preset: Annotated[Optional[str], typer.Option(help="scale preset for the trials")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key of every trial")] = [],
    trials: Annotated[Optional[int], typer.Option(help="trials to run, instead of the file's `trials`")] = None,
    in_flight: Annotated[
        Optional[int],
        typer.Option("--in-flight", help="trials queued or training at once, instead of the file's `in_flight`"),
    ] = None,
    poll: Annotated[float, typer.Option(help="seconds between checks of the queue")] = 2.0,
    grace: Annotated[
        float, typer.Option(help="seconds without a beat after which a standby `orch sweep` takes over")
    ] = 60.0,
    no_mlflow: NoMlflowOpt = False,
    no_check_data: NoCheckDataOpt = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Create or resume the sweep's Optuna study and drive it (needs `orch worker`s to train the trials)."""
    from orchestrator import api

    if name is not None and Path(file).is_file():
        fail(
            f"orch sweep FILE takes no name (got {name!r}); the name is in the file. Did you mean "
            f"`orch sweep status {name}`?"
        )
    call(
        api.sweep_run,
        file,
        preset=preset,
        overrides=parse_sets(set_),
        trials=trials,
        in_flight=in_flight,
        poll=poll,
        grace=grace,
        mlflow=mlflow,
        track=not no_mlflow,
        check_data_here=not no_check_data,
        db=db,
        echo=typer.echo,
    )


@sweep_app.command()
def status(
    name: NameArg = None,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    db: DbOpt = None,
):
    """Trials, best so far, pruned count; with no name, every sweep: trials finished of its target, best
    validation loss, and whether a driver runs it."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    info = call(api.sweep_status, name or None, db=db)
    typer.echo(info.to_json() if format == "json" else str(info))


@sweep_app.command()
def plot(
    name: NameArg = None, out: Annotated[str, typer.Option(help="output folder")] = "sweep-plots", db: DbOpt = None
):
    """Optimisation history, λ × η contour and importances (HTML + PNG)."""
    from orchestrator import api

    warn = lambda line: typer.echo(line, err=True)  # noqa: E731
    for path in call(api.sweep_plot, need("plot", name), out=out, db=db, echo=warn):
        typer.echo(f"wrote {path}")


@sweep_app.command()
def confirm(
    name: NameArg = None,
    seeds: Annotated[int, typer.Option(help="seeds for the best configuration and the baseline")] = 4,
    db: DbOpt = None,
):
    """Queue the best parameters against the baseline: a verdict in `orch table NAME.confirm`."""
    from orchestrator import api

    out = call(api.sweep_confirm, need("confirm", name), seeds=seeds, db=db)
    typer.echo(f"{out}; when trained: orch table {out.experiment}")

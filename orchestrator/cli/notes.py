"""`orch note` and `orch tag`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from orchestrator.cli.common import DbOpt, MlflowOpt, NoMlflowOpt, app, call, fail


@app.command()
def note(
    experiment: Annotated[str, typer.Argument(help="the experiment to note")],
    text: Annotated[str, typer.Argument(help="the note, in quotes")],
    no_mlflow: NoMlflowOpt = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Add a note to an experiment: kept with it, shown in MLflow under its description."""
    from orchestrator import api

    spec = call(api.note, experiment, text, mlflow=mlflow, track=not no_mlflow, db=db)
    typer.echo(f"{experiment}: {len(spec.notes)} note(s)")


@app.command()
def tag(
    experiment: Annotated[str, typer.Argument(help="the experiment to tag")],
    tags: Annotated[Optional[list[str]], typer.Argument(help="KEY=VALUE pairs, e.g. owner=ana")] = None,
    remove: Annotated[Optional[list[str]], typer.Option("--remove", help="a tag to drop (repeatable)")] = None,
    no_mlflow: NoMlflowOpt = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Set or drop an experiment's tags: kept with it, and its MLflow experiment's tags."""
    from orchestrator import api

    pairs = {}
    for item in tags or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"a tag is KEY=VALUE, e.g. owner=ana, not {item!r}")
        pairs[key.strip()] = value.strip()
    spec = call(api.tag, experiment, pairs, remove=remove or [], mlflow=mlflow, track=not no_mlflow, db=db)
    typer.echo(f"{experiment}: " + (", ".join(f"{k}={v}" for k, v in sorted(spec.tags.items())) or "no tags"))

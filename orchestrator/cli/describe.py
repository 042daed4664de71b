"""`orch show` and `orch diff`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from orchestrator.cli.common import DbOpt, app, call, check_format

FormatOpt = Annotated[str, typer.Option("--format", help="text | json")]


@app.command()
def show(
    run: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
    format: FormatOpt = "text",
    runs_dir: Annotated[str, typer.Option(help="where the workers' run directories are")] = "runs",
    db: DbOpt = None,
):
    """A run: what it changes from its baseline, its state, results and config, where it ran, where to look."""
    from orchestrator import api
    from orchestrator.tracking import resolve_uri

    check_format(format, ("text", "json"))
    view = call(api.show, run, runs_dir=runs_dir, db=db)
    if format == "json":
        typer.echo(json.dumps(asdict(view), indent=2, default=str))
        return
    typer.echo(f"run {view.id}: {view.state} (seed {view.seed}, data seed {view.data_seed}, repeat {view.repeat})")
    for m in view.memberships:
        changes = ", ".join(f"{k}={v!r}" for k, v in m.changes.items()) or "(no changes: the baseline)"
        typer.echo(f"  in {m.experiment} as {m.arm}: {changes}")
        if m.baseline_run:
            differs = "; ".join(f"{k}: {b!r} -> {a!r}" for k, (b, a) in m.differs.items()) or "nothing"
            typer.echo(f"    differs from baseline run {m.baseline_run} in: {differs}")
    typer.echo("results: " + (" · ".join(f"{k} {_value(v)}" for k, v in view.results.items()) or "none yet"))
    if view.error:
        typer.echo("last error:\n  " + view.error.replace("\n", "\n  "))
    typer.echo(f"run directory: {view.run_dir}  (orch logs {view.id[:8]})")
    if view.mlflow_run_id:
        typer.echo(f"MLflow: run {view.mlflow_run_id} in {resolve_uri()}  (orch ui)")
    typer.echo("config:")
    for key, value in view.config.items():
        typer.echo(f"  {key} = {value!r}")


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="a run id (prefix)")],
    b: Annotated[str, typer.Argument(help="another run id (prefix)")],
    format: FormatOpt = "text",
    db: DbOpt = None,
):
    """Two runs: the config keys in which they differ, and their results side by side."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    d = call(api.diff, a, b, db=db)
    if format == "json":
        typer.echo(json.dumps(asdict(d), indent=2, default=str))
        return
    rows = [(k, _config(va), _config(vb)) for k, (va, vb) in d.differs.items()]
    results = [(k, _value(va), _value(vb)) for k, (va, vb) in d.results.items()]
    width = max([len(k) for k, _, _ in rows + results] + [6])
    left = max([len(x) for _, x, _ in rows + results] + [len(d.a)])
    typer.echo(f"{'':{width}}  {d.a:<{left}}  {d.b}")
    typer.echo(f"config: {len(rows)} key(s) differ, {d.same_keys} agree")
    for k, va, vb in rows:
        typer.echo(f"{k:<{width}}  {va:<{left}}  {vb}")
    typer.echo("results:")
    for k, va, vb in results:
        typer.echo(f"{k:<{width}}  {va:<{left}}  {vb}")


def _config(v) -> str:
    return "—" if v is None else str(v)


def _value(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) >= 1e-3 else f"{v:.3g}"
    return str(v)

"""`orch table`, `noise`, `more-seeds`, `import`, `report` and `suggest`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from orchestrator.cli.common import (
    AlphaOpt,
    CorrectionOpt,
    DbOpt,
    MlflowOpt,
    SesoiOpt,
    app,
    call,
    check_format,
    parse_sesoi,
)


@app.command()
def table(
    experiments: Annotated[Optional[list[str]], typer.Argument(help="experiment names (default: all)")] = None,
    format: Annotated[
        str, typer.Option("--format", help="rich | markdown | blog (the blog series' table) | csv | json")
    ] = "rich",
    stats_columns: Annotated[
        bool, typer.Option("--stats", help="with --format blog: add the CI, p and verdict columns")
    ] = False,
    alpha: AlphaOpt = 0.05,
    correction: CorrectionOpt = "holm",
    sesoi: SesoiOpt = None,
    target: Annotated[
        Optional[float], typer.Option(help="also test each arm's mean test loss below this (e.g. 3.28), one-sided")
    ] = None,
    target_alpha: Annotated[float, typer.Option(help="level of the --target test (the records' rule)")] = 0.01,
    db: DbOpt = None,
):
    """The leaderboard: arms ranked by mean test loss; improvement vs baseline with a CI, p-value and verdict
    (better, worse, equivalent within ±--sesoi, undecided), corrected across the board's interventions and
    for `orch more-seeds`' looks."""
    from orchestrator import api

    check_format(format, ("rich", "markdown", "blog", "csv", "json"))
    out = call(
        api.table,
        experiments,
        alpha=alpha,
        correction=correction,
        sesoi=parse_sesoi(sesoi),
        target=target,
        target_alpha=target_alpha,
        db=db,
    ).render(format, stats_columns)
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
    from orchestrator import api

    out = call(api.noise, experiment, repeats=repeats, vary=vary, db=db)
    typer.echo(str(out))


@app.command("more-seeds")
def more_seeds(
    experiment: Annotated[str, typer.Argument(help="the experiment to add seeds to")],
    max_seeds: Annotated[int, typer.Option(help="never more runs than this per arm")] = 8,
    until_decided: Annotated[
        bool, typer.Option("--until-decided", help="wait for the runs and repeat until no verdict is open")
    ] = False,
    alpha: AlphaOpt = 0.05,
    correction: CorrectionOpt = "holm",
    sesoi: SesoiOpt = None,
    poll: Annotated[float, typer.Option(help="seconds between checks with --until-decided")] = 10.0,
    db: DbOpt = None,
):
    """Queue extra seeds only where a verdict is still open and more seeds could still close it."""
    from orchestrator import api

    def show(look: api.Round) -> None:
        for arm, why in sorted(look.reasons.items()):
            typer.echo(f"  {arm}: {why}")
        typer.echo(f"{len(look.report.queued)} run(s) queued")
        if until_decided and look.active:
            typer.echo(f"waiting for {look.active} run(s) (workers must be running: orch worker)")
        elif until_decided:
            typer.echo("every verdict is decided or at --max-seeds")

    call(
        api.more_seeds,
        experiment,
        max_seeds=max_seeds,
        alpha=alpha,
        correction=correction,
        sesoi=parse_sesoi(sesoi),
        until_decided=until_decided,
        poll=poll,
        db=db,
        on_round=show,
    )


@app.command("import")
def import_(
    file: Annotated[str, typer.Argument(help="CSV or JSON with name, test_loss and optional seed, stack (a+b)")],
    experiment: Annotated[str, typer.Option(help="experiment to add them to (default: the file's name)")] = "",
    baseline: Annotated[str, typer.Option(help="the row that is the baseline")] = "baseline",
    db: DbOpt = None,
):
    """Add results measured elsewhere to the table, marked as imported."""
    from orchestrator import api

    out = call(api.import_results, file, experiment=experiment or None, baseline=baseline, db=db)
    typer.echo(f"imported {out.count} result(s) into {out.experiment}: orch table {out.experiment}")


@app.command()
def report(
    experiment: Annotated[str, typer.Argument(help="the experiment to report on")],
    out: Annotated[str, typer.Option(help="folder for index.html and the PNGs")] = "report",
    alpha: AlphaOpt = 0.05,
    correction: CorrectionOpt = "holm",
    sesoi: SesoiOpt = None,
    runs_dir: Annotated[str, typer.Option(help="where the workers' run directories are")] = "runs",
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="do not attach the report to MLflow")] = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """One self-contained HTML page with loss curves, improvements with CIs and the table (also in MLflow)."""
    from orchestrator import api

    path = call(
        api.report,
        experiment,
        out=out,
        alpha=alpha,
        correction=correction,
        sesoi=parse_sesoi(sesoi),
        runs_dir=runs_dir,
        mlflow=mlflow,
        track=not no_mlflow,
        db=db,
    )
    typer.echo(f"wrote {path}")


@app.command()
def suggest(
    params: Annotated[Optional[int], typer.Option(help="parameters N (default: from --preset)")] = None,
    preset: Annotated[
        Optional[str], typer.Option(help="take N, shape and batch from a preset, e.g. gpt2-small")
    ] = None,
    tokens: Annotated[Optional[int], typer.Option(help="training tokens D (default: Chinchilla's 20·N)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="batch B in sequences")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate η for λ (default: DeepSeek's η_opt)")] = None,
    context: Annotated[Optional[int], typer.Option(help="tokens per sequence")] = None,
    flops: Annotated[Optional[float], typer.Option(help="training compute C in FLOPs, if known")] = None,
    emit: Annotated[Optional[str], typer.Option(help="write an experiment file with the suggested η and λ")] = None,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
):
    """Scaling-law suggestions (Chinchilla, DeepSeek, Cerebras), each with its formula, inputs and source."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    out = call(
        api.suggest,
        params=params,
        preset=preset,
        tokens=tokens,
        batch=batch,
        lr=lr,
        context=context,
        flops=flops,
        emit=emit,
    )
    typer.echo(out.to_json() if format == "json" else out.text())
    if out.emitted:
        typer.echo(f"wrote {out.emitted}: orch submit {out.emitted}", err=format == "json")

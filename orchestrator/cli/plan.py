"""`orch plan`: seeds per arm to detect a true improvement, from what the database measured."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from orchestrator.cli.common import AlphaOpt, DbOpt, app, call, check_format


@app.command()
def plan(
    experiment: Annotated[str, typer.Argument(help="the experiment to plan seeds for")],
    effect: Annotated[
        float, typer.Option(help="the true improvement to detect, in test-loss nats (baseline − arm), e.g. 0.01")
    ],
    power: Annotated[float, typer.Option(help="the chance of detecting it")] = 0.8,
    alpha: AlphaOpt = 0.05,
    sigma: Annotated[
        Optional[float], typer.Option(help="seed-to-seed std of the test loss (default: measured in the database)")
    ] = None,
    correction: Annotated[
        str, typer.Option(help="across the board's interventions: holm | bh | none (as `orch table` corrects)")
    ] = "holm",
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    db: DbOpt = None,
):
    """Seeds per arm to detect a true improvement of --effect with --power, paired (every arm on the same
    seeds, as orch runs them) and unpaired, from the σ measured for the experiment; and its power now."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    out = call(api.plan, experiment, effect=effect, power=power, alpha=alpha, sigma=sigma, correction=correction, db=db)
    typer.echo(out.to_json() if format == "json" else out.text())

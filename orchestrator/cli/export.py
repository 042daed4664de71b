"""`orch export`."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli.common import DbOpt, app, call


@app.command()
def export(
    run: Annotated[str, typer.Argument(help="run id (a unique prefix), run directory or checkpoint file")],
    out: Annotated[str, typer.Argument(help="the folder to write (new, or empty)")],
    format: Annotated[str, typer.Option("--format", help="hf: Hugging Face transformers (GPT2LMHeadModel)")] = "hf",
    force: Annotated[bool, typer.Option("--force", help="replace OUT if it exists and is not empty")] = False,
    db: DbOpt = None,
):
    """Export a run's newest checkpoint: `--format hf` writes a folder that transformers loads with
    `AutoModelForCausalLM.from_pretrained(OUT)` (and `AutoTokenizer`), checked to give orch's logits.
    Dense GPT-2-shaped models only: a setting GPT-2 has no equivalent of is refused, by name. Needs
    `pip install -e '.[hf]'`."""
    from orchestrator import api

    done = call(api.export, run, out, format=format, force=force, db=db)
    typer.echo(
        f"exported {done.checkpoint} (step {done.step}) to {done.out}/: GPT2LMHeadModel, {done.params:,} parameters; "
        f"logits within {done.max_logit_diff:.1e} of orch's"
    )
    typer.echo(f"  files: {', '.join(done.files)}")
    for note in done.notes:
        typer.echo(f"  note: {note}")

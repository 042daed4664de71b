"""`orch sample`."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Optional

import typer

from orchestrator.cli.common import DbOpt, app, call, check_format


@app.command()
def sample(
    run: Annotated[str, typer.Argument(help="run id (a unique prefix), run directory or checkpoint file")],
    prompt: Annotated[
        list[str], typer.Option("--prompt", help="the text to complete (repeat --prompt for several prompts)")
    ],
    tokens: Annotated[int, typer.Option("--tokens", help="new tokens per completion, at most")] = 40,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0: greedy; above 0: sampled from softmax(logits / T)")
    ] = 0.0,
    top_k: Annotated[
        Optional[int], typer.Option("--top-k", help="sample among the K likeliest tokens only (default: all)")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the first sampled completion; the i-th uses S + i")] = 0,
    count: Annotated[int, typer.Option("--count", help="sampled completions per prompt (with --temperature)")] = 1,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    db: DbOpt = None,
):
    """Complete a prompt with a run's newest checkpoint (a finished run's final weights), on the CPU: greedy by
    default, sampled with `--temperature` (and `--top-k`), the same text again for the same `--seed`.
    A finished run's own samples (sample.* in its config) are in its samples.json, its MLflow run and `orch report`."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    out = call(
        api.sample, run, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed, count=count, db=db
    )
    if format == "json":
        typer.echo(json.dumps({**asdict(out), "checkpoint": str(out.checkpoint)}, indent=2))
        return
    typer.echo(f"{out.checkpoint} (step {out.step})")
    for s in out.samples:
        how = "greedy" if s.kind == "greedy" else f"T={s.temperature:g} top-k {s.top_k or 'all'} seed {s.seed}"
        end = " <|endoftext|>" if s.ended == "eot" else ""
        typer.echo(f"\n[{how}] {s.prompt}{s.text}{end}")

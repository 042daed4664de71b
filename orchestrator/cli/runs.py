"""`orch submit`, `worker`, `status`, `ls`, `logs`, `cancel`, `retry`, `sync`, `ui` and `db upgrade`."""

from __future__ import annotations

import json
import time
from typing import Annotated, Optional

import typer

from orchestrator.cli.common import DbOpt, MlflowOpt, NoCheckDataOpt, NoMlflowOpt, app, call, check_format, parse_sets

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="an experiment file, e.g. experiments/quickstart.py")],
    preset: Annotated[Optional[str], typer.Option(help="scale preset: tiny | gpt2-small")] = None,
    seeds: Annotated[
        Optional[str],
        typer.Option(help="seeds per arm (overrides the file), or auto: as many as --effect needs (orch plan)"),
    ] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a config key for every run")] = [],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be queued; queue nothing")] = False,
    no_check_data: NoCheckDataOpt = False,
    effect: Annotated[
        Optional[float], typer.Option(help="with --seeds auto: the true improvement to detect, in test-loss nats")
    ] = None,
    power: Annotated[Optional[float], typer.Option(help="with --seeds auto: the chance of detecting it (0.8)")] = None,
    sigma: Annotated[
        Optional[float], typer.Option(help="with --seeds auto: seed-to-seed std of the test loss (default: measured)")
    ] = None,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    db: DbOpt = None,
):
    """Queue an experiment's runs; runs that exist already (same config, seed, repeat) are reused. Each
    data.path is checked first (shard headers, evaluation slices) unless --no-check-data. --seeds auto
    --effect 0.01: as many seeds per arm as `orch plan` says the paired design needs."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    out = call(
        api.submit,
        file,
        preset=preset,
        seeds=seeds,
        overrides=parse_sets(set_),
        dry_run=dry_run,
        check_data_here=not no_check_data,
        effect=effect,
        power=power,
        sigma=sigma,
        db=db,
    )
    if format == "json":
        typer.echo(json.dumps(_submitted_json(out), indent=2))
        return
    if out.plan is not None:
        typer.echo(out.plan.auto_line())
    for a, b in out.identical:
        typer.secho(f"warning: {b!r} is identical to {a!r} at this preset; they share runs", fg="yellow", err=True)
    if out.dry_run:  # the runs a submit would queue and reuse, counted as it counts them
        for r in out.queued:
            typer.echo(f"would queue {r.id}  {out.experiment}/{r.arm}  seed {r.seed}  repeat {r.repeat}")
        for r, state in out.reused:
            typer.echo(f"would reuse {r.id}  {out.experiment}/{r.arm}  seed {r.seed}  repeat {r.repeat}  ({state})")
        typer.echo(str(out))
        return
    for r in out.queued:
        typer.echo(f"queued {r.id}  {r.arm}  seed {r.seed}" + (f"  repeat {r.repeat}" if r.repeat else ""))
    for r, state in out.reused:
        typer.echo(f"reused {r.id}  {r.arm}  seed {r.seed}  ({state})")
    typer.echo(str(out))


def _submitted_json(out) -> dict:
    def run(r, action: str, state: str | None) -> dict:
        return {"id": r.id, "arm": r.arm, "seed": r.seed, "repeat": r.repeat, "action": action, "state": state}

    # By object, not run id: of two arms that are the same run, submit queues the first and reuses it for the other.
    queued = {id(r) for r in out.queued}
    reused = {id(r): state for r, state in out.reused}
    return {
        "experiment": out.experiment,
        "dry_run": out.dry_run,
        "seeds_auto": out.plan.auto_line() if out.plan is not None else None,
        "identical_arms": [list(pair) for pair in out.identical],
        "runs": [
            run(r, "would queue" if out.dry_run else "queued", None if out.dry_run else "queued")
            if id(r) in queued
            else run(r, "would reuse" if out.dry_run else "reused", str(reused.get(id(r))))
            for r in out.runs
        ],
    }


@app.command()
def worker(
    gpus: Annotated[
        Optional[str], typer.Option(help="GPU indices to use, e.g. 0,1,2,3 (default: all; none → CPU)")
    ] = None,
    gpus_per_run: Annotated[int, typer.Option(help="GPUs per run (torchrun processes)")] = 1,
    nproc_per_node: Annotated[int, typer.Option(help="processes per run on CPU")] = 1,
    parallel: Annotated[int, typer.Option(help="CPU runs at once (no GPUs)")] = 1,
    until_empty: Annotated[
        bool,
        typer.Option(
            "--until-empty",
            help="exit when nothing is queued or running and no sweep's driver may still queue trials (a sweep "
            "whose driver has not renewed its lease for twice its --grace no longer counts)",
        ),
    ] = False,
    runs_dir: Annotated[str, typer.Option(help="where run directories go")] = "runs",
    heartbeat: Annotated[float, typer.Option(help="seconds between heartbeats")] = 5.0,
    grace: Annotated[float, typer.Option(help="seconds without heartbeat before a run is requeued")] = 60.0,
    no_mlflow: NoMlflowOpt = False,
    slurm_requeue: Annotated[
        bool,
        typer.Option(
            "--slurm-requeue", help="in a Slurm job: requeue it on the walltime warning while work remains (pilots)"
        ),
    ] = False,
    nodes: Annotated[
        Optional[int],
        typer.Option(
            help="nodes each run spans (one slot over the Slurm allocation; claims only runs of as many nodes); "
            "default: $SLURM_JOB_NUM_NODES in an allocation, else 1"
        ),
    ] = None,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Claim queued runs and train them with torchrun, one per free GPU slot (or CPU slot)."""
    from orchestrator import api

    out = call(
        api.worker,
        gpus=gpus,
        gpus_per_run=gpus_per_run,
        nproc_per_node=nproc_per_node,
        parallel=parallel,
        until_empty=until_empty,
        runs_dir=runs_dir,
        heartbeat=heartbeat,
        grace=grace,
        mlflow=mlflow,
        track=not no_mlflow,
        slurm_requeue=slurm_requeue,
        nodes=nodes,
        db=db,
        echo=typer.echo,
    )
    typer.echo(f"worker {out.name}: {out.finished} run(s) finished")


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch/--once", help="refresh until interrupted")] = False,
    format: Annotated[str, typer.Option("--format", help="text | json (once: not with --watch)")] = "text",
    db: DbOpt = None,
):
    """Queued / running / done counts, each running run's step, loss, tokens/s and ETA, and when the queue
    should be empty (estimated from finished runs of the same experiments; the line says how)."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.live import Live

    from orchestrator import api
    from orchestrator.cli.common import fail

    check_format(format, ("text", "json"))
    if watch and format == "json":
        fail("--watch redraws a table; --format json prints the status once: drop --watch (or poll the json)")
    now = call(api.status, db)
    if format == "json":
        typer.echo(json.dumps(asdict(now), indent=2))
        return
    if not watch:
        Console().print(status_view(now))
        return
    asked_slurm = time.monotonic()
    with Live(status_view(now), refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(1)
                # The database every second, squeue every SQUEUE_EVERY_S: slurmctld serves the whole cluster,
                # and Slurm's own guidance is not to poll it in tight loops.
                ask_slurm = time.monotonic() - asked_slurm >= SQUEUE_EVERY_S
                fresh = call(api.status, db, pilots=ask_slurm)
                if ask_slurm:
                    asked_slurm = time.monotonic()
                else:
                    fresh.pilots = now.pilots
                now = fresh
                live.update(status_view(now))
        except KeyboardInterrupt:
            pass


SQUEUE_EVERY_S = 30


def status_view(now):
    """The status as rich renderables; the running table fits the console's width (80 columns and up): the
    run id shortened to 8 characters, experiment/arm always whole, and the worker column, where it does not
    fit, replaced by a line per worker under the table."""
    from rich.console import Group

    summary = ", ".join(f"{n} {k}" for k, n in now.counts.items())
    parts = [summary, _RunningTable(now.running) if now.running else "nothing running"]
    if now.queue_eta is not None and (now.running or now.queue_eta.queued):
        parts.append(now.queue_eta.how)
    for w in now.waiting:  # why a queued run is not claimed: the run it starts from has not succeeded
        fix = f": {w.fix}" if w.fix else ""
        parts.append(f"{w.run_id[:8]} waits for {w.source[:8]} ({w.source_state}){fix}")
    if now.pilots:
        from rich.table import Table

        p = Table(title="Slurm pilots")
        for col in ("job", "state", "nodes", "nodelist", "elapsed", "limit"):
            p.add_column(col)
        for pilot in now.pilots:
            p.add_row(pilot.job_id, pilot.state, str(pilot.nodes), pilot.nodelist, pilot.elapsed, pilot.time_limit)
        parts.append(p)
    return Group(*parts)


class _RunningTable:
    """The running runs, laid out when the width is known (a --watch view follows the terminal's)."""

    def __init__(self, running):
        self.running = running

    def table(self, with_worker: bool):
        from rich import box
        from rich.table import Table

        from trainer.units import duration

        t = Table(title="running", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, title_justify="left")
        t.add_column("run", no_wrap=True)
        t.add_column("experiment/arm", overflow="fold")  # folds onto a second line where it must: never cut
        for col in ("seed", "step", "loss", "tok/s", "ETA"):
            t.add_column(col, justify="right", no_wrap=True)
        if with_worker:
            t.add_column("worker", no_wrap=True)
        for r in self.running:
            t.add_row(
                r.id[:8],
                f"{r.experiment}/{r.arm}",
                str(r.seed),
                f"{r.step or 0}/{r.total_steps or '?'}",
                f"{r.train_loss:.3f}" if r.train_loss else "—",
                f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "—",
                duration(r.eta_s) if r.eta_s is not None else "—",
                *([r.worker or ""] if with_worker else []),
            )
        return t

    def __rich_console__(self, console, options):
        from rich.measure import Measurement

        wide = self.table(with_worker=True)
        # Measured unconstrained: a table's measurement is otherwise capped at the width it is given.
        if Measurement.get(console, options.update_width(1_000_000), wide).maximum <= options.max_width:
            yield wide
            return
        yield self.table(with_worker=False)
        workers: dict[str, list[str]] = {}
        for r in self.running:
            workers.setdefault(r.worker or "?", []).append(r.id[:8])
        for worker, ids in workers.items():
            yield f"on {worker}: {', '.join(ids)}"


@app.command()
def ls(
    experiments: Annotated[Optional[list[str]], typer.Argument(help="experiment names (default: all)")] = None,
    state: Annotated[Optional[str], typer.Option(help="only runs in this state")] = None,
    format: Annotated[str, typer.Option("--format", help="text | json")] = "text",
    db: DbOpt = None,
):
    """List runs: id, experiment, arm, seed, state, attempts, test loss, and where it last trained."""
    from orchestrator import api

    check_format(format, ("text", "json"))
    members = call(api.ls, experiments, state=state, db=db)
    if format == "json":
        keys = ("id", "seed", "data_seed", "repeat", "state", "attempts", "test_loss", "node", "slurm_job")
        rows = [{"experiment": e, "arm": a, **{k: getattr(r, k) for k in keys}} for e, a, r in members]
        typer.echo(json.dumps(rows, indent=2))
        return
    for exp, arm, r in members:
        loss = f"{r.test_loss:.4f}" if r.test_loss is not None else "—"
        where = f"  on {r.node}" + (f" (slurm job {r.slurm_job})" if r.slurm_job else "") if r.node else ""
        typer.echo(f"{r.id}  {exp:<24} {arm:<20} seed {r.seed:<4} {r.state:<10} attempts {r.attempts}  {loss}{where}")


@app.command()
def logs(
    run: Annotated[str, typer.Argument(help="run id (a unique prefix is enough)")],
    lines: Annotated[int, typer.Option("-n", help="last N lines")] = 50,
    db: DbOpt = None,
):
    """The trainer's log of a run (and its error, if it failed)."""
    from orchestrator import api

    log = call(api.logs, run, lines=lines, db=db)
    if log.node:
        typer.echo(
            f"--- {log.run}: last launched on {log.node}" + (f", slurm job {log.slurm_job}" if log.slurm_job else "")
        )
    typer.echo(log.text if log.text is not None else f"(no log at {log.path} yet: state {log.state})")
    if log.error:
        typer.echo(f"--- last error ---\n{log.error}")


@app.command()
def cancel(
    target: Annotated[str, typer.Argument(help="a run id prefix or an experiment name")],
    include_shared: Annotated[
        bool, typer.Option("--include-shared", help="also cancel an experiment's runs that other experiments share")
    ] = False,
    db: DbOpt = None,
):
    """Cancel queued and running runs of a run or an experiment (running trainers checkpoint and stop).

    An experiment's runs that other experiments share (the same config, trained once for all) are kept
    unless --include-shared: cancelling one study must not take the baseline from under another."""
    from orchestrator import api

    out = call(api.cancel, target, include_shared=include_shared, db=db)
    typer.echo(
        f"cancelled {len(out.cancelled)} run(s)"
        + (f"; {out.already_final} were already finished" if out.already_final else "")
    )
    if out.kept:
        names = sorted({n for v in out.kept.values() for n in v})
        typer.echo(
            f"kept {len(out.kept)} run(s) that {', '.join(names)} also use(s); add --include-shared to cancel them too"
        )


@app.command()
def retry(run: Annotated[str, typer.Argument(help="run id prefix")], db: DbOpt = None):
    """Requeue a failed, diverged, cancelled or pruned run with its attempts reset."""
    from orchestrator import api

    typer.echo(f"requeued {call(api.retry, run, db=db)}")


@app.command()
def sync(
    runs_dir: Annotated[str, typer.Option(help="where the workers' run directories are")] = "runs",
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Send MLflow whatever it is missing of finished runs (after an outage, or runs trained with
    --no-mlflow); workers do this by themselves, this does it now. Safe beside running workers."""
    from orchestrator import api

    out = call(api.sync, runs_dir=runs_dir, mlflow=mlflow, db=db)
    typer.echo(
        f"synced {out.synced} run(s) to MLflow" + (f"; {len(out.pending)} still pending:" if out.pending else "")
    )
    for run_id, why in out.pending:
        typer.echo(f"  {run_id}  {why}")
    if out.pending:
        raise typer.Exit(1)


@app.command()
def ui(
    experiment: Annotated[
        Optional[str], typer.Argument(help="the experiment whose runs to open (default: list them all)")
    ] = None,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1")] = 5000,
    mlflow: MlflowOpt = None,
):
    """Start the MLflow UI on 127.0.0.1 over the same tracking store, and print the URL of an experiment's
    runs (of each experiment's, without EXPERIMENT) as model training, in orch's view: sorted by test loss,
    the intervention's changes as a column, the loss curves first."""
    from orchestrator import api

    raise typer.Exit(call(api.ui, experiment, port=port, mlflow=mlflow, echo=typer.echo, in_process=True))


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None):
    """Migrate a database written by an older orch to this version's schema."""
    from orchestrator import api

    before, after = call(api.upgrade, db)
    typer.echo(f"schema {before or 'empty'} -> {after}")

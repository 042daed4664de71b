"""`orch slurm workers`: submit Slurm pilot jobs that run `orch worker` on their allocations."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from orchestrator.cli.common import DbOpt, MlflowOpt, NoMlflowOpt, app, call

slurm_app = typer.Typer(
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Slurm pilots: batch jobs that each run `orch worker` against the shared database (PostgreSQL for "
    "several nodes) until the queue is empty or their walltime is near.",
)
app.add_typer(slurm_app, name="slurm")


@slurm_app.command()
def workers(
    jobs: Annotated[int, typer.Option(help="pilot jobs to submit")] = 1,
    nodes_per_job: Annotated[
        int, typer.Option(help="nodes per pilot; above 1, it trains runs whose experiment asks for as many nodes")
    ] = 1,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node, one run per GPU; 0: a CPU pilot")] = 0,
    cpus_per_node: Annotated[Optional[int], typer.Option(help="CPUs to ask for (sbatch --cpus-per-task)")] = None,
    parallel: Annotated[int, typer.Option(help="runs at once on a CPU pilot")] = 1,
    partition: Annotated[Optional[str], typer.Option(help="Slurm partition")] = None,
    time: Annotated[str, typer.Option(help="walltime per pilot, e.g. 24:00:00 or 2-00:00:00")] = "24:00:00",
    account: Annotated[Optional[str], typer.Option(help="Slurm account to charge")] = None,
    sbatch_arg: Annotated[
        list[str], typer.Option("--sbatch-arg", help="one more sbatch option, e.g. --sbatch-arg=--qos=high")
    ] = [],
    warn: Annotated[int, typer.Option(help="seconds before the walltime when runs checkpoint and go back")] = 300,
    runs_dir: Annotated[str, typer.Option(help="run directories, on a filesystem every node shares")] = "runs",
    heartbeat: Annotated[float, typer.Option(help="the pilots' seconds between heartbeats")] = 5.0,
    grace: Annotated[float, typer.Option(help="seconds without heartbeat before a run is requeued")] = 60.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the batch script; submit nothing")] = False,
    no_mlflow: NoMlflowOpt = False,
    db: DbOpt = None,
    mlflow: MlflowOpt = None,
):
    """Submit pilot jobs through sbatch; each keeps its GPUs busy with queued runs. $ORCH_DB and $ORCH_MLFLOW
    travel in the environment (sbatch exports it), never in the script."""
    from orchestrator import api

    out = call(
        api.slurm_workers,
        jobs=jobs,
        nodes_per_job=nodes_per_job,
        gpus_per_node=gpus_per_node,
        cpus_per_node=cpus_per_node,
        parallel=parallel,
        partition=partition,
        time=time,
        account=account,
        sbatch_args=sbatch_arg,
        warn=warn,
        runs_dir=runs_dir,
        heartbeat=heartbeat,
        grace=grace,
        db=db,
        mlflow=mlflow,
        track=not no_mlflow,
        dry_run=dry_run,
    )
    if dry_run:
        typer.echo(out.script, nl=False)
        return
    typer.echo(
        f"submitted {len(out.job_ids)} pilot(s): {', '.join(out.job_ids)} (script {out.script_path}; "
        "`orch status` lists them)"
    )

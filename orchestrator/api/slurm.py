"""Slurm pilots from Python: `slurm_workers` is `orch slurm workers` (orchestrator/slurm.py does the work)."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.api.connection import refuse_password
from orchestrator.slurm import PilotSpec, Submitted, submit


def slurm_workers(
    *,
    jobs: int = 1,
    nodes_per_job: int = 1,
    gpus_per_node: int = 0,
    cpus_per_node: int | None = None,
    parallel: int = 1,
    partition: str | None = None,
    time: str = "24:00:00",
    account: str | None = None,
    sbatch_args: Sequence[str] = (),
    warn: int = 300,
    runs_dir: str = "runs",
    heartbeat: float = 5.0,
    grace: float = 60.0,
    db: str | None = None,
    mlflow: str | None = None,
    track: bool = True,
    dry_run: bool = False,
) -> Submitted:
    """Submit `jobs` Slurm pilots, each running `orch worker` on its allocation until the queue is empty or its
    walltime is near (then its runs go back to the queue and it requeues itself). dry_run: only the script."""
    refuse_password(db)
    refuse_password(mlflow)
    spec = PilotSpec(
        jobs=jobs,
        nodes_per_job=nodes_per_job,
        gpus_per_node=gpus_per_node,
        cpus_per_node=cpus_per_node,
        parallel=parallel,
        partition=partition,
        time=time,
        account=account,
        sbatch_args=list(sbatch_args),
        warn_s=warn,
        runs_dir=runs_dir,
        db=db,
        mlflow=mlflow,
        track=track,
        heartbeat=heartbeat,
        grace=grace,
    )
    return submit(spec, dry_run=dry_run)

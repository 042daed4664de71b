"""Slurm pilots: batch jobs that each run `orch worker` on their allocation against the shared database.

A pilot is not one run: it is a worker that claims runs until the queue is empty or its walltime is near, so
a cluster's GPUs stay busy however many runs are queued, and runs keep the queue's ordering, retries and
sharing. The pattern is submitit's and TorchX's:

- the batch script asks Slurm for a warning signal before the walltime (`--signal=B:USR1@LEAD`; `B:` sends it
  to the batch shell only, which `exec`s the worker, so the worker alone receives it) and for `--requeue`;
- on that warning the worker stops its trainers (each checkpoints), hands their runs back to the queue
  without using an attempt, and — while the queue still holds work — requeues its own job
  (`scontrol requeue`), so that the pilot claims again once Slurm starts it again, on whichever node;
- a preemption is Slurm's SIGTERM to every process of the job: trainers and worker stop the same way, and
  Slurm requeues the job itself.

The database URL and MLflow URI travel in the environment (sbatch exports the submitting shell's by
default), never in the script: a password must not land in a file or a command line. Every value put into
the script is checked against what Slurm accepts and quoted; sbatch is called with an argument list.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

JOB_NAME = "orch-pilot"
# sbatch --time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (sbatch(1)).
TIME_FORMS = re.compile(
    r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}|\d+-\d{1,2}:\d{1,2}:\d{1,2})$"
)
NAME = re.compile(r"^[A-Za-z0-9_.,-]+$")  # partitions (a comma list is allowed), accounts
# Options the pilot sets itself: given again through --sbatch-arg they would break its contract.
MANAGED = (
    "--signal",
    "--requeue",
    "--no-requeue",
    "--output",
    "--error",
    "--job-name",
    "--nodes",
    "--time",
    "--partition",
    "--account",
    "--gpus-per-node",
    "--parsable",
    "--wrap",
    "--open-mode",
    "--array",
)
MANAGED_SHORT = ("-N", "-t", "-p", "-A", "-J", "-o", "-e", "-a")


class SlurmError(ValueError):
    """A pilot Slurm cannot run, or Slurm refused: one line that names the fix."""


@dataclass
class PilotSpec:
    """What `orch slurm workers` asks Slurm for, and how each pilot's worker runs."""

    jobs: int = 1
    nodes_per_job: int = 1
    gpus_per_node: int = 0  # 0: a CPU pilot, with `parallel` CPU slots
    cpus_per_node: int | None = None
    parallel: int = 1
    partition: str | None = None
    time: str = "24:00:00"
    account: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    warn_s: int = 300  # the warning this long before the walltime: time for trainers to checkpoint
    runs_dir: str = "runs"
    db: str | None = None  # an explicit URL (without password); else $ORCH_DB travels in the environment
    mlflow: str | None = None
    track: bool = True
    heartbeat: float = 5.0
    grace: float = 60.0


@dataclass
class Submitted:
    """Pilots submitted (or, for a dry run, the script that would be)."""

    script: str
    script_path: str | None
    job_ids: list[str]


@dataclass
class Pilot:
    """A pilot job as squeue reports it."""

    job_id: str
    state: str
    nodes: int
    nodelist: str
    elapsed: str
    time_limit: str


def seconds(walltime: str) -> int:
    """sbatch's --time in seconds (a bare number is minutes)."""
    days, _, rest = walltime.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, s = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s


def validate(spec: PilotSpec) -> None:
    """Refuse, before anything is submitted, what Slurm or the pilot could not run."""
    for flag, value in (("--jobs", spec.jobs), ("--nodes-per-job", spec.nodes_per_job), ("--parallel", spec.parallel)):
        if value < 1:
            raise SlurmError(f"{flag} must be at least 1, not {value}; e.g. {flag} 1")
    if spec.gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be 0 (CPU pilots) or more, not {spec.gpus_per_node}")
    if spec.nodes_per_job > 1 and spec.parallel > 1:
        raise SlurmError(
            f"--parallel {spec.parallel} with --nodes-per-job {spec.nodes_per_job}: a pilot over several nodes "
            "trains one run at a time across all of them; drop --parallel"
        )
    if spec.cpus_per_node is not None and spec.cpus_per_node < 1:
        raise SlurmError(f"--cpus-per-node must be at least 1, not {spec.cpus_per_node}")
    if not TIME_FORMS.match(spec.time):
        raise SlurmError(
            f"--time {spec.time!r} is not a Slurm time: use minutes, HH:MM:SS or D-HH:MM:SS, e.g. --time 24:00:00"
        )
    if seconds(spec.time) <= spec.warn_s:
        raise SlurmError(
            f"--time {spec.time} leaves no training before the {spec.warn_s} s warning (--warn); "
            f"ask for more time, e.g. --time {max(1, 2 * spec.warn_s // 60 + 10)}"
        )
    if spec.warn_s < 10:
        raise SlurmError(f"--warn must leave trainers time to checkpoint: at least 10 s, not {spec.warn_s}")
    for flag, value in (("--partition", spec.partition), ("--account", spec.account)):
        if value is not None and not NAME.match(value):
            raise SlurmError(f"{flag} {value!r} is not a Slurm name (letters, digits, '_', '.', '-', ',')")
    for arg in spec.sbatch_args:
        option = arg.split("=", 1)[0]
        if not arg.startswith("-") or any(c in arg for c in "\n\r"):
            raise SlurmError(
                f"--sbatch-arg {arg!r} is not an sbatch option; give one per flag, e.g. --sbatch-arg=--qos=high"
            )
        if (
            option in MANAGED
            or option in MANAGED_SHORT
            or any(arg.startswith(s) and len(arg) > 2 for s in MANAGED_SHORT)
        ):
            raise SlurmError(f"--sbatch-arg {arg!r} sets what the pilot sets itself; use orch's own option for it")
        if any(c.isspace() for c in arg):
            raise SlurmError(f"--sbatch-arg {arg!r} holds whitespace, which an #SBATCH line cannot carry")


def worker_command(spec: PilotSpec) -> list[str]:
    """The `orch worker` a pilot execs: this Python and this orch, so login node and compute nodes agree."""
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "worker",
        "--until-empty",
        "--slurm-requeue",
        "--runs-dir",
        str(Path(spec.runs_dir).resolve()),
        "--heartbeat",
        f"{spec.heartbeat:g}",
        "--grace",
        f"{spec.grace:g}",
    ]
    # A pilot of N nodes is one worker with one slot over them: it claims only N-node runs (Experiment.nodes)
    # and trains each with one torchrun agent per node, one rank per GPU of each node (one on CPU).
    cmd += ["--nodes", str(spec.nodes_per_job)]
    if spec.gpus_per_node == 0 and spec.nodes_per_job == 1:
        cmd += ["--parallel", str(spec.parallel)]
    if spec.db:
        cmd += ["--db", spec.db]
    if spec.mlflow:
        cmd += ["--mlflow", spec.mlflow]
    if not spec.track:
        cmd += ["--no-mlflow"]
    return cmd


def batch_script(spec: PilotSpec, cwd: str | None = None) -> str:
    """The exact script each pilot job runs (`orch slurm workers --dry-run` prints it)."""
    validate(spec)
    logs = Path(spec.runs_dir).resolve() / "pilots"
    options = [
        f"--job-name={JOB_NAME}",
        f"--nodes={spec.nodes_per_job}",
        "--ntasks-per-node=1",
        f"--time={spec.time}",
        f"--signal=B:USR1@{spec.warn_s}",
        "--requeue",
        "--open-mode=append",
        f"--output={logs}/{JOB_NAME}-%j.out",
    ]
    if spec.gpus_per_node:
        options.append(f"--gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_node:
        options.append(f"--cpus-per-task={spec.cpus_per_node}")
    if spec.partition:
        options.append(f"--partition={spec.partition}")
    if spec.account:
        options.append(f"--account={spec.account}")
    options += spec.sbatch_args
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options)]
    lines += [
        "# An orch pilot (orchestrator/slurm.py): `orch worker` on this allocation until the queue is empty.",
        f"# USR1 comes {spec.warn_s} s before the walltime: trainers checkpoint, runs go back to the queue, and",
        "# the job requeues itself while work remains. $ORCH_DB / $ORCH_MLFLOW come from the submitting shell.",
        "set -u",
        f"cd {shlex.quote(cwd or os.getcwd())}",
        "exec " + shlex.join(worker_command(spec)),
    ]
    return "\n".join(lines) + "\n"


def submit(spec: PilotSpec, dry_run: bool = False) -> Submitted:
    """Check with `sbatch --test-only`, then submit `spec.jobs` pilots; a dry run only builds the script."""
    script = batch_script(spec)
    if dry_run:
        return Submitted(script, None, [])
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch is not on PATH: run this on a Slurm login node (or add --dry-run to see the script)")
    logs = Path(spec.runs_dir).resolve() / "pilots"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{JOB_NAME}-{hashlib.sha256(script.encode()).hexdigest()[:10]}.sh"
    path.write_text(script)
    test = _sbatch([sbatch, "--test-only", str(path)])
    if test.returncode != 0:
        raise SlurmError(f"sbatch refused the pilot, nothing was submitted: {_last_line(test)}")
    job_ids = []
    for _ in range(spec.jobs):
        out = _sbatch([sbatch, "--parsable", str(path)])
        if out.returncode != 0:
            done = f" ({len(job_ids)} submitted before: {', '.join(job_ids)})" if job_ids else ""
            raise SlurmError(f"sbatch failed{done}: {_last_line(out)}")
        job_ids.append(out.stdout.strip().split(";")[0])  # "JOBID[;CLUSTER]"
    return Submitted(script, str(path), job_ids)


def pilots() -> list[Pilot]:
    """This user's pilot jobs as squeue sees them; empty where Slurm is not installed or not answering."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return []
    try:
        out = subprocess.run(
            [squeue, "--noheader", "--me", f"--name={JOB_NAME}", "--format=%i|%T|%D|%N|%M|%l"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 5]
    return (
        [
            Pilot(job, state, int(n) if n.isdigit() else 0, nodes, elapsed, limit)
            for job, state, n, nodes, elapsed, limit in rows
        ]
        if out.returncode == 0
        else []
    )


def requeue_self(echo=print) -> bool:
    """Requeue the Slurm job this process runs in (a pilot warned of its walltime while work remains)."""
    from orchestrator.node import slurm_job_id

    job = os.environ.get("SLURM_JOB_ID") or slurm_job_id()
    scontrol = shutil.which("scontrol")
    if not job or scontrol is None:
        return False
    out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        echo(f"warning: could not requeue pilot job {job}: {_last_line(out)}")
        return False
    echo(f"pilot job {job} requeued: it claims again when Slurm starts it")
    return True


def _sbatch(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SlurmError("sbatch did not answer in 120 s: is slurmctld up? (try `sinfo`)") from None


def _last_line(out: subprocess.CompletedProcess) -> str:
    lines = (out.stderr or out.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit code {out.returncode}"

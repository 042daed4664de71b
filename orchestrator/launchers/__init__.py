"""Launchers: how a claimed run's trainer is started, watched and stopped, wherever it runs.

The worker decides what runs when, and keeps the run directory's contract (trainer/rundir.py): it writes
config.json, removes a spent STOP or result.json, asks for a checkpoint through the STOP file, reads
metrics.jsonl and result.json. A launcher only turns "train this run directory on this slot" into
processes and reports on them. `local.py` starts them on this node. A batch-system launcher (Slurm: submit
with sbatch or srun, poll with squeue or sacct, signal with scancel --signal) has to fit the same two
classes, which is why a handle is not a Popen: its poll may be a query and its id a job id.

Whatever the launcher, the trainer's output is appended to the run directory's train.log, each launch
after a `log_header` line, so that `clean_tail` finds the part of the log that belongs to one launch.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from orchestrator.db import Run

LOG = "train.log"
# Never handed to a trainer: it talks to no database or tracking server (the worker does that for it), and
# a child's environment is readable by any process of the same user (/proc/PID/environ).
SECRET_ENV = (
    "ORCH_DB",
    "ORCH_MLFLOW",
    "DATABASE_URL",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICEFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    # an MLflow artifact store's credentials: the worker uploads artifacts, never the trainer
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "DATABRICKS_TOKEN",
)


@dataclass
class Slot:
    """A share of the worker's node that trains one run at a time."""

    index: int
    gpus: list[str] | None  # None: a CPU slot


class Handle(Protocol):
    """One launched trainer (with its torchrun agent, or its batch job), from its start to its exit.

    The worker calls poll every loop iteration, so a launcher whose poll is a remote query caches it."""

    def poll(self) -> int | None:
        """The exit code once it has ended (the same code on every later call), None while it runs."""

    def stop(self) -> None:
        """Ask it by signal (SIGTERM) to checkpoint and stop: for when the STOP file cannot be written.
        The trainer treats both alike; only the STOP file can say why (pruned rather than preempted)."""

    def kill(self) -> None:
        """End it now, checkpoint or not (it ignored a stop, or the user insisted)."""

    def describe(self) -> str:
        """Where it runs, for messages: "pid 1234", "job 5678"."""


class ProcessHandle:
    """What every handle over a local process (the trainer, torchrun's agent, srun) shares: its pid and its
    exit code, read without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()


class Launcher(Protocol):
    def launch(self, run: Run, slot: Slot, run_dir: Path, env: dict[str, str]) -> Handle:
        """Start the trainer of `run_dir` (whose config.json is written) on `slot`, with `env` on top of
        whatever the launcher itself must set (devices, threads). The attempt is already counted, so
        raising here is recorded as a failed launch."""


def trainer_env(launch_id: str, commit: str | None) -> dict[str, str]:
    """What every trainer gets, however it is launched: this process's environment without its secrets,
    unbuffered output (a crash's last lines reach the log), its launch id (written into result.json, and
    what lets a relaunch stop an older trainer of the directory) and the commit being trained."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(PYTHONUNBUFFERED="1", ORCH_LAUNCH_ID=launch_id)
    if commit:
        env["ORCH_GIT_COMMIT"] = commit
    return env


def log_header(run: Run, owner: str, cmd: list[str]) -> str:
    """The line a launch's output follows in train.log (`clean_tail` looks for it)."""
    return f"\n=== attempt {run.attempts} (launch {run.launch_id()}) on {owner}: {' '.join(cmd)}\n"


def clean_tail(path: Path, lines: int = 40) -> str:
    """The end of the last launch's part of a trainer's log, cut where torchrun's agent begins its report of
    a failed child: a traceback of its own and a summary box, ~20 lines that only say "a rank exited
    non-zero" after the trainer's real error."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    start = max((i for i, line in enumerate(text) if line.startswith("=== attempt")), default=0)
    text = text[start:]
    for i, line in enumerate(text):
        if "torch/distributed/elastic" in line and "failed (exitcode" in line:
            text = text[:i]
            break
    return "\n".join(text[-lines:])

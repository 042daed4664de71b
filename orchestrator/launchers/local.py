"""Trainers on this node, as children of the worker, each launch in a session (process group) of its own.

A one-process run starts `python -m trainer` directly: no agent to start (~1.3 s) or to leave an orphan
behind. A run of several processes starts torchrun's agent, which starts the ranks. Either way the
trainer dies with the worker: the trainer asks the kernel for SIGTERM when its parent dies (trainer/
runlock.py), and the agent is exec'd through runlock's shim for the same reason. ORCH_WORKER_PID lets a
trainer notice a dead worker at its next sync point where that kernel request is not available.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.launchers import LOG, ProcessHandle, Slot, log_header
from trainer.rundir import CONFIG

if TYPE_CHECKING:
    from orchestrator.db import Run


class LocalHandle(ProcessHandle):
    """A launch's process group: the trainer, or torchrun's agent and its ranks."""

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def describe(self) -> str:
        return f"pid {self.proc.pid}"

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # it has exited, and its group with it
            os.killpg(self.proc.pid, sig)


def trainer_command(run_dir: Path, nproc: int) -> list[str]:
    trainer = ["-m", "trainer", "--config", str(run_dir / CONFIG), "--run-dir", str(run_dir)]
    if nproc == 1:
        return [sys.executable, *trainer]
    # The agent dies with us, by SIGKILL: on SIGTERM it would SIGKILL its ranks 30 s later, checkpoint or
    # not. Its ranks get SIGTERM from the kernel as it dies, and all stop at their next sync point with a
    # checkpoint (their collectives need no agent).
    return [
        sys.executable,
        "-m",
        "trainer.runlock",
        "--signal",
        "KILL",
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *trainer,
    ]


class LocalLauncher:
    """`owner` names the worker in train.log; a GPU slot trains one rank per GPU, a CPU slot
    `nproc_per_node` ranks, sharing the node's cores with the other `cpu_slots`."""

    def __init__(self, owner: str, nproc_per_node: int = 1, cpu_slots: int = 1):
        self.owner, self.nproc, self.cpu_slots = owner, nproc_per_node, cpu_slots

    def launch(self, run: Run, slot: Slot, run_dir: Path, env: dict[str, str]) -> LocalHandle:
        env, nproc = self.slot_env(slot, env)
        cmd = trainer_command(run_dir, nproc)
        with open(run_dir / LOG, "ab") as log:
            log.write(log_header(run, self.owner, cmd).encode())
            log.flush()  # before the child's first line
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return LocalHandle(proc)

    def slot_env(self, slot: Slot, env: dict[str, str]) -> tuple[dict[str, str], int]:
        """A trainer's environment on `slot` (its devices, its threads) and its number of processes."""
        env = {**env, "ORCH_WORKER_PID": str(os.getpid())}
        if slot.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
            return env, len(slot.gpus)
        env["CUDA_VISIBLE_DEVICES"] = ""
        # Without a limit every rank of every slot would start one thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (self.cpu_slots * self.nproc))))
        return env, self.nproc

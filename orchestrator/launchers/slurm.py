"""A run over the N nodes of this Slurm allocation: one `srun` task per node, each a torchrun agent, joined by a
c10d rendezvous on the first node (the pattern of torchtitan and TorchX).

    srun --nodes N --ntasks N --ntasks-per-node 1 --kill-on-bad-exit=1 ... \\
        python -m torch.distributed.run --nnodes N --nproc-per-node G --rdzv-backend c10d \\
        --rdzv-endpoint ADDR:PORT --rdzv-id LAUNCH -m trainer --config RUN/config.json --run-dir RUN

The worker runs in the allocation (a pilot's batch shell execs it on the first node) and keeps the run
directory's contract as for a local launch: the run directory must be on a filesystem every node shares.

- The endpoint is the first node's NodeAddr (`scontrol show hostnames`, `scontrol show node`: node names need
  not resolve) and a port free on this host, which is that node when the worker is a pilot. The agent whose
  address matches hosts the rendezvous store (torch's own test; with several agents on one address, as on
  the test suite's emulated cluster, the first to bind it does).
- Stopping: the worker's STOP file reaches rank 0 through the shared directory, every rank checkpoints and
  exits 75, and srun ends. `stop()` (for when the STOP file cannot be written) is `scancel --signal=TERM` on
  the launch's step: every rank gets SIGTERM and checkpoints. Not a signal to srun: srun 22.05 does not
  forward SIGTERM, it ends the step (SIGKILL to every task). `kill()` is SIGINT to srun, which with
  --quit-on-interrupt ends the step; a second kill() SIGKILLs srun itself.
- srun dies with the worker: it is exec'd through trainer.runlock's shim, so the worker's death sends it
  SIGTERM and srun ends the step; such a run resumes from its last periodic checkpoint. (A pilot's worker is
  its batch shell: its death ends the job, and Slurm ends the step with it.) ORCH_WORKER_PID is not passed
  on: on another node that pid means nothing.
- --kill-on-bad-exit: a node whose trainer crashes takes the others down with it, rather than leaving them
  waiting in a collective until gloo's or NCCL's timeout. (The ranks leave together after result.json is
  written, trainer/result.py, so an ordinary ending never races it.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.launchers import LOG, ProcessHandle, Slot, log_header
from trainer.rundir import CONFIG

if TYPE_CHECKING:
    from orchestrator.db import Run


class SlurmLaunchError(RuntimeError):
    """The allocation cannot be read (no Slurm job, scontrol missing or not answering)."""


class SlurmHandle(ProcessHandle):
    """One launch's srun: its exit is the step's (the highest exit code of its tasks). The step is named after
    the launch (`--job-name`), which is how stop() finds it."""

    def __init__(self, proc: subprocess.Popen, name: str, job: str | None):
        super().__init__(proc)
        self.name, self.job = name, job
        self.killed = False

    def stop(self) -> None:
        """SIGTERM to every task of the step (`scancel --signal=TERM JOB.STEP`): srun itself would not forward
        it, it would end the step (Slurm's SIGKILL to every task), leaving no checkpoint."""
        steps = self._steps()
        scancel = shutil.which("scancel")
        if steps and scancel:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([scancel, "--signal=TERM", *steps], capture_output=True, timeout=60)
        else:  # not found: end the step, as kill() does
            self._signal(signal.SIGINT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL if self.killed else signal.SIGINT)
        self.killed = True

    def describe(self) -> str:
        return f"srun pid {self.proc.pid}" + (f" in Slurm job {self.job}" if self.job else "")

    def _steps(self) -> list[str]:
        squeue = shutil.which("squeue")
        if not self.job or squeue is None:
            return []
        try:
            out = subprocess.run(
                [squeue, "--steps", "--jobs", self.job, "--noheader", "--format=%i|%j"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return []
        rows = [line.split("|", 1) for line in out.stdout.splitlines() if "|" in line]
        return [step for step, name in rows if name.strip() == self.name]

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)


def _scontrol(*args: str) -> str:
    exe = shutil.which("scontrol")
    if exe is None:
        raise SlurmLaunchError("scontrol is not on PATH: a multi-node run needs a worker inside a Slurm allocation")
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SlurmLaunchError(f"scontrol {' '.join(args)} did not answer in 60 s") from None
    if out.returncode != 0:
        raise SlurmLaunchError(f"scontrol {' '.join(args)} failed: {(out.stderr or out.stdout).strip()[-500:]}")
    return out.stdout


def first_node_addr(nodelist: str | None = None) -> str:
    """The address of the allocation's first node: its NodeAddr (where names do not resolve), else its name."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmLaunchError("SLURM_JOB_NODELIST is not set: a multi-node run needs a worker in a Slurm allocation")
    names = _scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise SlurmLaunchError(f"scontrol show hostnames {nodelist} listed no node")
    for field in _scontrol("show", "node", names[0]).split():
        key, _, value = field.partition("=")
        if key == "NodeAddr" and value:
            return value
    return names[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def srun_command(
    run_dir: Path,
    launch_id: str,
    nodes: int,
    nproc_per_node: int,
    endpoint: str,
    gpus_per_node: int = 0,
    srun: str = "srun",
    python: str = sys.executable,
) -> list[str]:
    """The whole launch as one argument list: srun, one torchrun agent per node, the trainer."""
    cmd = [
        python,
        "-m",
        "trainer.runlock",  # srun gets SIGTERM when the worker dies, and ends the step
        srun,
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--quit-on-interrupt",
        f"--job-name={launch_id}",
    ]
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    return [
        *cmd,
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={launch_id}",
        "-m",
        "trainer",
        "--config",
        str(run_dir / CONFIG),
        "--run-dir",
        str(run_dir),
    ]


class SlurmLauncher:
    """Trains each run on all `nodes` nodes of this allocation, `nproc_per_node` ranks per node: one per GPU
    of a GPU slot (the same GPUs on every node), else `nproc_per_node` CPU ranks."""

    def __init__(self, owner: str, nodes: int, nproc_per_node: int = 1):
        self.owner, self.nodes, self.nproc = owner, nodes, nproc_per_node

    def command(self, run: Run, slot: Slot, run_dir: Path) -> list[str]:
        gpus = len(slot.gpus) if slot.gpus else 0
        srun = shutil.which("srun")
        if srun is None:
            raise SlurmLaunchError("srun is not on PATH: a multi-node run needs a worker inside a Slurm allocation")
        endpoint = f"{first_node_addr()}:{free_port()}"
        return srun_command(run_dir, run.launch_id(), self.nodes, gpus or self.nproc, endpoint, gpus, srun)

    def launch(self, run: Run, slot: Slot, run_dir: Path, env: dict[str, str]) -> SlurmHandle:
        env = dict(env)
        if not slot.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env.setdefault(
                "OMP_NUM_THREADS", str(max(1, int(os.environ.get("SLURM_CPUS_PER_TASK", "1")) // self.nproc))
            )
        cmd = self.command(run, slot, run_dir)
        with open(run_dir / LOG, "ab") as log:
            log.write(log_header(run, self.owner, cmd).encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        return SlurmHandle(proc, run.launch_id(), os.environ.get("SLURM_JOB_ID"))

"""What one node offers a worker: its GPUs, how they split into slots, the Slurm job it runs in, its disk, and
the compile caches its trainers share."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from orchestrator.launchers import Slot


def plan_slots(gpus: list[str] | None, gpus_per_run: int, parallel: int) -> list[Slot]:
    if gpus:
        if len(gpus) % gpus_per_run:
            raise ValueError(f"--gpus lists {len(gpus)} GPUs, not a multiple of --gpus-per-run {gpus_per_run}")
        return [Slot(i, gpus[i * gpus_per_run : (i + 1) * gpus_per_run]) for i in range(len(gpus) // gpus_per_run)]
    return [Slot(i, None) for i in range(parallel)]


def detect_gpus() -> list[str]:
    """The GPUs this worker may use: those CUDA_VISIBLE_DEVICES names where it is set (Slurm sets it to a job's
    GPUs, and nvidia-smi would list the whole node's), else every GPU nvidia-smi sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def slurm_job_id() -> str | None:
    """The Slurm job this process runs in (an array task as JOB_TASK), or None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def disk_full(run_dir: Path, min_free: int = 1 << 20) -> bool:
    """Under torchrun a full disk may leave neither a result nor the trainer's message in the log."""
    try:
        st = os.statvfs(run_dir)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < min_free


COMPILE_CACHE = ".compile-cache"  # under the runs directory: <runs>/.compile-cache/<host>/{inductor,triton}


def compile_caches(runs_dir: Path) -> dict[str, str]:
    """The environment that points a trainer's torch.compile at caches its worker's runs share: inductor's
    (with its FX-graph cache on), and Triton's kernels, so that the second run of one shape skips most of the
    compile (on one H200, gpt2-small's first step came 35 s after launch cold and 13-18 s warm: bench/README.md).

    Under the runs directory, not /tmp: a Slurm job's /tmp is its own and goes with it, a runs directory
    stays. One directory per host, not per worker: the workers of a node reuse each other's kernels (inductor
    and Triton write their entries atomically, as every rank of a torchrun job shares one cache already),
    while compiled CPU code and GPU kernels are never offered to another machine. A cache the user set in
    the worker's environment wins."""
    root = (runs_dir / COMPILE_CACHE / socket.gethostname()).absolute()
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TRITON_CACHE_DIR": str(root / "triton"),
    }
    return {k: v for k, v in wanted.items() if k not in os.environ}

"""Ranks and devices under torchrun (or alone), and the one decision every rank must take together: to stop.

torchrun tells each process its place through WORLD_SIZE, RANK and LOCAL_RANK; a process started without
torchrun is rank 0 of a world of 1 and never touches torch.distributed, so a single-process run has no
process group to set up or to hang on.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.rundir import Status, read_stop


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank, local_rank, world, device)


@contextlib.contextmanager
def distributed() -> Iterator[Dist]:
    """This process's Dist, with the process group torn down however the run ends."""
    d = setup_distributed()
    try:
        yield d
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def all_gather(d: Dist, obj: object) -> list:
    """Every rank's `obj`, in rank order (a collective: every rank must call it)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """SIGTERM (a preemption, or torchrun forwarding one) or a STOP file ends the run at the next sync point.

    So does the death of the orch worker that launched us (its pid is in ORCH_WORKER_PID): an orphaned
    trainer would otherwise go on writing into a run directory that another worker is about to resume.
    """

    def __init__(self, run_dir: Path, master: bool):
        self.run_dir, self.master, self.signalled = run_dir, master, False
        self.worker_pid = int(os.environ.get("ORCH_WORKER_PID", "0"))
        signal.signal(signal.SIGTERM, self._on_signal)

    def _worker_gone(self) -> bool:
        if not self.worker_pid:
            return False
        try:
            os.kill(self.worker_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def poll(self, d: Dist) -> Status | None:
        """Agree across ranks: 0 none, 1 preempted, 2 pruned (pruned wins)."""
        code = 1 if self.signalled or self._worker_gone() else 0
        if self.master:  # one reader of the STOP file, so ranks cannot see it at different steps
            code = max(code, {None: 0, Status.PREEMPTED: 1, Status.PRUNED: 2}[read_stop(self.run_dir)])
        if d.world > 1:
            t = torch.tensor(code, device=d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return {0: None, 1: Status.PREEMPTED, 2: Status.PRUNED}[code]

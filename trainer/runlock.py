"""One trainer per run directory, by construction (stdlib only, so a launcher can import it cheaply).

Two guards, because either alone leaves a window:

1. The trainer dies with its launcher. Linux's PR_SET_PDEATHSIG makes the kernel send SIGTERM the moment
   the process that started it (the orch worker, or torchrun's agent) dies, even by SIGKILL; the trainer
   then checkpoints at its next sync point and ends as preempted. (A launcher that dies before the call is
   caught by comparing the parent pid before and after it.)
2. A lock on `trainer.lock` in the run directory that only one trainer can hold: a POSIX record lock
   (fcntl), one byte per global rank, which the kernel drops when its holder dies however it dies, and
   which NFS carries between nodes through lockd. A relaunch waits for the previous holder — telling it to
   stop, and killing it after a grace period when it runs on this host — before it touches the directory.

The file's text names its holder (pid, host, launch) for the messages and for a launcher that must wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

LOCK = "trainer.lock"
PR_SET_PDEATHSIG = 1


class RunDirBusy(RuntimeError):
    """Another trainer holds the run directory."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel for `sig` when our parent dies (Linux; a no-op elsewhere, where the trainer's
    ORCH_WORKER_PID check in distributed.StopRequest still notices at its next sync point)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def holder(run_dir: str | os.PathLike) -> dict | None:
    """Who holds the run directory now: its record ({} if unreadable), or None when no trainer does."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:  # a probe: every rank's byte at once (length 0 = to infinity), released at once
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0)
        except OSError:
            return _record(fd)
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)
        return None
    finally:
        os.close(fd)  # closing drops any POSIX lock this process had on the file: fine, the probe is over


def _record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def same_host(record: dict) -> bool:
    return record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int)


def is_trainer(pid: int) -> bool:
    """Whether `pid` on this host is a trainer (not a process that reused a dead trainer's pid)."""
    try:
        return b"trainer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_holder(record: dict, sig: int) -> bool:
    """Signal the holder if it is a trainer on this host; True if a signal was sent."""
    if not same_host(record) or not is_trainer(record["pid"]):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(record["pid"], sig)
        return True
    return False


def _launch_number(launch: str | None) -> int:
    """n of a launch id "<run id>.<n>"; -1 for a trainer started by hand (always older than a launch)."""
    try:
        return int(str(launch).rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return -1


class TrainerLock:
    """Hold the run directory for this rank. `acquire(wait_s)` waits up to wait_s for the previous holder
    (0: fail at once with RunDirBusy); `kill_after_s` into the wait, a holder on this host is SIGKILLed
    (it got SIGTERM when the wait began: a launcher that relaunches knows the old trainer is stale)."""

    def __init__(self, run_dir: str | os.PathLike, rank: int = 0, launch: str | None = None):
        self.path, self.rank, self.launch = Path(run_dir) / LOCK, rank, launch
        self.fd: int | None = None

    def acquire(self, wait_s: float = 0.0, kill_after_s: float = 120.0, echo=print) -> "TrainerLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        started, signalled = time.monotonic(), None
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.rank)
                break
            except OSError:
                record = _record(fd)
                waited = time.monotonic() - started
                who = (
                    f"pid {record.get('pid')} on {record.get('host')} (launch {record.get('launch')})"
                    if record
                    else "another trainer"
                )
                if waited >= wait_s:
                    os.close(fd)
                    raise RunDirBusy(
                        f"{self.path.parent} is being trained by {who}; stop it first, or use another --run-dir"
                    ) from None
                if signalled is None:
                    echo(f"waiting for {who} to checkpoint and release {self.path.parent}", flush=True)
                    signalled = signal.SIGTERM
                    if _launch_number(record.get("launch")) < _launch_number(self.launch):  # never a newer one
                        stop_holder(record, signal.SIGTERM)
                elif (
                    signalled == signal.SIGTERM
                    and waited >= kill_after_s
                    and _launch_number(record.get("launch")) < _launch_number(self.launch)
                    and stop_holder(record, signal.SIGKILL)
                ):
                    echo(f"killed {who}: it did not stop within {kill_after_s:.0f} s", flush=True)
                    signalled = signal.SIGKILL
                time.sleep(0.1)
        self.fd = fd
        if self.rank == 0:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "launch": self.launch, "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with the descriptor (and with the process, however it ends)
            self.fd = None


def _exec_with_parent_death(argv: list[str]) -> None:
    """`python -m trainer.runlock [--signal NAME] CMD…`: exec CMD so that it gets the signal (SIGTERM by
    default) when our parent dies: the request survives exec. The worker starts torchrun's agent this way;
    a Popen preexec_fn would not be safe with the worker's tracking thread running."""
    sig = signal.SIGTERM
    if argv[:1] == ["--signal"] and len(argv) > 1:
        sig, argv = signal.Signals[f"SIG{argv[1]}"], argv[2:]
    if not argv:
        sys.exit("usage: python -m trainer.runlock [--signal NAME] COMMAND [ARG…]")
    die_with_parent(sig)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec_with_parent_death(sys.argv[1:])

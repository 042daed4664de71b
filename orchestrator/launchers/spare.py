"""Warm spares: a waiting trainer process per one-process slot, which takes the slot's next run the moment it
is claimed, while the finished trainer tears down (trainer/spare.py is the spare's side).

A cold launch spends ~1.5 s of this 2-core CPU on the interpreter, `import torch` and the trainer's imports
before set-up begins, and ~1 s more importing torch._dynamo when the optimizer is built; on a GPU add the CUDA
context. A spare does all that while the slot's current run trains. When a slot launches a run, it hands it
to its spare if one is ready (a cold launch otherwise). The slot's next spare starts once that run is past
its set-up: when it appends its first line to metrics.jsonl (a resume event or its first logged step, both
written after the micro-batch search; the worker calls tend() every loop iteration). A spare that opened its
CUDA context and cuBLAS workspace during the run's micro-batch search would take memory the search measures,
and could make it pick a smaller micro-batch, so that the same run would train differently beside a spare;
on a CPU its imports would compete with the run's start-up and compile. A run that ends before its first
line (a set-up error, a stop during the search) leaves its slot's next launch cold: a spare started then
would begin after the next claim, and that run would wait for its whole warm-up. Multi-process slots keep
torchrun's agent and have no spare.

Correctness is the cold launch's: a spare holds no run and no lock and claims nothing; it dies with the worker
(parent-death signal, and end-of-file on its socket; close() ends them when the worker returns); a spare that
died, broke while warming, or does not answer within HANDOFF_TIMEOUT_S is killed and the run starts cold; one
that cannot be the run's cold launch (its environment or the trainer's sources changed since it started)
declines, and the run starts cold. After MAX_FAILURES spares of a slot in a row die or break before a run
comes, the slot stops starting them (and says why).

Where spares run (ORCH_WARM_SPARE, or Worker(warm_spares=...)): "auto", the default, on GPU slots only; "on"
on every one-process slot; "off" nowhere. On a CPU slot the spare's imports take a core from the training run
beside it (the worker gives a slot's trainer every core it has, OMP_NUM_THREADS = cores / slots), so there it
is opt-in; bench/orchestrator.py measures the gap and the runs with spares on and off side by side (on this
2-core CPU: 3.1 s cold, 0.4-0.7 s warm). A GPU slot's trainer leaves its host's cores mostly idle.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.launchers import LOG, Slot, log_header
from orchestrator.launchers.local import LocalHandle, LocalLauncher, trainer_command
from trainer.rundir import METRICS
from trainer.spare import MAX_MESSAGE, PER_LAUNCH

if TYPE_CHECKING:
    from orchestrator.db import Run

SETTING_ENV = "ORCH_WARM_SPARE"
SETTINGS = ("auto", "on", "off")
HANDOFF_TIMEOUT_S = 10.0  # a ready spare answers in milliseconds; this is for one that hangs
# A spare still warming when its slot's next run is claimed is waited for: it began while the previous run
# trained, before the claim, so it is ready sooner than a cold launch would be (~2.5 s warm-up idle, up to
# ~12 s on this loaded 2-core CPU).
# One warming for longer than this is taken for hung: killed, and the run starts cold.
WARM_UP_LIMIT_S = 120.0
MAX_FAILURES = 3  # spares of one slot that die or break in a row before the slot stops starting them


def setting(value: str | None = None) -> str:
    """The warm-spare setting: `value`, else $ORCH_WARM_SPARE, else "auto"; an unknown one says how to fix it."""
    chosen = (value or os.environ.get(SETTING_ENV) or "auto").strip().lower()
    if chosen not in SETTINGS:
        raise ValueError(f"{SETTING_ENV}={chosen!r}: expected one of {', '.join(SETTINGS)} (auto: GPU slots only)")
    return chosen


class WarmHandle(LocalHandle):
    """A run's trainer that was a spare: the same process group to stop and kill as a cold launch's."""

    def describe(self) -> str:
        return f"pid {self.proc.pid} (warm spare)"


class Spare:
    """One spare process and the worker's end of its socket."""

    def __init__(self, env: dict[str, str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "trainer.spare", str(theirs.fileno())],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # until a run's log replaces them; a failure comes over the socket
                stderr=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,  # as a cold launch: stop() and kill() signal its process group
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.sock.setblocking(False)
        self.state = "warming"  # → "ready", or why it cannot take a run
        self.started = time.monotonic()

    def ready(self) -> bool:
        """Whether it waits for a run (it said so and is alive); reads its news without blocking."""
        if self.state == "warming":
            try:
                news = self.sock.recv(4096)
            except BlockingIOError:
                news = None
            except OSError as exc:
                news = f"socket error: {exc}".encode()
            if news == b"":  # end of file: it died, or is dying
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
                news = b"closed its socket" if self.proc.poll() is None else None
            if news is not None:
                self.state = "ready" if news == b"ready" else news.decode(errors="replace")
        if self.proc.poll() is not None and self.state in ("warming", "ready"):
            self.state = f"exited with code {self.proc.returncode}"
        return self.state == "ready"

    def broken(self) -> str | None:
        """Why it will never take a run (it died, failed to warm, or warms for too long), or None while it may."""
        if not self.ready() and self.state == "warming" and time.monotonic() - self.started > WARM_UP_LIMIT_S:
            self.state = f"was still warming after {WARM_UP_LIMIT_S:.0f} s"
        return None if self.state in ("warming", "ready") else self.state

    def hand_off(self, argv: list[str], env: dict[str, str], header: str, log: Path) -> str | None:
        """Give it a run: None once it has taken it, else why not (then it is gone)."""
        request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd(), "header": header}).encode()
        if len(request) > MAX_MESSAGE:
            self.kill()
            return f"the run's environment is too large for a handoff ({len(request):,} bytes)"
        try:
            with open(log, "ab") as f:
                self.sock.setblocking(True)
                socket.send_fds(self.sock, [request], [f.fileno()])
            answer = b""
            if select.select([self.sock], [], [], HANDOFF_TIMEOUT_S)[0]:
                answer = self.sock.recv(4096)
        except OSError as exc:
            answer = f"socket error: {exc}".encode()
        if answer == b"ok":
            self.sock.close()
            return None
        self.kill()
        return answer.decode(errors="replace").removeprefix("no: ") or (
            f"no answer within {HANDOFF_TIMEOUT_S:.0f} s" if self.proc.poll() is None else "it exited"
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.sock.close()


@dataclass
class Due:
    """A slot's next spare, to start once the slot's current run is past its set-up."""

    env: dict[str, str]
    run: LocalHandle  # the slot's current run
    metrics: Path  # its metrics.jsonl
    size: int  # its size at the launch (a resumed run's file holds its earlier launches' lines)

    def logged(self) -> bool:
        """Whether the run has appended a line since its launch (append-only: trainer/rundir.py)."""
        return _size(self.metrics) > self.size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class SpareLauncher(LocalLauncher):
    """LocalLauncher with a warm spare per one-process slot (where the setting wants one)."""

    def __init__(self, owner: str, nproc_per_node: int = 1, cpu_slots: int = 1, warm: str | None = None, echo=print):
        super().__init__(owner, nproc_per_node, cpu_slots)
        self.setting, self.echo = setting(warm), echo
        self.spares: dict[int, Spare] = {}
        self.due: dict[int, Due] = {}  # per slot: the spare to start once its run is past set-up (see tend)
        self.failures: dict[int, int] = {}  # per slot: spares in a row that died or broke before a run came

    def wanted(self, slot: Slot) -> bool:
        if self.setting == "off" or self.failures.get(slot.index, 0) >= MAX_FAILURES:
            return False
        return self.setting == "on" or slot.gpus is not None

    def warming(self, slot: Slot) -> bool:
        """Whether the slot's next launch should wait for its spare, which is warming (the worker asks before
        it counts the attempt; it polls again at its next loop iteration)."""
        spare = self.spares.get(slot.index)
        return spare is not None and self.wanted(slot) and not spare.ready() and spare.broken() is None

    def launch(self, run: Run, slot: Slot, run_dir: Path, env: dict[str, str]) -> LocalHandle:
        slot_env, nproc = self.slot_env(slot, env)
        if nproc != 1 or not self.wanted(slot):
            return super().launch(run, slot, run_dir, env)
        logged = _size(run_dir / METRICS)  # before the trainer starts: only its own lines count
        handle = self._hand_off(run, slot, run_dir, slot_env)
        if handle is None:
            handle = super().launch(run, slot, run_dir, env)
        if slot.index not in self.spares and self.wanted(slot):
            env = {k: v for k, v in slot_env.items() if k not in PER_LAUNCH}
            self.due[slot.index] = Due(env, handle, run_dir / METRICS, logged)
        return handle

    def tend(self) -> None:
        """Start each slot's due spare whose run has logged its first line since its launch; forget it for a
        run that ended before (the worker calls this every loop iteration, before it claims)."""
        for index, due in list(self.due.items()):
            if due.logged():
                del self.due[index]
                if index in self.spares:
                    continue
                try:
                    self.spares[index] = Spare(due.env)
                except OSError as exc:  # no process or socket to spare (EMFILE, EAGAIN): the next run starts cold
                    self.failures[index] = self.failures.get(index, 0) + 1
                    self.echo(f"warning: no warm spare for slot {index}: {exc}")
            elif due.run.poll() is not None:
                del self.due[index]

    def _hand_off(self, run: Run, slot: Slot, run_dir: Path, env: dict[str, str]) -> WarmHandle | None:
        """The run's trainer, if the slot's spare takes it; None: launch cold."""
        spare = self.spares.get(slot.index)
        if spare is None:
            return None
        why = spare.broken()
        if why is not None:
            self._failed(slot, spare, f"warm spare (pid {spare.proc.pid}) of slot {slot.index} {why}")
            return None
        if not spare.ready():
            return None  # still warming (the worker did not wait): this run starts cold, the spare takes the next
        del self.spares[slot.index]
        cmd = trainer_command(run_dir, 1)
        why = spare.hand_off(cmd[3:], env, log_header(run, self.owner, cmd), run_dir / LOG)  # cmd: python -m trainer
        if why is not None:
            self.echo(f"{run.id}: the warm spare of slot {slot.index} did not take it ({why}); launching it cold")
            return None
        self.failures[slot.index] = 0
        return WarmHandle(spare.proc)

    def _failed(self, slot: Slot, spare: Spare, what: str) -> None:
        spare.kill()
        del self.spares[slot.index]
        self.failures[slot.index] = n = self.failures.get(slot.index, 0) + 1
        stop = f"; no more spares on slot {slot.index} ({n} in a row)" if n >= MAX_FAILURES else ""
        self.echo(f"warning: {what}: this run starts cold{stop}")

    def close(self) -> None:
        """End every waiting spare (the worker is done; they would die with its process anyway)."""
        self.due.clear()
        while self.spares:
            self.spares.popitem()[1].kill()

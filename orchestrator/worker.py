"""The worker: claim → launch torchrun → heartbeat → forward metrics → record the result.

One worker per node. It splits the node's GPUs into slots (`--gpus 0,1,2,3 --gpus-per-run 2` is two slots
of two), or runs `--parallel N` CPU slots, and keeps every slot busy: the moment a trainer exits, its slot
claims the next run in the same loop iteration, so the GPU-idle gap is one poll interval plus the trainer's
start-up (measured in bench/orchestrator.py).

The loop is single-threaded and never blocks on a trainer: it polls processes, tails each run's
metrics.jsonl into MLflow in batches, and beats for all its runs on the database's clock. A run that the
database took away (cancelled, or requeued after missed heartbeats) is stopped through its STOP file.
SIGTERM or Ctrl-C stops every trainer the same way (they checkpoint) and hands their runs back to the queue.
If this process is SIGKILLed, its runs go stale; after the grace period any worker requeues them and the
trainer resumes from its last checkpoint (trainer/checkpoint.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from orchestrator import queue
from orchestrator.db import Run
from trainer.config import TrainConfig
from trainer.perf import git_commit
from trainer.rundir import CONFIG, METRICS, RESULT, STOP, write_json

LOG = "train.log"
STOP_TIMEOUT_S = 120  # how long a trainer gets to checkpoint after STOP before it is killed
IDLE_CLAIM_S = 1.0  # how often an idle worker asks an empty queue for work


@dataclass
class Slot:
    index: int
    gpus: list[str] | None  # None: a CPU slot


@dataclass
class Launch:
    """One trainer process for one claimed run."""

    run: Run
    slot: Slot
    proc: subprocess.Popen
    run_dir: Path
    mlflow_id: str | None
    offset: int = 0  # bytes of metrics.jsonl read into progress
    mlflow_offset: int = 0  # bytes of metrics.jsonl that MLflow has
    last_steps: dict[str, int] = field(default_factory=dict)
    progress: dict = field(default_factory=dict)
    stop_sent_at: float | None = None


def plan_slots(gpus: list[str] | None, gpus_per_run: int, parallel: int) -> list[Slot]:
    if gpus:
        if len(gpus) % gpus_per_run:
            raise ValueError(f"--gpus lists {len(gpus)} GPUs, not a multiple of --gpus-per-run {gpus_per_run}")
        return [Slot(i, gpus[i * gpus_per_run : (i + 1) * gpus_per_run]) for i in range(len(gpus) // gpus_per_run)]
    return [Slot(i, None) for i in range(parallel)]


def detect_gpus() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


class Worker:
    def __init__(self, engine: Engine, *, runs_dir: str | Path = "runs", slots: list[Slot], nproc_per_node: int = 1,
                 tracker=None, heartbeat_s: float = 5.0, grace_s: float = 60.0, poll_s: float = 0.2,
                 forward_s: float = 2.0, progress_s: float = 10.0, name: str | None = None, echo=print):
        self.engine, self.runs_dir, self.slots = engine, Path(runs_dir), slots
        self.nproc, self.tracker = nproc_per_node, tracker
        self.heartbeat_s, self.grace_s, self.poll_s, self.forward_s = heartbeat_s, grace_s, poll_s, forward_s
        self.progress_s = progress_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:4]}"
        self.echo = echo
        self.active: dict[str, Launch] = {}
        self.stopping = False
        self.commit = git_commit()

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self, until_empty: bool = False) -> int:
        """Work until stopped (or, with until_empty, until the queue is empty); return #runs finished."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.finished, failures = 0, 0
        self._due = {"reap": 0.0, "claim": 0.0, "forward": 0.0, "beat": 0.0,
                     "progress": time.monotonic() + self.progress_s}
        try:
            while True:
                try:
                    if self._tick(until_empty):
                        break
                except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
                    # The database restarted or is unreachable for a moment: trainers keep training;
                    # retry, and let heartbeats resume before anyone's grace period ends.
                    failures += 1
                    self.echo(f"warning: database error ({type(exc).__name__}); retrying: {str(exc).splitlines()[0]}")
                    time.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                    continue
                failures = 0
                time.sleep(self.poll_s)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.finished

    def _every(self, what: str, interval: float, now: float) -> bool:
        if now < self._due[what]:
            return False
        self._due[what] = now + interval
        return True

    def _tick(self, until_empty: bool) -> bool:
        """One pass of the loop; True when the worker is done."""
        now = time.monotonic()
        if self.stopping:
            self._stop_all()
        for launch in list(self.active.values()):
            if launch.proc.poll() is not None:
                self._finish(launch)
                self.finished += 1
        if self.stopping:
            if not self.active:
                return True
        elif self._take_work(now, until_empty):
            return True
        # Also while stopping: trainers that are checkpointing still report and beat.
        if self._every("forward", self.forward_s, now):
            self._forward_all()
        if self._every("beat", self.heartbeat_s, now):
            self._beat()
        if self.progress_s and self.active and self._every("progress", self.progress_s, now):
            self._show_progress()
        return False

    def _take_work(self, now: float, until_empty: bool) -> bool:
        """Requeue stale runs, fill free slots; True when until_empty and nothing is left anywhere."""
        if self._every("reap", self.heartbeat_s, now):
            for run_id in queue.requeue_stale(self.engine, self.grace_s, except_worker=self.name):
                self.echo(f"requeued {run_id}: its worker stopped heartbeating")
        busy = {launch.slot.index for launch in self.active.values()}
        free = [s for s in self.slots if s.index not in busy]
        if free and now >= self._due["claim"]:
            claimed = queue.claim(self.engine, self.name, len(free))
            for run, slot in zip(claimed, free):
                if run.id not in self.active:  # ours already: requeued while we were late
                    self._start_or_fail(run, slot)
            # An empty queue is asked again in a second, not every poll: idle workers should not keep the
            # database's write lock busy.
            self._due["claim"] = now + (0.0 if len(claimed) == len(free) else IDLE_CLAIM_S)
        if until_empty and not self.active:
            counts = queue.counts(self.engine)
            return not counts.get(queue.QUEUED) and not counts.get(queue.RUNNING)
        return False

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:  # a second Ctrl-C: stop waiting for checkpoints
            for launch in self.active.values():
                _kill(launch.proc)
        self.stopping = True

    # -- one run ------------------------------------------------------------------------------------------

    def _start_or_fail(self, run: Run, slot: Slot) -> None:
        """Launch a claimed run; if even that fails (disk full, bad run directory), record it as a failed
        attempt rather than leaving it to go stale."""
        try:
            self._start(run, slot)
        except Exception as exc:  # noqa: BLE001 - any launch error is the run's failure, not the worker's
            self.echo(f"{run.id}: could not start: {exc}")
            queue.finish(self.engine, run.id, self.name, queue.FAILED, error=f"launch failed: {exc!r}")

    def _track(self, what: str, fn, *args, **kwargs):
        """Call the tracker; MLflow being down must not stop training (the runs table has the results)."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            self.echo(f"warning: MLflow {what} failed: {exc}")
            return None

    def _start(self, run: Run, slot: Slot) -> None:
        run_dir = self.runs_dir / run.id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP).unlink(missing_ok=True)  # a STOP from an earlier preemption is spent
        # So is a result.json from an earlier attempt: if this one dies before the trainer removes it, a
        # stale "preempted" must not be read as this attempt's ending (and requeue it for free, forever).
        (run_dir / RESULT).unlink(missing_ok=True)
        if not (run_dir / CONFIG).exists():
            write_json(run_dir / CONFIG, run.config)
        mlflow_id = run.mlflow_run_id
        last_steps: dict[str, int] = {}
        if self.tracker is not None:
            if mlflow_id is None:
                memberships = queue.memberships(self.engine, run.id)
                exps = sorted({e for e, _ in memberships})
                first_exp, arm = memberships[0] if memberships else ("orch", "run")
                mlflow_id = self._track("start_run", self.tracker.start_run, experiment=first_exp,
                                        all_experiments=exps, arm=arm, run_id=run.id, config=run.config,
                                        seed=run.seed, data_seed=run.data_seed, repeat=run.repeat,
                                        git_commit=self.commit)
                if mlflow_id:
                    queue.set_mlflow_run(self.engine, run.id, mlflow_id)
            else:
                last_steps = self._track("last_steps", self.tracker.last_steps, mlflow_id)
                if last_steps is None:  # unknown what MLflow has: send nothing rather than everything twice
                    mlflow_id, last_steps = None, {}
        env = dict(os.environ, PYTHONUNBUFFERED="1", ORCH_WORKER_PID=str(os.getpid()))
        if self.commit:
            env["ORCH_GIT_COMMIT"] = self.commit
        if slot.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
            nproc = len(slot.gpus)
        else:
            env["CUDA_VISIBLE_DEVICES"] = ""
            nproc = self.nproc
            threads = max(1, (os.cpu_count() or 1) // (len(self.slots) * nproc))
            env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "trainer", "--config", str(run_dir / CONFIG), "--run-dir", str(run_dir)]
        log = open(run_dir / LOG, "ab")
        log.write(f"\n=== attempt {run.attempts} on {self.name}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        total = TrainConfig.model_validate(run.config).total_steps()
        self.active[run.id] = Launch(run, slot, proc, run_dir, mlflow_id, last_steps=last_steps,
                                     progress={"run_dir": str(run_dir), "total_steps": total})
        where = f"GPUs {','.join(slot.gpus)}" if slot.gpus else f"CPU slot {slot.index}"
        self.echo(f"started {run.id} (attempt {run.attempts}) on {where}")

    def _finish(self, launch: Launch) -> None:
        self._forward(launch)
        run, code = launch.run, launch.proc.returncode
        result = _read_json(launch.run_dir / RESULT)
        if result is not None:
            status = result["status"]
            error = result.get("error")
        else:
            status, error = queue.FAILED, _tail(launch.run_dir / LOG)
        if status == "preempted" and launch.progress.get("_cancelled"):
            status = queue.CANCELLED
        new_state = queue.finish(self.engine, run.id, self.name, status, result=result, exit_code=code, error=error)
        if new_state is None and launch.progress.get("_cancelled"):
            new_state = queue.CANCELLED  # the database already says so; close the MLflow run to match
        if self.tracker is not None and launch.mlflow_id and new_state in queue.FINAL:
            self._track("finish_run", self.tracker.finish_run, launch.mlflow_id, new_state, launch.run_dir, result)
        self.active.pop(run.id)
        loss = f", test loss {result['test_loss']:.4f}" if result and result.get("test_loss") is not None else ""
        self.echo(f"{run.id} {status} (exit {code}){loss} -> {new_state or 'no longer ours'}")

    def _beat(self) -> None:
        if not self.active:
            return
        for launch in self.active.values():  # the newest progress and validation curve (a pruner reads it)
            self._read_progress(launch)
        progress = {rid: {k: v for k, v in l.progress.items() if not k.startswith("_")} for rid, l in self.active.items()}
        owned = queue.heartbeat(self.engine, self.name, progress)
        for run_id, launch in self.active.items():
            if launch.stop_sent_at is not None:
                continue
            if run_id not in owned:
                self.echo(f"{run_id} was cancelled or taken over: stopping its trainer")
                launch.progress["_cancelled"] = True
                self._send_stop(launch)
            elif owned[run_id]:
                self.echo(f"{run_id}: stop requested ({owned[run_id]})")
                self._send_stop(launch, owned[run_id])
        for launch in self.active.values():  # escalate on trainers that ignore STOP
            if launch.stop_sent_at is not None and time.monotonic() - launch.stop_sent_at > STOP_TIMEOUT_S:
                _kill(launch.proc)

    def _show_progress(self) -> None:
        """One line: the queue's counts, then step, loss and speed of each run this worker trains."""
        counts = queue.counts(self.engine)
        parts = [", ".join(f"{counts[k]} {k}" for k in (queue.QUEUED, queue.RUNNING, *queue.FINAL) if counts.get(k))]
        for run_id, launch in self.active.items():
            p = launch.progress
            if "step" in p:
                parts.append(f"{run_id[:8]} step {p['step']}/{p['total_steps']} loss {p['train_loss']:.3f} "
                             f"{p.get('tokens_per_s') or 0:,.0f} tok/s")
            else:
                parts.append(f"{run_id[:8]} starting")
        self.echo(" | ".join(parts))

    def _stop_all(self) -> None:
        for launch in self.active.values():
            if launch.stop_sent_at is None:
                self._send_stop(launch)
            elif time.monotonic() - launch.stop_sent_at > STOP_TIMEOUT_S:
                _kill(launch.proc)

    def _send_stop(self, launch: Launch, reason: str = "preempted") -> None:
        (launch.run_dir / STOP).write_text(reason + "\n")
        launch.stop_sent_at = time.monotonic()

    # -- metrics ------------------------------------------------------------------------------------------

    def _forward_all(self) -> None:
        for launch in self.active.values():
            self._forward(launch)

    def _forward(self, launch: Launch) -> None:
        """New metrics.jsonl lines: into the run's progress (for the database), then to MLflow.

        Two read positions: progress always moves on; MLflow's only once MLflow has taken the points, so
        an outage delays them rather than losing them."""
        self._read_progress(launch)
        if self.tracker is None or not launch.mlflow_id or launch.mlflow_offset >= launch.offset:
            return
        pending, end = _new_events(launch.run_dir / METRICS, launch.mlflow_offset, until=launch.offset)
        if self._track("log_events", self.tracker.log_events, launch.mlflow_id, pending, launch.last_steps) is not None:
            launch.mlflow_offset = end

    def _read_progress(self, launch: Launch) -> None:
        events, launch.offset = _new_events(launch.run_dir / METRICS, launch.offset)
        for e in events:
            if e.get("event") == "resume":  # a relaunch: curve points past the checkpoint are superseded
                launch.progress["val_curve"] = [p for p in launch.progress.get("val_curve", []) if p[0] <= e["step"]]
            elif "loss" in e:
                launch.progress.update(step=e["step"], train_loss=e["loss"], tokens_per_s=e.get("tokens_per_s"))
            elif "val_loss" in e and "test_loss" not in e:
                launch.progress["val_curve"] = [*launch.progress.get("val_curve", []), [e["step"], e["val_loss"]]]


def _new_events(path: Path, offset: int, until: int | None = None) -> tuple[list[dict], int]:
    """Complete JSON lines of `path` from byte `offset` (to `until`), and the offset after them. A line still
    being written waits for the next read; a damaged line (a full disk, say) is skipped, not fatal."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read() if until is None else f.read(until - offset)
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events, offset + end


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"

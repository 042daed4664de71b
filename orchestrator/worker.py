"""The worker: claim → judge a lost launch → start → advance → beat → finish, for every slot of one node.

One worker per node. It splits the node's GPUs into slots (`--gpus 0,1,2,3 --gpus-per-run 2` is two slots
of two), or runs `--parallel N` CPU slots, and keeps every slot busy: the moment a trainer exits, its slot
claims the next run in the same loop iteration, so the GPU-idle gap is one poll interval plus the trainer's
start-up (measured in bench/orchestrator.py). A launcher (launchers/) starts the trainers; each claimed run
is a `Launch` holding the launcher's handle once its trainer has started. Where a slot keeps a warm spare
(launchers/spare.py: GPU slots by default), the run goes to that process, which imported torch and the
trainer while the slot's previous run trained (a spare still warming is waited for); trainers share one
node's torch.compile caches (node.compile_caches). In a Slurm allocation of N > 1
nodes, the worker (on the first node) has one slot spanning all of them, claims only N-node runs, and starts
each with one srun task per node (launchers/slurm.py).

The loop never blocks on a trainer or on MLflow: it polls the handles, follows each run's metrics.jsonl for
its progress (tail.py), and beats for all its runs on the database's clock; MLflow is fed by a background
thread from the run directories (outbox.py), so an absent tracking server delays tracking and nothing else.

Exactly one trainer per run directory (trainer/runlock.py): trainers and torchrun agents die with their
launcher, and a claimed run is launched only once the previous holder of its directory's lock is gone —
a launch whose launcher exited while its trainer still holds the lock is waited for, too. A run that the
database took away (cancelled, or requeued after missed heartbeats) is stopped through its STOP file.
SIGTERM or Ctrl-C stops every trainer the same way (they checkpoint) and hands their runs back to the
queue. If this process is SIGKILLed, its trainers get SIGTERM from the kernel and checkpoint; after the
grace period any worker requeues the runs, reads how the lost launch ended, and resumes them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

from orchestrator import dependencies, queries, queue
from orchestrator.db import Run
from orchestrator.launch import STOP_TIMEOUT_S, Launch
from orchestrator.launchers import LOG, Launcher, Slot, clean_tail, trainer_env
from orchestrator.launchers.spare import SpareLauncher
from orchestrator.node import compile_caches, disk_full, slurm_job_id
from orchestrator.outbox import Outbox, OutboxThread
from orchestrator.progress import Progress
from orchestrator.states import RunState
from orchestrator.tail import MetricsTail
from trainer import runlock
from trainer.config import TrainConfig
from trainer.provenance import git_commit
from trainer.rundir import CONFIG, EXIT_NO_SPACE, NO_SPACE_LINE, RESULT, STOP, Status, checkpoint_paths, write_json
from trainer.spare import LAUNCHED_AT

IDLE_CLAIM_S = 1.0  # how often an idle worker asks an empty queue for work
NO_SPACE_PAUSE_S = 10.0  # after a full disk, claim nothing for this long (each launch would fail again)


class Worker:
    def __init__(
        self,
        engine: Engine,
        *,
        runs_dir: str | Path = "runs",
        slots: list[Slot],
        nproc_per_node: int = 1,
        nodes: int = 1,
        tracker=None,
        heartbeat_s: float = 5.0,
        grace_s: float = 60.0,
        poll_s: float = 0.2,
        forward_s: float = 2.0,
        progress_s: float = 10.0,
        name: str | None = None,
        launcher: Launcher | None = None,
        warm_spares: str | None = None,
        echo=print,
    ):
        self.engine, self.runs_dir, self.slots = engine, Path(runs_dir), slots
        self.heartbeat_s, self.grace_s, self.poll_s, self.progress_s = heartbeat_s, grace_s, poll_s, progress_s
        # Where this worker's trainers run: recorded on each run it starts (and in its name, for `orch ls`).
        self.node, self.slurm_job = socket.gethostname(), slurm_job_id()
        pilot = f"slurm-{self.slurm_job}:" if self.slurm_job else ""
        self.name = name or f"{self.node}:{pilot}{os.getpid()}:{uuid.uuid4().hex[:4]}"
        # A worker spanning several nodes of a Slurm allocation has one slot over all of them: each run it
        # claims (only runs asking for exactly `nodes` nodes) trains on every node, one srun task per node.
        self.nodes = nodes
        if nodes > 1 and len(slots) != 1:
            raise ValueError(f"a worker over {nodes} nodes has one slot spanning them, not {len(slots)}")
        if launcher is None and nodes > 1:
            from orchestrator.launchers.slurm import SlurmLauncher

            launcher = SlurmLauncher(self.name, nodes, nproc_per_node)
        # One-process slots start their runs in warm spares where the setting wants them (launchers/spare.py:
        # ORCH_WARM_SPARE, GPU slots by default), torchrun's agent for several processes.
        self.launcher = launcher or SpareLauncher(
            self.name, nproc_per_node, cpu_slots=len(slots), warm=warm_spares, echo=echo
        )
        self.compile_caches = compile_caches(self.runs_dir)  # torch.compile's caches, shared by this node's runs
        self.echo = echo
        self.active: dict[str, Launch] = {}
        self.stopping = False
        self.warned = False  # Slurm's warning signal came (walltime or preemption near): see run()
        self.unreachable: set[str] = set()  # runs whose checkpoints another host holds: never claimed again here
        self.commit = git_commit()
        self.outbox = None
        if tracker is not None:
            # Its tracking leases live as long as its runs do: a worker dead for --grace loses both at once.
            self.outbox = OutboxThread(
                Outbox(engine, tracker, self.name, self.runs_dir, self.commit, lease_grace_s=grace_s),
                every_s=forward_s,
                orphans_after_s=grace_s,
                echo=echo,
            )

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self, until_empty: bool = False) -> int:
        """Work until stopped or, with until_empty, until nothing is left to train; return #runs finished.

        "Nothing left" means no run queued (that this worker can train) or running anywhere, and no sweep
        whose driver may still ask for trials: one with fewer finished trials than its target whose driver
        renewed its lease within twice its grace (queries.sweeps_asking). So a worker waits out the gap
        between a trial's end and the driver's next ask, and a standby's takeover; a sweep whose driver died
        with no standby lets it go after twice the driver's --grace (2 minutes by default)."""
        # SIGUSR1 is the warning a Slurm pilot asks for (`sbatch --signal=B:USR1@…`, orchestrator/slurm.py):
        # stop like SIGTERM, so the runs go back to the queue with a checkpoint and no attempt used.
        signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        previous = {s: signal.signal(s, self._on_signal) for s in signals}
        self.finished, failures = 0, 0
        self._due = {
            "reap": 0.0,
            "claim": 0.0,
            "beat": 0.0,
            "progress": time.monotonic() + self.progress_s,
            "sweeps": 0.0,
        }
        self._sweeps: list[str] = []  # sweeps whose driver may still ask (until_empty waits for them)
        if self.outbox is not None:
            self.outbox.start()
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
            if hasattr(self.launcher, "close"):  # waiting spares: they would die with this process, not with run()
                self.launcher.close()
            if self.outbox is not None:
                self.outbox.close()
                if self.outbox.pending:
                    self.echo(
                        f"{self.outbox.pending} run(s) not fully tracked yet: kept for the next worker or `orch sync`"
                    )
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
            self._advance(launch)
        if hasattr(self.launcher, "tend") and not self.stopping:  # warm spares: start those now due
            self.launcher.tend()
        if self.stopping:
            if not self.active:
                return True
        elif self._claim(now, until_empty):
            return True
        # Also while stopping: trainers that are checkpointing still beat.
        if self._every("beat", self.heartbeat_s, now):
            self._beat()
        if self.progress_s and self.active and self._every("progress", self.progress_s, now):
            self._show_progress()
        return False

    def _on_signal(self, signum, frame) -> None:
        self.warned = self.warned or signum == signal.SIGUSR1
        if self.stopping:  # a second Ctrl-C: stop waiting for checkpoints (they resume from the last one)
            for launch in self.active.values():
                if launch.handle is not None:
                    launch.killed = True
                    launch.handle.kill()
                    if (record := runlock.holder(launch.run_dir)) is not None:  # torchrun's ranks
                        runlock.stop_holder(record, signal.SIGKILL)
        self.stopping = True

    # -- claim --------------------------------------------------------------------------------------------

    def _claim(self, now: float, until_empty: bool) -> bool:
        """Requeue stale runs, fill free slots; True when until_empty and nothing is left anywhere."""
        if self._every("reap", self.heartbeat_s, now):
            for run_id in queue.requeue_stale(self.engine, self.grace_s, except_worker=self.name):
                self.echo(f"requeued {run_id}: its worker stopped heartbeating")
        busy = {launch.slot.index for launch in self.active.values()}
        free = [s for s in self.slots if s.index not in busy]
        if free and now >= self._due["claim"]:
            claimed = queue.claim(self.engine, self.name, len(free), skip=self.unreachable, nodes=self.nodes)
            for run, slot in zip(claimed, free):
                if run.id not in self.active:  # ours already: requeued while we were late
                    self._open(run, slot)
            # An empty queue is asked again in a second, not every poll: idle workers should not keep the
            # database's write lock busy.
            self._due["claim"] = max(self._due["claim"], now + (0.0 if len(claimed) == len(free) else IDLE_CLAIM_S))
        if until_empty and not self.active:
            # Runs whose checkpoints only another host sees are not this worker's work: it may go.
            running = queries.counts(self.engine).get(RunState.RUNNING)
            if running or queries.claimable(self.engine, sorted(self.unreachable), nodes=self.nodes):
                return False
            return not self._sweeps_asking(now)
        return False

    def _sweeps_asking(self, now: float) -> bool:
        """Whether a sweep's driver may still queue trials (asked of the database once per IDLE_CLAIM_S);
        said once each time the sweeps waited for change."""
        if self._every("sweeps", IDLE_CLAIM_S, now):
            sweeps = queries.sweeps_asking(self.engine)
            if sweeps and sweeps != self._sweeps:
                self.echo(f"queue empty; waiting for sweep {', '.join(sweeps)}, whose driver may queue more trials")
            self._sweeps = sweeps
        return bool(self._sweeps)

    def _open(self, run: Run, slot: Slot) -> None:
        """A claimed run becomes a waiting Launch, unless this orch cannot read its config."""
        run_dir = self.runs_dir / run.id
        try:
            total = TrainConfig.model_validate(run.config).total_steps()
        except ValueError as exc:  # written by another version of orch: no retry helps
            self.echo(f"{run.id}: its stored config is invalid here: {str(exc).splitlines()[0]}")
            queue.finish(
                self.engine,
                run.id,
                self.name,
                Status.FAILED,
                result={"retryable": False},
                error=f"stored config refused by this orch: {exc}",
            )
            return
        launch = Launch(run, slot, run_dir, Progress.of(run, run_dir, total, self.engine), MetricsTail(run_dir))
        self.active[run.id] = launch
        if self.outbox is not None:
            self.outbox.watch(run.id)
        self._advance(launch)

    def _drop(self, run_id: str) -> None:
        """The run is no longer this worker's to launch or beat for (its ending is recorded, or not ours)."""
        self.active.pop(run_id, None)
        if self.outbox is not None:
            self.outbox.let_go(run_id)

    # -- advance: waiting → training → draining → finished -----------------------------------------------

    def _advance(self, launch: Launch) -> None:
        """Move one launch on as far as it can go now."""
        if launch.handle is None:
            record = runlock.holder(launch.run_dir)
            if record is None:
                warming = getattr(self.launcher, "warming", None)  # the slot's warm spare, nearly ready: wait
                if warming is None or not warming(launch.slot):
                    self._start_or_fail(launch)
            else:
                self._hurry(launch, record, "a previous trainer of this run")
            return
        code = launch.handle.poll()
        if code is None:
            return
        record = runlock.holder(launch.run_dir)
        if record is None:
            self._finish(launch, code)
            self.finished += 1
            return
        if launch.signalled is None:
            launch.since = time.monotonic()  # draining starts: its orphan has SIGTERM already
            launch.signalled = signal.SIGTERM
        self._hurry(launch, record, "the orphaned trainer")

    def _hurry(self, launch: Launch, record: dict, who: str) -> None:
        """Tell a stale holder of the run's directory to checkpoint, and kill it after STOP_TIMEOUT_S."""
        now = time.monotonic()
        if launch.signalled is None and runlock.stop_holder(record, signal.SIGTERM):
            launch.signalled, launch.since = signal.SIGTERM, now
            self.echo(f"{launch.run.id}: waiting for {who} (pid {record.get('pid')}) to checkpoint and exit")
        elif launch.signalled == signal.SIGTERM and now - launch.since > STOP_TIMEOUT_S:
            if runlock.stop_holder(record, signal.SIGKILL):
                self.echo(f"{launch.run.id}: killed {who} (pid {record.get('pid')}) after {STOP_TIMEOUT_S} s")
            launch.signalled = signal.SIGKILL

    def _start_or_fail(self, launch: Launch) -> None:
        """Launch a claimed run; if even that fails (disk full, bad run directory), record it as a failed
        attempt rather than leaving it to go stale."""
        try:
            if self._judge_lost(launch):
                self._start(launch)
        except sa_exc.DBAPIError:
            raise  # the database is away: the launch stays waiting and the loop retries it
        except Exception as exc:  # noqa: BLE001 - any launch error is the run's failure, not the worker's
            self.echo(f"{launch.run.id}: could not start: {exc}")
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._pause_for_space(launch.run.id, str(exc))
                return
            queue.finish(self.engine, launch.run.id, self.name, Status.FAILED, error=f"launch failed: {exc!r}")
            self._drop(launch.run.id)

    def _pause_for_space(self, run_id: str, error: str) -> None:
        """A full disk under the runs directory: hand the run back without counting an attempt (nothing is
        wrong with it), and claim nothing for a while rather than fail every run in the queue in turn."""
        queue.finish(self.engine, run_id, self.name, Status.PREEMPTED, error=f"no space left: {error}")
        self._drop(run_id)
        self._due["claim"] = time.monotonic() + NO_SPACE_PAUSE_S
        self.echo(
            f"warning: no space left under {self.runs_dir}: {run_id} requeued (no attempt used); "
            f"claiming again in {NO_SPACE_PAUSE_S:.0f} s — free disk space"
        )

    def _judge_lost(self, launch: Launch) -> bool:
        """If a dead worker left an earlier launch open, account for it from its result.json; True when this
        launch should go ahead (False: the lost launch had ended the run after all, it used the last
        attempt, or the run is no longer ours)."""
        run = launch.run
        n = run.open_launch
        if n is None:
            return True
        ending = _read_json(launch.run_dir / RESULT)
        if (ending or {}).get("launch_id") != run.launch_id(n):
            ending = None
        verdict = queue.judge_lost(self.engine, run, self.name, ending)
        if verdict == "launch":
            told = (ending or {}).get("status", "without a result (a crash: it counts)")
            self.echo(f"{run.id}: launch {n}, whose worker died, ended {told}")
            return True
        self.echo(
            f"{run.id}: launch {n}, whose worker died, ended the run: {verdict}"
            if verdict
            else f"{run.id} is no longer ours"
        )
        self._drop(run.id)
        return False

    def _start(self, launch: Launch) -> None:
        run, run_dir, slot = launch.run, launch.run_dir, launch.slot
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP).unlink(missing_ok=True)  # a STOP from an earlier preemption is spent
        (run_dir / RESULT).unlink(missing_ok=True)  # so is an earlier launch's ending (and it was accounted)
        if not (run_dir / CONFIG).exists():
            config, elsewhere = dependencies.launch_config(self.engine, run, self.runs_dir)  # run.init_from: a path
            if elsewhere is not None:
                self._hand_back(run, elsewhere)
                return
            write_json(run_dir / CONFIG, config)
        if self._checkpoint_elsewhere(launch):
            return
        # Counts the attempt, records where it trains; False: no longer ours.
        if not queue.start(self.engine, run, self.name, self.node, self.slurm_job):
            self.echo(f"{run.id} is no longer ours")
            self._drop(run.id)
            return
        env = {**trainer_env(run.launch_id(), self.commit), **self.compile_caches}
        env[LAUNCHED_AT] = f"{time.time():.6f}"  # result.json's time to first step counts from here
        launch.handle = self.launcher.launch(run, slot, run_dir, env)
        launch.since, launch.signalled = time.monotonic(), None
        launch.stop_sent_at = None  # a stop asked for while it waited is asked again at the next beat
        where = f"GPUs {','.join(slot.gpus)}" if slot.gpus else f"CPU slot {slot.index}"
        self.echo(f"started {run.id} (attempt {run.attempts}) on {where}, {launch.handle.describe()}")

    def _checkpoint_elsewhere(self, launch: Launch) -> bool:
        """A run that trained on another node, whose checkpoint this host cannot see (a runs directory that is
        not shared), is handed back with a message rather than restarted from step 0: another worker that
        sees the checkpoint will resume it. True when it was handed back."""
        run = launch.run
        if not run.step or run.node in (None, self.node) or checkpoint_paths(launch.run_dir):
            return False
        why = (
            f"{run.id} reached step {run.step} on {run.node}, but no checkpoint of it is visible here under "
            f"{launch.run_dir}: put --runs-dir on a filesystem every worker shares, or run a worker on "
            f"{run.node}; not restarting it from step 0"
        )
        self._hand_back(run, why)
        return True

    def _hand_back(self, run: Run, why: str) -> None:
        """Give back a run that another host must train (no attempt counted), and never claim it here again."""
        self.echo(f"warning: {why}")
        queue.finish(self.engine, run.id, self.name, Status.PREEMPTED, error=why)
        self.unreachable.add(run.id)
        self._drop(run.id)

    # -- finish -------------------------------------------------------------------------------------------

    def _finish(self, launch: Launch, code: int) -> None:
        """Record how the launch ended: its result.json if it wrote one, else a crash with its log's tail."""
        run = launch.run
        result = _read_json(launch.run_dir / RESULT)
        if result is not None and result.get("launch_id") not in (None, run.launch_id()):
            result = None  # another launch's ending: this one left none (it crashed)
        if result is not None:
            status, error = result["status"], result.get("error")
            code = result.get("exit_code", code)  # the trainer's own code, not torchrun's 1
        else:
            status, error = Status.FAILED, clean_tail(launch.run_dir / LOG)
            if code == EXIT_NO_SPACE or NO_SPACE_LINE in error or disk_full(launch.run_dir):
                self._pause_for_space(run.id, error.splitlines()[-1] if error else "")
                return
            if launch.killed:
                status = Status.PREEMPTED  # we killed it (a second Ctrl-C): it resumes from its last checkpoint
        new_state = queue.finish(self.engine, run.id, self.name, status, result=result, exit_code=code, error=error)
        self._drop(run.id)
        loss = f", test loss {result['test_loss']:.4f}" if result and result.get("test_loss") is not None else ""
        ending = new_state or f"no longer ours ({launch.lost or 'taken away'})"
        self.echo(f"{run.id} {status} (exit {code}){loss} -> {ending}")

    # -- beat, and stopping ---------------------------------------------------------------------------------

    def _beat(self) -> None:
        """Beat with every run's newest progress and validation curve (a pruner reads it), then act on what
        the database says: runs taken away are stopped, stops it asks for are sent."""
        if not self.active:
            return
        progress = {run_id: launch.tail.read_into(launch.progress) for run_id, launch in self.active.items()}
        beat = queue.heartbeat(self.engine, self.name, {run_id: p.columns() for run_id, p in progress.items()})
        for run_id, launch in list(self.active.items()):
            if run_id in beat.lost and launch.lost is None:
                launch.lost = beat.lost[run_id]
                if launch.handle is None:  # never started: nothing to stop
                    self.echo(f"{run_id} was {launch.lost} before it started")
                    self._drop(run_id)
                    continue
                why = "" if launch.lost == "cancelled" else " (our heartbeats missed the grace period)"
                self.echo(f"{run_id} was {launch.lost}{why}: stopping its trainer")
                self._send_stop(launch)
            elif beat.owned.get(run_id) and launch.stop_sent_at is None:
                self.echo(f"{run_id}: stop requested ({beat.owned[run_id]})")
                self._send_stop(launch, beat.owned[run_id])
        for launch in self.active.values():  # escalate on trainers that ignore STOP
            if launch.stop_overdue():
                launch.handle.kill()

    def _show_progress(self) -> None:
        """One line: the queue's counts, then step, loss and speed of each run this worker trains."""
        counts = queries.counts(self.engine)
        parts = [", ".join(f"{counts[k]} {k}" for k in RunState if counts.get(k))]
        for run_id, launch in self.active.items():
            parts.append(f"{run_id[:8]} {launch.progress.line() if launch.handle else 'waiting to start'}")
        self.echo(" | ".join(parts))

    def _stop_all(self) -> None:
        for run_id, launch in list(self.active.items()):
            if launch.handle is None:  # not started: hand it straight back
                queue.finish(self.engine, run_id, self.name, Status.PREEMPTED)
                self._drop(run_id)
            elif launch.stop_sent_at is None:
                self._send_stop(launch)
            elif launch.stop_overdue():
                launch.handle.kill()

    def _send_stop(self, launch: Launch, reason: str = Status.PREEMPTED) -> None:
        try:
            (launch.run_dir / STOP).write_text(reason + "\n")
        except OSError:  # a full disk: SIGTERM says "checkpoint and stop" too (a prune then ends as preempted,
            if launch.handle is not None:  # and the prune request in the database still wins)
                launch.handle.stop()
        launch.stop_sent_at = time.monotonic()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None

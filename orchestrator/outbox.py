"""The tracking outbox: MLflow gets all of a run, late rather than never.

What MLflow must end up holding for a run is durable before anything is sent: its points in the run
directory's metrics.jsonl, its final numbers and state in the database, its artifacts in the run directory.
So the outbox is a comparison rather than a second copy: MLflow is brought up to what those hold, by whoever
holds the run's tracking lease (leases.take "track:<run id>"): its worker while it trains, then anyone
— that worker again, a later worker, or `orch sync` — until `runs.tracked` equals the run's final state.
Each step is idempotent, so a failure anywhere (the server down for minutes, a worker killed mid-send) is
repaired by the next pass:

1. The MLflow run: the id on record, else one found by its `orch.run_id` tag (made by a process that died
   before recording it), else a new one. A run keeps one MLflow id through outages, requeues and workers.
2. Metric points past the last step MLflow holds per key (asked of the server whenever the lease is new to
   this process, so two senders never both send a step).
3. Once the run is final: the test loss (unless present), the result.* and status tags, artifacts, the
   terminal status, and only then `tracked`. Only a final state closes an MLflow run: a worker whose run was taken over
   sends its last points and lets go; the new owner goes on in the same MLflow run.

`Outbox.sync` is one pass for one run; `OutboxThread` runs passes for a worker's runs in the background, so
that a slow or absent tracking server never delays a claim, a heartbeat or a trainer start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from orchestrator import leases, queries, queue, states
from orchestrator.db import Run
from orchestrator.specs import BASELINE, Experiment, SpecError
from trainer.rundir import METRICS, read_events

LEASE_GRACE_S = 60.0  # a sender that stops renewing its lease for this long is replaced
ORPHAN_EVERY_S = 30.0  # how often a worker looks for finished runs that nobody finished tracking
MAX_BACKOFF_S = 60.0  # and at most a third of the lease's grace, so that retrying never loses the lease


@dataclass
class Cursor:
    """What this process knows MLflow holds of one run, valid while it holds the run's lease."""

    mlflow_id: str | None = None
    offset: int = 0  # bytes of metrics.jsonl sent
    last_steps: dict[str, int] | None = None  # per key, the last step MLflow has (None: ask the server)
    renewed_at: float = 0.0  # monotonic time of our last lease renewal


@dataclass
class Pass:
    """The outcome of one sync pass over one run."""

    done: bool  # MLflow holds the whole of a final run (or there is nothing it could hold)
    points: int = 0
    note: str | None = None  # why nothing was done (another holder; no run directory here)


class Outbox:
    def __init__(
        self,
        engine: Engine,
        tracker,
        holder: str,
        runs_dir: str | Path = "runs",
        git_commit: str | None = None,
        lease_grace_s: float = LEASE_GRACE_S,
    ):
        self.engine, self.tracker, self.holder = engine, tracker, holder
        self.runs_dir, self.commit, self.lease_grace_s = Path(runs_dir), git_commit, lease_grace_s
        self.cursors: dict[str, Cursor] = {}
        self.placed: dict[str, tuple] = {}  # run id -> the (node, slurm job) last tagged in MLflow

    def sync(self, run_id: str, close: bool = True) -> Pass:
        """Bring MLflow up to date for one run; raises what the tracking server raised (nothing is lost:
        the next pass starts from what MLflow has). `close=False` sends points only: its trainer still
        runs (a cancelled run checkpointing), and the MLflow run is closed once it has exited."""
        other = leases.take(self.engine, _lease(run_id), self.holder, self.lease_grace_s)
        if other is not None:
            self.cursors.pop(run_id, None)
            return Pass(False, note=f"tracked by {other}")
        cur = self.cursors.get(run_id)
        now = time.monotonic()
        if cur is None or now - cur.renewed_at > self.lease_grace_s / 2:
            cur = self.cursors[run_id] = Cursor()  # the lease may have changed hands since: ask afresh
        cur.renewed_at = now
        try:
            run = _get(self.engine, run_id)
            if run is None:
                return self._let_go(run_id, Pass(True, note="no such run"))
            final = run.state in states.FINAL
            if final and run.launches == 0 and not run.mlflow_run_id:  # cancelled before it ever ran
                queue.set_tracked(self.engine, run.id, run.state)
                return self._let_go(run_id, Pass(True))
            run_dir = Path(run.run_dir) if run.run_dir else self.runs_dir / run.id
            if final and not run_dir.is_dir():
                return self._let_go(
                    run_id,
                    Pass(
                        False,
                        note=f"no run directory {run_dir} here: its points "
                        "and artifacts wait for a process that has it",
                    ),
                )
            if cur.mlflow_id is None:
                cur.mlflow_id = self._mlflow_run(run)
                if not final:
                    self.tracker.reopen(cur.mlflow_id)  # a retried run trains again in its old MLflow run
            self._tag_placement(run, cur.mlflow_id)
            if cur.last_steps is None:
                cur.last_steps = self.tracker.last_steps(cur.mlflow_id)
            points = self._send_points(cur, run_dir / METRICS)
            if not (final and close):
                return Pass(False, points)
            self.tracker.finish_run(cur.mlflow_id, run.state, run_dir, run.result, run.finished_at)
            queue.set_tracked(self.engine, run.id, run.state)
            return self._let_go(run_id, Pass(True, points))
        except BaseException:
            self.cursors.pop(run_id, None)  # unknown what arrived: ask the server next time
            raise

    def release(self, run_id: str) -> None:
        """Stop sending for a run (its lease goes at once, so a new owner need not wait out the grace)."""
        self._let_go(run_id, Pass(False))

    def _let_go(self, run_id: str, outcome: Pass) -> Pass:
        self.cursors.pop(run_id, None)
        leases.release(self.engine, _lease(run_id), self.holder)
        return outcome

    def _mlflow_run(self, run: Run) -> str:
        if run.mlflow_run_id:
            return run.mlflow_run_id
        memberships = queries.memberships(self.engine, run.id)
        first_exp, arm = memberships[0] if memberships else ("orch", "run")
        found = self.tracker.find_run(first_exp, run.id)
        if found is None:
            spec = _spec(self.engine, first_exp)
            intervention = next((i for i in spec.interventions if i.name == arm), None) if spec else None
            found = self.tracker.start_run(
                experiment=first_exp,
                all_experiments=sorted({e for e, _ in memberships}),
                arm=arm,
                run_id=run.id,
                config=run.config,
                seed=run.seed,
                data_seed=run.data_seed,
                repeat=run.repeat,
                git_commit=self.commit,
                spec=spec,
                changes=_changes(spec, arm),
                description=intervention.description if intervention else "",
            )
        return queue.set_mlflow_run(self.engine, run.id, found)

    def _tag_placement(self, run: Run, mlflow_id: str) -> None:
        """Where the run trains now, as MLflow tags, once per new placement (a requeue may move it)."""
        where = (run.node, run.slurm_job)
        if run.node and self.placed.get(run.id) != where:
            tags = {"orch.node": run.node, **({"orch.slurm_job": run.slurm_job} if run.slurm_job else {})}
            self.tracker.set_tags(mlflow_id, tags)
            self.placed[run.id] = where

    def _send_points(self, cur: Cursor, metrics: Path) -> int:
        # Its own offset rather than a tail.MetricsTail: it may advance only once MLflow holds the points,
        # where a tail's read advances at once (an outage mid-send must resend, not skip).
        events, end = read_events(metrics, cur.offset)
        sent = self.tracker.log_events(cur.mlflow_id, events, cur.last_steps) if events else 0
        cur.offset = end
        return sent


def _lease(run_id: str) -> str:
    return f"track:{run_id}"


def _spec(engine: Engine, experiment: str) -> Experiment | None:
    """The experiment's spec as last submitted, or None (none on record, or one an older orch wrote that this
    one cannot read): the run is tracked all the same, only without what the spec adds."""
    try:
        return queries.spec(engine, experiment)
    except (SpecError, ValidationError):
        return None


def _changes(spec: Experiment | None, arm: str) -> dict | None:
    """What an arm changes from the baseline ({} for the baseline); None where the spec does not say (a
    sweep's trials: their driver tags them with their parameters, sweep.Driver._link_mlflow)."""
    if arm == BASELINE:
        return {}
    if spec is None or arm not in {i.name for i in spec.interventions}:
        return None
    try:
        return spec.changes(arm)
    except ValueError:  # stacked parts that disagree: the file was refused at submission, so not here
        return None


def _get(engine: Engine, run_id: str) -> Run | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.get(Run, run_id)


def sync_all(outbox: Outbox, limit: int = 10_000) -> tuple[int, list[tuple[str, str]]]:
    """`orch sync`: one pass over every finished run MLflow does not hold whole. Returns (#done, [(run,
    why not)]) — a run another process is sending, or whose directory is not on this machine, stays pending."""
    done, pending = 0, []
    for run_id in queries.untracked(outbox.engine, limit=limit):
        try:
            outcome = outbox.sync(run_id)
        except Exception as exc:  # noqa: BLE001 - reported per run; the next `orch sync` retries it
            pending.append((run_id, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        if outcome.done:
            done += 1
        else:
            pending.append((run_id, outcome.note or "not finished"))
    return done, pending


@dataclass
class _Due:
    at: float = 0.0
    backoff: float = 0.0


class OutboxThread:
    """A worker's sender: every `every_s`, one pass for each run it trains or has just let go; every
    ORPHAN_EVERY_S, finished runs whose tracking nobody completed (their worker died, or MLflow was down
    when they ended). A failing server is retried with a doubling back-off, and said once, not every pass."""

    def __init__(self, outbox: Outbox, every_s: float = 2.0, orphans_after_s: float = LEASE_GRACE_S, echo=print):
        self.outbox, self.every_s, self.orphans_after_s, self.echo = outbox, every_s, orphans_after_s, echo
        self._lock = threading.Lock()
        self._watched: dict[str, _Due] = {}  # runs this worker trains
        self._closing: dict[str, _Due] = {}  # runs it let go: one pass that succeeds, then forget them
        self._stop = threading.Event()
        self._down_since: float | None = None
        self._next_orphans = time.monotonic() + 5.0
        self._thread = threading.Thread(target=self._loop, name="orch-outbox", daemon=True)

    def start(self) -> "OutboxThread":
        self._thread.start()
        return self

    def watch(self, run_id: str) -> None:
        with self._lock:
            self._closing.pop(run_id, None)
            self._watched[run_id] = _Due()

    def let_go(self, run_id: str) -> None:
        """The run's trainer exited or the run is no longer ours: a last pass, which closes it if final."""
        with self._lock:
            self._watched.pop(run_id, None)
            self._closing[run_id] = _Due()

    def close(self, timeout_s: float = 15.0) -> None:
        """Finish what can be finished within `timeout_s`; the rest stays pending for a later sender."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._closing and self._down_since is None and self._thread.is_alive():
            time.sleep(0.1)
        self._stop.set()
        self._thread.join(max(1.0, deadline - time.monotonic()))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._closing)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as exc:  # noqa: BLE001 - the sender must outlive any one failure
                self.echo(f"warning: tracking round failed ({type(exc).__name__}: {_first_line(exc)}); retrying")
            self._stop.wait(self.every_s if not self._closing else min(self.every_s, 0.2))
        with self._lock:
            held = list(self._watched) + list(self._closing)
        for run_id in held:  # hand the leases back, so the next sender need not wait out the grace
            try:
                self.outbox.release(run_id)
            except Exception:  # noqa: BLE001 - the lease then expires by itself
                pass

    def _round(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(r, d, False) for r, d in self._watched.items() if d.at <= now]
            due += [(r, d, True) for r, d in self._closing.items() if d.at <= now]
        for run_id, d, closing in due:
            self._pass(run_id, d, closing)
        if now >= self._next_orphans and self._down_since is None:
            self._next_orphans = now + ORPHAN_EVERY_S
            self._orphans()

    def _pass(self, run_id: str, d: _Due, closing: bool) -> None:
        try:
            outcome = self.outbox.sync(run_id, close=closing)
            if closing and not outcome.done:
                # Requeued, taken over, or being sent by another process: its last points went out in this
                # pass, and its next sender starts from what MLflow holds.
                self.outbox.release(run_id)
        except Exception as exc:  # noqa: BLE001 - MLflow or the database down: keep it, retry later
            cap = min(MAX_BACKOFF_S, self.outbox.lease_grace_s / 3)
            d.backoff = min(cap, max(self.every_s, 2 * d.backoff))
            d.at = time.monotonic() + d.backoff
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.echo(
                    f"warning: tracking paused ({type(exc).__name__}: {_first_line(exc)}); metrics are "
                    "kept in the run directories and sent when MLflow is back (or by `orch sync`)"
                )
            return
        if self._down_since is not None:
            self.echo(f"tracking resumed after {time.monotonic() - self._down_since:.0f} s: sending what was kept")
            self._down_since = None
        d.backoff, d.at = 0.0, time.monotonic() + self.every_s
        if closing:
            with self._lock:
                self._closing.pop(run_id, None)

    def _orphans(self) -> None:
        try:
            runs = queries.untracked(self.outbox.engine, finished_before_s=self.orphans_after_s, limit=20)
        except Exception:  # noqa: BLE001 - the database is down; the main loop says so
            return
        with self._lock:
            runs = [r for r in runs if r not in self._watched and r not in self._closing]
            for run_id in runs:
                self._closing[run_id] = _Due()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""

"""The sweep driver: an Optuna search whose trials are ordinary queued runs (with sweep_views.py, the only
modules importing optuna).

The study lives in the same database as the queue (Optuna's RDB storage), so nothing about a sweep is held
in a process: the driver (`orch sweep FILE`) is a loop of idempotent steps over the database —

    reconcile  for every RUNNING trial: (re)submit its runs if a crash left it without them; report the
               mean validation curve of its runs as intermediate values; if the pruner says so, ask the
               runs' workers to stop them as "pruned"; once all its runs are final, tell the study
               (COMPLETE with the mean final validation loss, PRUNED, or FAIL)
    ask        while fewer than `in_flight` trials run and the budget is not reached: ask a trial, suggest
               its parameters, store its run ids on the trial, queue the runs

Kill it at any moment and run it again: a trial is told once (only RUNNING trials are told), runs are
identified by their config hash (resubmitting reuses them), and intermediate values are written once per
step. Workers never know they serve a sweep. Pruning requests travel through the database (runs.stop), so
the driver needs no access to the workers' run directories.

One driver asks at a time: it holds the sweep's lease (leases.take) and renews it every pass. A second
`orch sweep` on the same study waits as a standby and takes over within `lease_grace_s` of the first one's
death, or at once when the first one exits cleanly.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

import optuna
import sqlalchemy as sa
from optuna.trial import TrialState
from sqlalchemy.engine import Engine

from orchestrator import leases, queries, queue, states, submission
from orchestrator.db import Run
from orchestrator.runspec import sweep_base, trial_runs
from orchestrator.specs import Experiment, LogUniform, Sweep, Uniform
from orchestrator.states import RunState
from trainer.rundir import Status

RUNS_ATTR = "orch_runs"
STOPPED_ATTR = "orch_stopped_at"  # a pruned trial: the step its trainers stopped at (result.json)
optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sampler(sweep: Sweep, trials_so_far: int) -> optuna.samplers.BaseSampler:
    # A restarted driver must not replay the random stream of the first one (it would propose the same
    # points again), so the seed moves on with the trials already in the study.
    seed = sweep.sampler_seed + trials_so_far
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if sweep.sampler == "grid":
        import numpy as np

        grid = {}
        for key, p in sweep.space.items():
            if isinstance(p, LogUniform):
                grid[key] = [float(v) for v in np.geomspace(p.low, p.high, sweep.grid_points)]
            elif isinstance(p, Uniform):
                grid[key] = [float(v) for v in np.linspace(p.low, p.high, sweep.grid_points)]
            else:
                grid[key] = list(p.choices)
        return _Grid(grid, seed=seed)
    # Optuna's default of 10 random start-up trials would make a small sweep pure random search; with trials
    # in flight, the constant liar keeps two concurrent asks from landing in the same spot.
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=max(2, min(10, sweep.trials // 3)), constant_liar=sweep.in_flight > 1
    )


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid, without its end-of-grid study.stop(): that only works inside study.optimize, and with
    ask-and-tell it would fail the last tell. The driver stops at its budget (capped at the grid's size)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def budget(sweep: Sweep) -> int:
    if sweep.sampler != "grid":
        return sweep.trials
    size = 1
    for p in sweep.space.values():
        size *= len(p.choices) if hasattr(p, "choices") else sweep.grid_points
    return min(sweep.trials, size)


def _pruner(sweep: Sweep, total_steps: int) -> optuna.pruners.BasePruner:
    if sweep.pruner == "median":
        # Early losses mostly rank learning rates by how fast they start, not where they end: judge no
        # trial in its first quarter (bench/sweep.py saw lr 1e-2 lead at step 4 of 40 and lose by 1.07).
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(1, total_steps // 4))
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=total_steps, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _suggest(trial: optuna.Trial, sweep: Sweep) -> dict:
    params = {}
    for key, p in sweep.space.items():
        if isinstance(p, LogUniform):
            params[key] = trial.suggest_float(key, p.low, p.high, log=True)
        elif isinstance(p, Uniform):
            params[key] = trial.suggest_float(key, p.low, p.high)
        else:
            params[key] = trial.suggest_categorical(key, p.choices)
    return params


def storage(engine: Engine) -> optuna.storages.RDBStorage:
    """Optuna's storage on the queue's database (its own tables beside ours)."""
    kwargs: dict = {"pool_pre_ping": True}
    if engine.url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": 60}  # wait for the workers' short write transactions
    return optuna.storages.RDBStorage(engine.url.render_as_string(hide_password=False), engine_kwargs=kwargs)


def open_study(engine: Engine, sweep: Sweep, total_steps: int) -> optuna.Study:
    store = storage(engine)
    try:
        existing = len(optuna.load_study(study_name=sweep.name, storage=store).get_trials(deepcopy=False))
    except KeyError:
        existing = 0
    return optuna.create_study(
        study_name=sweep.name,
        storage=store,
        direction="minimize",
        load_if_exists=True,
        sampler=_sampler(sweep, existing),
        pruner=_pruner(sweep, total_steps),
    )


@dataclass
class Driver:
    engine: Engine
    sweep: Sweep
    preset: str | None = None
    overrides: dict | None = None
    tracker: object | None = None
    poll_s: float = 2.0
    echo: object = print
    lease_grace_s: float = 60.0  # a driver that has not renewed its lease for this long is replaced

    def __post_init__(self):
        if self.lease_grace_s < 3 * self.poll_s:
            raise ValueError(
                f"the lease grace ({self.lease_grace_s:g} s) must be at least 3 polls "
                f"({3 * self.poll_s:g} s), or a live driver would lose its sweep between two passes"
            )
        # host:pid for the messages, and a random part: containers on one host can share name and pid.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = f"{queries.SWEEP_LEASE}{self.sweep.name}"
        self.base = sweep_base(self.sweep, self.preset, self.overrides)
        from trainer.config import TrainConfig

        self.total_steps = TrainConfig.model_validate(self.base).total_steps()
        self.study = open_study(self.engine, self.sweep, self.total_steps)
        self.experiment = Experiment(
            name=self.sweep.name,
            description=self.sweep.description or "sweep",
            preset=self.preset or self.sweep.preset,
            base=self.sweep.base,
            include_baseline=False,
        )
        self.parent_run = None

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> optuna.Study:
        self._wait_for_lease()
        try:
            self._publish()
            # Only the lease holder writes to the study: two drivers starting a new study together must not
            # both enqueue its start_with points.
            if self.sweep.start_with and not self.study.get_trials(deepcopy=False):  # a new study only
                for point in self.sweep.start_with:
                    self.study.enqueue_trial(point)
            return self._drive()
        finally:
            try:
                leases.release(self.engine, self.lease, self.holder)
            except Exception as exc:  # noqa: BLE001 - never hide the error that ended the loop
                self.echo(
                    f"sweep {self.sweep.name}: could not release the lease ({exc}); a standby takes "
                    f"over after {self.lease_grace_s:g} s"
                )

    def _publish(self) -> None:
        """Record this driver's target and lease grace on the study: what a worker with --until-empty reads
        (queries.sweeps_asking) to wait for the next ask rather than leave the sweep stranded, and the
        target `orch sweep status` lists."""
        self.study.set_user_attr(queries.SWEEP_TARGET, budget(self.sweep))
        self.study.set_user_attr(queries.SWEEP_GRACE, self.lease_grace_s)

    def _holds_lease(self) -> bool:
        """Renew the lease; False (and say so) when another driver has taken it — this one stalled past the
        grace (a suspended laptop, say) and must leave the study to the new driver."""
        holder = leases.take(self.engine, self.lease, self.holder, self.lease_grace_s)
        if holder is not None:
            self.echo(f"sweep {self.sweep.name}: {holder} took over this sweep; leaving it to that driver")
        return holder is None

    def _wait_for_lease(self) -> None:
        told = False
        while (holder := leases.take(self.engine, self.lease, self.holder, self.lease_grace_s)) is not None:
            if not told:
                self.echo(
                    f"sweep {self.sweep.name} is driven by {holder}; waiting as a standby, to take over "
                    f"if it stops for {self.lease_grace_s:g} s (Ctrl-C to leave)"
                )
                told = True
            time.sleep(self.poll_s)
        if told:
            self.echo(f"sweep {self.sweep.name}: took over")

    def _drive(self) -> optuna.Study:
        failures = 0
        while True:
            try:
                done = self._pass()
            except (sa.exc.OperationalError, sa.exc.InterfaceError, optuna.exceptions.StorageInternalError) as exc:
                # The database restarted or is away for a while: the study and the queue are in it, so wait
                # for it (workers do the same); a standby that took over meanwhile is noticed by the lease.
                failures += 1
                self.echo(f"sweep {self.sweep.name}: database error ({type(exc).__name__}); retrying")
                time.sleep(min(30.0, self.poll_s * 2 ** min(failures, 5)))
                continue
            failures = 0
            if done is not None:
                return done
            time.sleep(self.poll_s)

    def _pass(self) -> optuna.Study | None:
        """One pass of the loop; the study when the driver is done with it, else None."""
        if not self._holds_lease():
            return self.study
        self._track_parent()
        self.reconcile()
        trials = self.study.get_trials(deepcopy=False)
        # Failed trials count too: a sweep whose runs all fail must end, not ask forever.
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        if len(done) >= budget(self.sweep) and not running:
            if self._holds_lease():
                self.finish()
            return self.study
        if not self._holds_lease():  # again right before asking: reconciling may have taken a while
            return self.study
        for _ in range(min(self.sweep.in_flight - len(running), budget(self.sweep) - len(done) - len(running))):
            if not self.ask():
                break
        return None

    def _track_parent(self) -> None:
        """The sweep's MLflow parent run, found or made as soon as the tracking server answers: MLflow being
        down delays the sweep's tracking, never the sweep (the trials' runs are tracked by their workers)."""
        if self.tracker is None or self.parent_run is not None:
            return
        try:
            self.parent_run = self.tracker.sweep_parent(self.sweep.name)
        except Exception as exc:  # noqa: BLE001
            if not getattr(self, "_told_mlflow", False):
                self.echo(
                    f"sweep {self.sweep.name}: MLflow unreachable ({type(exc).__name__}); tracking the "
                    "sweep once it is back"
                )
                self._told_mlflow = True

    def ask(self) -> bool:
        trial = self.study.ask()
        params = _suggest(trial, self.sweep)
        runs = trial_runs(self.sweep, self.base, params, f"trial-{trial.number}")
        trial.set_user_attr(RUNS_ATTR, [r.id for r in runs])  # before queuing: a crash here resubmits
        report = submission.submit(self.engine, self.experiment, runs, source=f"sweep {self.sweep.name}")
        reused = f" ({len(report.reused)} reused)" if report.reused else ""
        self.echo(f"trial {trial.number}: {format_params(params)} -> {len(runs)} run(s){reused}")
        return True

    def reconcile(self) -> None:
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            if not frozen.params or len(frozen.params) < len(self.sweep.space):
                self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)  # died before suggesting
                self.echo(f"trial {frozen.number}: abandoned before its parameters were chosen")
                continue
            run_ids = frozen.user_attrs.get(RUNS_ATTR)
            runs = queries.runs(self.engine, run_ids or [])
            if run_ids is None or len(runs) < len(run_ids):
                # Died between suggesting and queuing: queue them now (submitting is idempotent).
                specs_ = trial_runs(self.sweep, self.base, frozen.params, f"trial-{frozen.number}")
                if run_ids is None:
                    trial.set_user_attr(RUNS_ATTR, [r.id for r in specs_])
                submission.submit(self.engine, self.experiment, specs_, source=f"sweep {self.sweep.name}")
                continue
            if frozen.user_attrs.get("pruning"):  # re-asked each pass: a requeue clears a stop request
                own = self._stop(runs, f"trial-{frozen.number}")
                if all(r.state in states.FINAL for r in own):  # shared runs train on; the trial is done
                    self._tell(frozen, runs)
                    continue
            self._link_mlflow(runs, frozen.params)
            self._report(trial, frozen, runs)
            if all(r.state in states.FINAL for r in runs) and len(runs) == len(run_ids):
                self._tell(frozen, runs)

    def _report(self, trial: optuna.Trial, frozen, runs: list[Run]) -> None:
        """Mean validation loss over the trial's runs at each step all of them reached; prune if told to."""
        curves = [dict((int(s), v) for s, v in (r.val_curve or [])) for r in runs]
        common = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        for step in common:
            if step not in frozen.intermediate_values and step < self.total_steps:
                trial.report(sum(c[step] for c in curves) / len(curves), step)
        if common and not frozen.user_attrs.get("pruning") and trial.should_prune():
            # Said once, when told (_tell), at the step its trainers stopped at: they stop at their next
            # sync point, later than the step judged here.
            trial.set_user_attr("pruning", True)
            self._stop(runs, f"trial-{frozen.number}")

    def _stop(self, runs: list[Run], arm: str) -> list[Run]:
        """Stop a pruned trial's own runs: cancel the queued ones, ask the running ones' trainers to stop as
        pruned; return them. A run that another experiment, or another trial with the same parameters,
        shares trains on for it, and the trial is told pruned without waiting for it."""
        others = queries.shared(self.engine, [r.id for r in runs], self.sweep.name, arm)
        own = [r for r in runs if r.id not in others]
        queue.cancel(self.engine, [r.id for r in own if r.state == RunState.QUEUED])
        queue.request_stop(self.engine, [r.id for r in own if r.state == RunState.RUNNING], Status.PRUNED)
        return own

    def _tell(self, frozen, runs: list[Run]) -> None:
        values = [(r.result or {}).get("val_loss") for r in runs]
        if frozen.user_attrs.get("pruning") or any(r.state == RunState.PRUNED for r in runs):
            steps = stopped_at(runs)
            if steps:
                optuna.trial.Trial(self.study, frozen._trial_id).set_user_attr(STOPPED_ATTR, max(steps))
            self.study.tell(frozen.number, state=TrialState.PRUNED, skip_if_finished=True)
            self.echo(f"trial {frozen.number}: pruned {_at(steps)}")
        elif all(r.state == RunState.SUCCEEDED for r in runs) and None not in values:
            value = sum(values) / len(values)
            tests = [r.test_loss for r in runs]
            optuna.trial.Trial(self.study, frozen._trial_id).set_user_attr("test_loss", sum(tests) / len(tests))
            self.study.tell(frozen.number, value, skip_if_finished=True)
            self.echo(f"trial {frozen.number}: val loss {value:.4f}")
        else:
            self.study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
            self.echo(f"trial {frozen.number}: failed ({', '.join(sorted({r.state for r in runs}))})")

    def _link_mlflow(self, runs: list[Run], params: dict) -> None:
        """Nest the trial's runs under the sweep's parent run, tagged with what the trial changed (its
        parameters: orch.changes, as an intervention's runs are)."""
        if self.tracker is None or self.parent_run is None:
            return
        for r in runs:
            if r.mlflow_run_id:
                try:
                    self.tracker.set_parent(r.mlflow_run_id, self.parent_run, changes=params)
                except Exception:  # noqa: BLE001 - linked again at the next pass
                    return

    def finish(self) -> None:
        best = best_trial(self.study)
        if best is None:
            self.echo("no trial completed")
            return
        self.echo(f"best: trial {best.number}, val loss {best.value:.4f}, {format_params(best.params)}")
        if self.tracker is not None:
            self._track_parent()
            try:
                self.tracker.finish_sweep(self.parent_run, best.params, best.value, trial_counts(self.study))
            except Exception as exc:  # noqa: BLE001 - the study holds the result; MLflow's copy is a convenience
                self.echo(f"sweep {self.sweep.name}: could not record the best trial in MLflow ({exc})")


def stopped_at(runs: list[Run]) -> list[int]:
    """The steps a pruned trial's trainers stopped at, from their result.json (a run cancelled before it
    started has none)."""
    return sorted({r.result["step"] for r in runs if r.state == RunState.PRUNED and (r.result or {}).get("step")})


def _at(steps: list[int]) -> str:
    if not steps:
        return "before its runs started"
    return f"at step {steps[0]}" if len(steps) == 1 else f"at steps {', '.join(map(str, steps))}"


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state ("complete", "pruned", "running", "fail", …)."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def best_trial(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(complete, key=lambda t: t.value) if complete else None


def format_params(params: dict) -> str:
    """A trial's parameters as one line, floats to 4 significant digits."""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

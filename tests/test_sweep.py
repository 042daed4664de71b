"""`orch sweep` for real: an Optuna study in the queue's database, trials trained by two real workers,
pruning through the trainer's STOP file, and a sweep command killed mid-way and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from orchestrator import queries, queue, submission
from orchestrator.db import connect
from orchestrator.states import RunState
from tests.conftest import FAST
from tests.test_worker import Orch, wait_until


def sweep_file(
    tmp_path,
    data_dir,
    name,
    *,
    trials,
    in_flight=2,
    steps=24,
    space=None,
    sampler="tpe",
    pruner="median",
    start_with=None,
):
    base = {**FAST, "data.path": str(data_dir), "run.steps": steps, "eval.interval": 2, "run.checkpoint_interval": 8}
    space = (
        space or '{"optim.lr": LogUniform(low=1e-4, high=1e-2), "optim.weight_decay": LogUniform(low=1e-3, high=1.0)}'
    )
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from orchestrator.specs import Choice, LogUniform, Sweep\n"
        f"sweep = Sweep(name={name!r}, preset='tiny', base={base!r}, space={space}, sampler={sampler!r},\n"
        f"    pruner={pruner!r}, trials={trials}, in_flight={in_flight}, start_with={start_with or []!r})\n"
    )
    return path


def status(orch: Orch, name: str) -> dict:
    return json.loads(orch("sweep", "status", name, "--format", "json").stdout)


@pytest.fixture
def workers(tmp_path):
    orch = Orch(tmp_path)
    procs = []

    def start(n=2, mlflow=True):
        for _ in range(n):
            procs.append(
                orch.start("worker", "--heartbeat", "0.3", "--grace", "3", *([] if mlflow else ["--no-mlflow"]))
            )
        return orch

    start.procs = procs
    yield start
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_sweep_runs_its_budget_on_two_workers_with_mlflow_parent_and_children(tmp_path, data_dir, workers):
    orch = workers(2)
    path = sweep_file(tmp_path, data_dir, "sw", trials=4, steps=12)
    out = orch("sweep", str(path), "--poll", "0.3", "--mlflow", orch.mlflow, timeout=600)
    assert "best: trial" in out.stdout
    info = status(orch, "sw")
    assert info["counts"].get("complete", 0) + info["counts"].get("pruned", 0) == 4
    runs = [r for t in info["trials"] for r in t["runs"]]
    assert len(runs) == len(set(runs)) == 4  # one run per trial, none shared
    eng = connect(orch.db)
    workers_used = {
        r.result["environment"]["host"] + str(r.attempts) for _, _, r in queries.runs_of(eng, ["sw"]) if r.result
    }
    assert workers_used
    text = orch("sweep", "status", "sw").stdout
    assert "best: trial" in text and "optim.lr=" in text

    from mlflow.tracking import MlflowClient

    client = MlflowClient(orch.mlflow)
    exp = client.get_experiment_by_name("sw")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`orch.kind` = 'sweep'")
    assert len(parent) == 1 and "best.val_loss" in parent[0].data.metrics
    assert any(k.startswith("best.optim.lr") for k in parent[0].data.params)
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'"
    )
    assert len(children) == 4

    drawn = orch("sweep", "plot", "sw", "--out", str(tmp_path / "plots"))
    plots, complete = drawn.stdout, info["counts"].get("complete", 0)
    assert "history.png" in plots and (tmp_path / "plots" / "index.html").exists()
    assert ("contour.png" in plots) == (complete >= 3)  # the pruner decides how many complete
    assert "importances.png" not in plots and f"no importances from {complete} completed trial(s)" in drawn.stderr

    confirm = orch("sweep", "confirm", "sw", "--seeds", "2").stdout
    # Baseline and best trial, 2 seeds each; the best trial's own run (seed 42) is reused, not retrained.
    assert "sw.confirm: 3 queued, 1 reused" in confirm
    wait_until(
        lambda: queries.counts(eng).get("queued", 0) + queries.counts(eng).get("running", 0) == 0,
        timeout=300,
        what="the confirmation runs",
    )
    table = json.loads(orch("table", "sw.confirm", "--format", "json").stdout)[0]
    best = next(r for r in table["rows"] if r["arm"].startswith("best-trial-"))
    assert best["n"] == 2 and best["verdict"] in ("better", "worse", "equivalent", "undecided")


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_pruning_stops_hopeless_trials_early_and_an_until_empty_worker_sees_the_sweep_through(tmp_path, data_dir):
    orch = Orch(tmp_path)
    # Evaluated in this order, one at a time: two sensible learning rates set the median, then two that
    # barely move the weights trail it at the first evaluations and are stopped. The command line's
    # --trials and --in-flight replace the file's 6 and 2.
    start = [{"optim.lr": 3e-3}, {"optim.lr": 2e-3}, {"optim.lr": 1e-6}, {"optim.lr": 2e-6}]
    path = sweep_file(
        tmp_path,
        data_dir,
        "pr",
        trials=6,
        in_flight=2,
        steps=60,
        sampler="random",
        space='{"optim.lr": LogUniform(low=1e-6, high=1e-2)}',
        start_with=start,
    )
    driver = orch.start("sweep", str(path), "--trials", "4", "--in-flight", "1", "--poll", "0.2", "--no-mlflow")
    eng = connect(orch.db)
    try:
        # One `orch worker --until-empty`, started once trial 0 is queued: after each trial it finds the queue
        # empty before the driver has queued the next one, and must wait for it rather than strand the sweep.
        wait_until(lambda: queries.counts(eng).get("queued"), timeout=120, what="trial 0 queued")
        worker = orch("worker", "--until-empty", "--no-mlflow", "--heartbeat", "0.3", "--grace", "3", timeout=600)
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out
    said = out.splitlines()
    assert said[0].startswith("sweep pr: 4 trials, 1 in flight") and "best: trial" in out
    assert "queue empty; waiting for sweep pr, whose driver may queue more trials" in worker.stdout
    info = status(orch, "pr")
    states = {t["number"]: t["state"] for t in info["trials"]}
    assert states == {0: "complete", 1: "complete", 2: "pruned", 3: "pruned"}
    runs = [queries.runs(eng, t["runs"])[0] for t in sorted(info["trials"], key=lambda t: t["number"])]
    assert all(b.created_at >= a.finished_at for a, b in zip(runs, runs[1:]))  # one in flight at a time
    for t in info["trials"][2:]:
        [run] = queries.find(eng, t["runs"][0])
        assert run.state == "pruned" and run.result["status"] == "pruned"
        assert run.result["step"] < 60  # stopped early, checkpointed
        # Said once, at the step the trainer stopped at (its result.json), as `orch sweep status` shows it.
        n = t["number"]
        assert [line for line in said if "pruned" in line and f"trial {n}:" in line] == [
            f"trial {n}: pruned at step {run.result['step']}"
        ]
        assert t["stopped_at"] == run.result["step"] and run.exit_code == 76
    assert info["best"]["number"] in (0, 1)

    # `orch sweep status` with no name lists every sweep.
    [listed] = json.loads(orch("sweep", "status", "--format", "json").stdout)
    best = info["best"]["value"]
    assert listed == {"name": "pr", "finished": 4, "target": 4, "best": best, "state": "finished", "driver": None}
    lines = orch("sweep", "status").stdout.splitlines()
    assert lines[0].split() == ["sweep", "trials", "best", "val", "loss", "state"]
    assert lines[1].split() == ["pr", "4/4", f"{best:.4f}", "finished"]


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_killed_sweep_command_resumes_and_counts_every_trial_once(tmp_path, data_dir, workers):
    orch = workers(2, mlflow=False)
    path = sweep_file(tmp_path, data_dir, "kl", trials=6, steps=12, pruner="none")
    args = ("sweep", str(path), "--poll", "0.3", "--grace", "3", "--no-mlflow")
    driver = orch.start(*args)
    eng = connect(orch.db)

    def completed():
        try:
            return status(orch, "kl")["counts"].get("complete", 0) >= 2
        except AssertionError:
            return False

    wait_until(completed, timeout=300, what="two completed trials")
    # A second sweep command on the same study waits as a standby while the first one drives it ...
    standby = orch.start(*args)
    said = []
    for line in standby.stdout:  # its start-up takes seconds on a loaded machine: wait until it says so
        said.append(line)
        if "waiting as a standby" in line:
            break
    assert standby.poll() is None, "".join(said)
    os.kill(driver.pid, signal.SIGKILL)  # ... then the sweep command, and one of the two workers, die at once
    os.kill(workers.procs[0].pid, signal.SIGKILL)
    driver.wait()
    workers.procs[0].wait()
    out, _ = standby.communicate(timeout=600)  # the standby takes over and finishes the budget
    out = "".join(said) + out
    assert standby.returncode == 0, out
    assert "waiting as a standby" in out and "took over" in out and "best: trial" in out
    info = status(orch, "kl")
    assert info["counts"] == {"complete": 6}
    runs = [r for t in info["trials"] for r in t["runs"]]
    assert len(runs) == len(set(runs)) == 6
    assert all(r.state == "succeeded" for _, _, r in queries.runs_of(eng, ["kl"]))
    assert sorted(t["number"] for t in info["trials"]) == list(range(6))


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes"])
def test_every_sampler_proposes_inside_the_space(sampler, tmp_path):
    import optuna

    from orchestrator import specs
    from orchestrator import sweep as sw

    spec = specs.Sweep(name=f"s-{sampler}", sampler=sampler, grid_points=2)
    study = optuna.create_study(sampler=sw._sampler(spec, 0), direction="minimize")
    for _ in range(4):
        trial = study.ask()
        params = sw._suggest(trial, spec)
        assert 1e-4 <= params["optim.lr"] <= 1e-2 and 1e-3 <= params["optim.weight_decay"] <= 1.0
        study.tell(trial, params["optim.lr"])


def test_pruning_leaves_runs_that_other_experiments_share(tmp_path):
    # A pruned trial's own runs are cancelled or stopped; a run an ordinary experiment shares (the same
    # config, trained once for both) trains on, for that experiment's table.
    from orchestrator import runspec, specs
    from orchestrator.sweep import Driver

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    sweep = specs.Sweep(name="sw", base={"run.steps": 4}, seeds=2)
    driver = Driver(eng, sweep, echo=lambda *_: None)
    runs = runspec.trial_runs(sweep, driver.base, {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, "trial-0")
    submission.submit(eng, driver.experiment, runs)
    submission.submit(eng, specs.Experiment(name="other", include_baseline=False), runs[:1])  # shares seed 0
    queue.claim(eng, "w", 2)
    driver._stop(queries.find(eng, runs[0].id) + queries.find(eng, runs[1].id), "trial-0")
    assert queue.heartbeat(eng, "w", {runs[0].id: {}, runs[1].id: {}}).owned == {runs[0].id: None, runs[1].id: "pruned"}
    queue.requeue_stale(eng, -1)  # both back in the queue: the shared one stays, the trial's own is cancelled
    driver._stop(queries.find(eng, runs[0].id) + queries.find(eng, runs[1].id), "trial-0")
    assert [queries.find(eng, r.id)[0].state for r in runs] == [RunState.QUEUED, RunState.CANCELLED]


def test_a_pruned_trial_is_told_once_its_own_runs_stop_and_same_parameter_trials_share_runs(tmp_path):
    import optuna

    from orchestrator import runspec, specs
    from orchestrator import sweep as sw
    from orchestrator.sweep import Driver

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    sweep = specs.Sweep(name="sw", base={"run.steps": 4}, seeds=2)
    driver = Driver(eng, sweep, echo=lambda *_: None)
    driver.ask()
    [frozen] = driver.study.get_trials(deepcopy=False)
    ids = frozen.user_attrs[sw.RUNS_ATTR]
    # A later trial that drew the same parameters shares both runs, under another arm of the same experiment.
    again = runspec.trial_runs(sweep, driver.base, frozen.params, "trial-9")
    submission.submit(eng, driver.experiment, again)
    assert set(queries.shared(eng, ids, "sw", "trial-0")) == set(ids)
    assert queries.shared(eng, ids, "sw") == {}  # no other experiment has them
    # Only seed 1 is shared now (seed 0's second membership removed): pruning stops seed 0 alone, and the
    # trial is told pruned as soon as seed 0 is final, while seed 1 trains on for trial 9.
    from orchestrator.db import Membership

    with eng.begin() as conn:
        conn.execute(Membership.__table__.delete().where(Membership.arm == "trial-9", Membership.run_id == ids[0]))
    queue.claim(eng, "w", 2)
    optuna.trial.Trial(driver.study, frozen._trial_id).set_user_attr("pruning", True)
    driver.reconcile()
    assert queue.heartbeat(eng, "w", {i: {} for i in ids}).owned == {ids[0]: "pruned", ids[1]: None}
    assert driver.study.get_trials(deepcopy=False)[0].state == optuna.trial.TrialState.RUNNING
    queue.finish(eng, ids[0], "w", "pruned", result={"status": "pruned", "step": 2})
    driver.reconcile()
    assert driver.study.get_trials(deepcopy=False)[0].state == optuna.trial.TrialState.PRUNED
    assert queries.find(eng, ids[1])[0].state == RunState.RUNNING


# ---- issue 12: a new user's trial of sweeps ------------------------------------------------------------


def test_an_until_empty_worker_waits_only_while_the_sweeps_driver_lives(tmp_path, db_url):
    """The rule: wait while a sweep has fewer finished trials than its target and its driver renewed its
    lease within twice its grace. A driver that died lets the workers go; a finished sweep keeps none."""
    from orchestrator import leases, specs, sweep_views
    from orchestrator.launchers import Slot
    from orchestrator.sweep import Driver
    from orchestrator.worker import Worker

    eng = connect(db_url)  # also on PostgreSQL: the rule reads Optuna's tables directly
    sweep = specs.Sweep(name="sw", base={"run.steps": 4}, trials=2)
    driver = Driver(eng, sweep, echo=lambda *_: None, poll_s=0.5, lease_grace_s=1.5)
    assert queries.sweeps_asking(eng) == []  # a standby or a driver still starting: no lease, nothing to wait for
    assert leases.take(eng, driver.lease, driver.holder, driver.lease_grace_s) is None
    assert queries.sweeps_asking(eng) == ["sw"]  # its target not recorded yet: wait
    driver._publish()
    assert queries.sweeps_asking(eng) == ["sw"]
    [listed] = sweep_views.list_sweeps(eng).sweeps
    assert (listed.state, listed.driver, listed.finished, listed.target) == ("running", driver.holder, 0, 2)

    # The driver dies now (no more beats): the worker waits for it, then goes.
    said: list[str] = []
    worker = Worker(eng, runs_dir=tmp_path / "runs", slots=[Slot(0, None)], heartbeat_s=0.5, echo=said.append)
    started = time.monotonic()
    assert worker.run(until_empty=True) == 0
    assert 1.5 < time.monotonic() - started < 10
    assert said == ["queue empty; waiting for sweep sw, whose driver may queue more trials"]
    assert queries.sweeps_asking(eng) == []
    assert sweep_views.list_sweeps(eng).sweeps[0].state == "stopped"

    # A live driver whose trials have all finished asks for no more.
    assert leases.take(eng, driver.lease, driver.holder, driver.lease_grace_s) is None
    for value in (1.0, 2.0):
        driver.study.tell(driver.study.ask(), value)
    assert queries.sweeps_asking(eng) == []
    leases.release(eng, driver.lease, driver.holder)
    [listed] = sweep_views.list_sweeps(eng).sweeps
    assert (listed.state, listed.finished, listed.target, listed.best) == ("finished", 2, 2, 1.0)


def test_a_pruned_rank_under_torchrun_exits_0_and_leaves_its_own_code_in_result_json(monkeypatch):
    from trainer.result import exit_code
    from trainer.rundir import Status

    assert exit_code(Status.PRUNED) == 76
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")  # what torchrun's agent sets for its ranks
    assert exit_code(Status.PRUNED) == 0  # the agent then reports no failure (no traceback in train.log)
    assert exit_code(Status.PREEMPTED) == 75 and exit_code(Status.SUCCEEDED) == 0


@pytest.mark.slow  # two ranks under torchrun on two cores: ~45 s
def test_a_pruned_run_under_torchrun_looks_pruned_everywhere(tmp_path, data_dir):
    # Two ranks under torchrun's agent: a pruned trainer must not leave the agent's ChildFailedError
    # traceback in its log, nor the agent's exit 1 in the run's record.
    from tests.test_worker import write_experiment

    orch = Orch(tmp_path)
    orch("submit", str(write_experiment(tmp_path, data_dir, "pe", "", steps=400)))
    worker = orch.start("worker", "--nproc-per-node", "2", "--no-mlflow", "--heartbeat", "0.3", "--until-empty")
    eng = connect(orch.db)
    try:
        wait_until(lambda: queries.find(eng, "")[0].state == RunState.RUNNING, timeout=120, what="the run claimed")
        [run] = queries.find(eng, "")
        queue.request_stop(eng, [run.id], "pruned")
        out, _ = worker.communicate(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
    [run] = queries.find(eng, "")
    assert (run.state, run.exit_code, run.error) == ("pruned", 76, None)
    assert f"{run.id} pruned (exit 76) -> pruned" in out
    log = orch("logs", run.id[:8], "-n", "500").stdout
    assert log.rstrip().endswith(f"pruned: at step {run.result['step']} ({run.run_dir}/result.json)")
    assert "Traceback" not in log and "ChildFailedError" not in log and "exitcode" not in log


def test_a_pruned_trial_is_said_once_at_the_step_its_trainer_stopped(tmp_path):
    import optuna

    from orchestrator import specs, sweep_views
    from orchestrator import sweep as sw
    from orchestrator.sweep import Driver

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    said: list[str] = []
    driver = Driver(eng, specs.Sweep(name="sw", base={"run.steps": 40}), echo=said.append)
    driver.ask()
    [frozen] = driver.study.get_trials(deepcopy=False)
    [run_id] = frozen.user_attrs[sw.RUNS_ATTR]
    queue.claim(eng, "w", 1)
    optuna.trial.Trial(driver.study, frozen._trial_id).set_user_attr("pruning", True)  # judged at step 8, say
    driver.reconcile()
    assert queue.heartbeat(eng, "w", {run_id: {}}).owned == {run_id: "pruned"}
    # Its trainer stops at its next sync point, step 12, and says so in result.json.
    queue.finish(eng, run_id, "w", "pruned", result={"status": "pruned", "step": 12, "exit_code": 76}, exit_code=76)
    driver.reconcile()
    driver.reconcile()
    assert [line for line in said if "pruned" in line] == ["trial 0: pruned at step 12"]
    info = sweep_views.status(eng, "sw")
    assert info.trials[0].stopped_at == 12 and "pruned" in str(info) and "stopped at    12" in str(info)


def test_the_default_table_leaves_sweeps_out(tmp_path):
    from orchestrator import api, specs
    from orchestrator.sweep import RUNS_ATTR, Driver

    url = f"sqlite:///{tmp_path / 'results.db'}"
    eng = connect(url)
    driver = Driver(eng, specs.Sweep(name="sw", base={"run.steps": 4}), echo=lambda *_: None)
    driver.ask()
    [run_id] = driver.study.get_trials(deepcopy=False)[0].user_attrs[RUNS_ATTR]
    queue.claim(eng, "w", 1)
    queue.finish(eng, run_id, "w", "succeeded", result={"status": "succeeded", "test_loss": 3.5, "val_loss": 3.6})
    with pytest.raises(ValueError, match=r"no runs yet outside the sweeps \(sw\)"):
        api.table(db=url)
    (tmp_path / "pub.csv").write_text("name,test_loss,seed\nbaseline,3.50,0\nbaseline,3.60,1\nclip,3.40,0\n")
    api.import_results(tmp_path / "pub.csv", db=url)
    assert [b.experiment for b in api.table(db=url).boards] == ["pub"]
    assert [b.experiment for b in api.table("sw", db=url).boards] == ["sw"]  # named: shown
    assert sorted(b.experiment for b in api.table(["sw", "pub"], db=url).boards) == ["pub", "sw"]


def test_plot_warns_and_leaves_out_what_too_few_completed_trials_cannot_show(tmp_path):
    import optuna

    from orchestrator import sweep_views
    from orchestrator.sweep import storage

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    study = optuna.create_study(study_name="pl", storage=storage(eng), direction="minimize")

    def complete(n):
        for _ in range(n):
            t = study.ask()
            lr = t.suggest_float("optim.lr", 1e-4, 1e-2, log=True)
            study.tell(t, lr + t.suggest_float("optim.weight_decay", 1e-3, 1.0, log=True))

    said: list[str] = []
    complete(2)
    paths = sweep_views.plot(eng, "pl", tmp_path / "two", echo=said.append)
    assert [p.name for p in paths] == ["index.html", "history.png"]
    assert said == [
        "warning: no contour from 2 completed trial(s): it needs at least 3",
        "warning: no importances from 2 completed trial(s): they need at least 5",
    ]
    said.clear()
    complete(3)
    paths = sweep_views.plot(eng, "pl", tmp_path / "five", echo=said.append)
    assert [p.name for p in paths] == ["index.html", "history.png", "contour.png", "importances.png"] and not said


@pytest.mark.parametrize(
    "args, says",
    [
        (["--trials", "0"], "error: --trials must be a positive whole number of trials, not 0; e.g. --trials 20"),
        (["--in-flight", "-1"], "error: --in-flight must be a positive whole number of trials, not -1"),
        (["--trials", "two"], "--trials"),
    ],
)
def test_trials_and_in_flight_on_the_command_line_are_checked(tmp_path, data_dir, args, says):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    path = sweep_file(tmp_path, data_dir, "ck", trials=4)
    out = CliRunner().invoke(app, ["sweep", str(path), *args, "--no-mlflow", "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert out.exit_code == 2 and says in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "r.db").exists()

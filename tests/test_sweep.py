"""`orch sweep` for real: an Optuna study in the queue's database, trials trained by two real workers,
pruning through the trainer's STOP file, and a sweep command killed mid-way and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from orchestrator import queries, queue
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

    plots = orch("sweep", "plot", "sw", "--out", str(tmp_path / "plots")).stdout
    assert "history.png" in plots and "contour.png" in plots and (tmp_path / "plots" / "index.html").exists()

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


def test_pruning_stops_hopeless_trials_early(tmp_path, data_dir, workers):
    orch = workers(1, mlflow=False)
    # Evaluated in this order, one at a time: two sensible learning rates set the median, then two that
    # barely move the weights trail it at the first evaluations and are stopped.
    start = [{"optim.lr": 3e-3}, {"optim.lr": 2e-3}, {"optim.lr": 1e-6}, {"optim.lr": 2e-6}]
    path = sweep_file(
        tmp_path,
        data_dir,
        "pr",
        trials=4,
        in_flight=1,
        steps=60,
        sampler="random",
        space='{"optim.lr": LogUniform(low=1e-6, high=1e-2)}',
        start_with=start,
    )
    orch("sweep", str(path), "--poll", "0.2", "--no-mlflow", timeout=600)
    info = status(orch, "pr")
    states = {t["number"]: t["state"] for t in info["trials"]}
    assert states[0] == states[1] == "complete"
    assert states[2] == states[3] == "pruned"
    eng = connect(orch.db)
    for t in info["trials"][2:]:
        [run] = queries.find(eng, t["runs"][0])
        assert run.state == "pruned" and run.result["status"] == "pruned"
        assert run.result["step"] < 60  # stopped early, checkpointed
    assert info["best"]["number"] in (0, 1)


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
    time.sleep(2)
    assert standby.poll() is None
    os.kill(driver.pid, signal.SIGKILL)  # ... then the sweep command, and one of the two workers, die at once
    os.kill(workers.procs[0].pid, signal.SIGKILL)
    driver.wait()
    workers.procs[0].wait()
    out, _ = standby.communicate(timeout=600)  # the standby takes over and finishes the budget
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
    from orchestrator import specs
    from orchestrator.sweep import Driver

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    sweep = specs.Sweep(name="sw", base={"run.steps": 4}, seeds=2)
    driver = Driver(eng, sweep, echo=lambda *_: None)
    runs = specs.trial_runs(sweep, driver.base, {"optim.lr": 1e-3, "optim.weight_decay": 0.1}, "trial-0")
    queue.submit(eng, driver.experiment, runs)
    queue.submit(eng, specs.Experiment(name="other", include_baseline=False), runs[:1])  # shares seed 0
    queue.claim(eng, "w", 2)
    driver._stop(queries.find(eng, runs[0].id) + queries.find(eng, runs[1].id), "trial-0")
    assert queue.heartbeat(eng, "w", {runs[0].id: {}, runs[1].id: {}}).owned == {runs[0].id: None, runs[1].id: "pruned"}
    queue.requeue_stale(eng, -1)  # both back in the queue: the shared one stays, the trial's own is cancelled
    driver._stop(queries.find(eng, runs[0].id) + queries.find(eng, runs[1].id), "trial-0")
    assert [queries.find(eng, r.id)[0].state for r in runs] == [RunState.QUEUED, RunState.CANCELLED]


def test_a_pruned_trial_is_told_once_its_own_runs_stop_and_same_parameter_trials_share_runs(tmp_path):
    import optuna

    from orchestrator import specs
    from orchestrator import sweep as sw
    from orchestrator.sweep import Driver

    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    sweep = specs.Sweep(name="sw", base={"run.steps": 4}, seeds=2)
    driver = Driver(eng, sweep, echo=lambda *_: None)
    driver.ask()
    [frozen] = driver.study.get_trials(deepcopy=False)
    ids = frozen.user_attrs[sw.RUNS_ATTR]
    # A later trial that drew the same parameters shares both runs, under another arm of the same experiment.
    again = specs.trial_runs(sweep, driver.base, frozen.params, "trial-9")
    queue.submit(eng, driver.experiment, again)
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

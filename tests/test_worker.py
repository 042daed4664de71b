"""End to end: orch submit → orch worker (real torchrun trainers) → MLflow → orch table, and the failure
modes a user meets: a worker SIGKILLed mid-run, a worker stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from orchestrator import queries, queue
from orchestrator.db import connect
from tests.conftest import FAST, results_db, subprocess_env
from tests.servers import MlflowServer

ORCH = [sys.executable, "-m", "orchestrator.cli"]


def write_experiment(tmp_path: Path, data_dir: Path, name: str, interventions: str, steps: int = 12, seeds: int = 1):
    base = {**FAST, "data.path": str(data_dir), "run.steps": steps}
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from orchestrator.specs import Experiment, Intervention\n"
        f"experiment = Experiment(name={name!r}, preset='tiny', base={base!r}, seeds={seeds},\n"
        f"    interventions=[{interventions}])\n"
    )
    return path


class Orch:
    """Runs the CLI against one database, MLflow store and runs folder."""

    def __init__(self, tmp_path: Path):
        self.db = results_db(tmp_path)
        self.mlflow = f"sqlite:///{tmp_path / 'mlflow.db'}"
        self.runs = tmp_path / "runs"
        self.cwd = tmp_path
        self.env = subprocess_env()

    def args(self, *args: str) -> list[str]:
        cmd = [*ORCH, *args, "--db", self.db]
        if args[0] in ("worker",):
            cmd += ["--mlflow", self.mlflow, "--runs-dir", str(self.runs)]
        return cmd

    def __call__(self, *args: str, code: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run(
            self.args(*args), cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == code, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.args(*args), cwd=self.cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )


def wait_until(predicate, timeout: float = 120, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(run_dir: Path) -> list[int]:
    from trainer.rundir import read_metrics

    return [e["step"] for e in read_metrics(run_dir) if "loss" in e]


def test_submit_worker_table_and_mlflow(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "e2e", "Intervention(name='no-dropout', set={'model.dropout': 0.0})")
    out = orch("submit", str(exp))
    assert "2 queued, 0 reused" in out.stdout
    assert "0 queued, 2 reused" in orch("submit", str(exp)).stdout
    orch("worker", "--until-empty", "--heartbeat", "0.5")
    eng = connect(orch.db)
    assert queries.counts(eng) == {"succeeded": 2}
    runs = [r for _, _, r in queries.runs_of(eng, ["e2e"])]
    for r in runs:
        result = json.loads((orch.runs / r.id / "result.json").read_text())
        assert r.test_loss == result["test_loss"] and r.mlflow_run_id and r.attempts == 1

    table = json.loads(orch("table", "e2e", "--format", "json").stdout)[0]
    assert [row["arm"] for row in table["rows"]] == sorted(
        ["baseline", "no-dropout"], key=lambda a: next(r.test_loss for e, arm, r in queries.runs_of(eng) if arm == a)
    )
    base = next(row for row in table["rows"] if row["arm"] == "baseline")
    other = next(row for row in table["rows"] if row["arm"] == "no-dropout")
    assert other["improvement"] == pytest.approx(base["mean"] - other["mean"])
    md = orch("table", "e2e", "--format", "markdown").stdout
    assert "| baseline |" in md and "| no-dropout |" in md

    # Read the runs back through a real MLflow tracking server's REST API.
    server = MlflowServer(orch.mlflow, tmp_path / "mlartifacts").start()
    try:

        def get(path, **params):
            with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}") as f:
                return json.loads(f.read())

        exp_id = get("experiments/get-by-name", experiment_name="e2e")["experiment"]["experiment_id"]
        req = urllib.request.Request(
            f"{server.url}/api/2.0/mlflow/runs/search",
            method="POST",
            data=json.dumps({"experiment_ids": [exp_id]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        found = json.loads(urllib.request.urlopen(req).read())["runs"]
        assert len(found) == 2
        for run in found:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert tags["orch.intervention"] in ("baseline", "no-dropout") and tags["orch.seed"] == "42"
            assert params["model.dropout"] in ("0.0", "0.1") and run["info"]["status"] == "FINISHED"
            history = get("metrics/get-history", run_id=run["info"]["run_id"], metric_key="loss")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, 13))
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"loss", "lr", "grad_norm", "test_loss"} <= metrics
            assert not [k for k in metrics if k.startswith("final.")]  # the test loss once, no one-point copies
    finally:
        server.stop()


def test_killed_worker_run_is_finished_by_another_with_nothing_lost(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "kill", "", steps=24)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    first = orch.start("worker", "--heartbeat", "0.5", "--grace", "3")
    run_dir = orch.runs / run.id
    wait_until(lambda: run_dir.exists() and max(logged_steps(run_dir), default=0) >= 10, what="step 10")
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    # The kernel tells the orphaned trainer that its worker is gone: it checkpoints and exits.
    wait_until(lambda: (run_dir / "result.json").exists(), what="the orphan's preempted result")
    orphan = json.loads((run_dir / "result.json").read_text())
    assert orphan["status"] == "preempted" and orphan["launch_id"] == f"{run.id}.1" and orphan["exit_code"] == 75
    second = orch("worker", "--until-empty", "--heartbeat", "0.5", "--grace", "3")
    assert f"requeued {run.id}" in second.stdout
    assert f"{run.id}: launch 1, whose worker died, ended preempted" in second.stdout
    [done] = queries.find(eng, run.id)
    # The worker's death cost no attempt: its trainer had checkpointed, and a preemption is free.
    assert done.state == "succeeded" and done.attempts == 1 and done.launches == 2 and done.exit_code == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["launches"] == 2 and result["step"] == 24
    assert logged_steps(run_dir) == list(range(1, 25))  # every step once, after resume semantics

    from mlflow.tracking import MlflowClient

    history = MlflowClient(orch.mlflow).get_metric_history(done.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))  # none lost, none twice


def test_sigterm_checkpoints_and_requeues(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "term", "", steps=400)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    w = orch.start("worker", "--heartbeat", "0.5", "--no-mlflow")
    run_dir = orch.runs / run.id
    wait_until(lambda: run_dir.exists() and max(logged_steps(run_dir), default=0) >= 3, what="step 3")
    w.send_signal(signal.SIGTERM)
    out, _ = w.communicate(timeout=120)
    assert w.returncode == 0, out
    [r] = queries.find(eng, run.id)
    assert r.state == "queued" and r.attempts == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "preempted"
    assert (run_dir / "checkpoints" / f"step_{result['step']:08d}.pt").exists()


def test_cancel_and_retry_from_the_cli(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "cx", "Intervention(name='bias', set={'model.qkv_bias': True})")
    orch("submit", str(exp))
    assert "cancelled 2 run(s)" in orch("cancel", "cx").stdout
    eng = connect(orch.db)
    ids = [r.id for _, _, r in queries.runs_of(eng)]
    assert "requeued" in orch("retry", ids[0][:8]).stdout
    assert queries.counts(eng) == {"cancelled": 1, "queued": 1}
    assert "error:" in orch("retry", "zzzz", code=2).stderr
    ls = orch("ls").stdout
    assert ids[0] in ls and "cancelled" in ls
    # Another experiment's runs are not cancelled with this one unless asked: here both share the baseline.
    other = write_experiment(tmp_path, data_dir, "cy", "Intervention(name='tied', set={'model.tie_weights': True})")
    orch("submit", str(other))
    [base] = [r for _, arm, r in queries.runs_of(eng, ["cy"]) if arm == "baseline"]
    queue.retry(eng, [base.id])
    out = orch("cancel", "cy").stdout
    assert "cancelled 1 run(s)" in out and "kept 1 run(s) that cx also use(s)" in out and "--include-shared" in out
    assert queries.find(eng, base.id)[0].state == "queued"
    assert "cancelled 1 run(s)" in orch("cancel", "cy", "--include-shared").stdout


def test_read_commands_never_create_a_database(tmp_path):
    orch = Orch(tmp_path)
    for cmd in (("table",), ("ls",), ("status",)):
        out = orch(*cmd, code=2)
        # SQLite: no file; PostgreSQL (ORCH_TEST_DB): a server with no orch tables. Neither is created.
        assert "no database at" in out.stderr or "holds no orch database yet" in out.stderr, out.stderr
        assert "orch submit" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "results.db").exists()


def test_table_names_unknown_experiments(tmp_path, data_dir):
    orch = Orch(tmp_path)
    orch("submit", str(write_experiment(tmp_path, data_dir, "known", "")))
    out = orch("table", "unknwn", code=2)
    assert "no experiment named 'unknwn'; known: known" in out.stderr


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_failures_keep_the_error_and_are_retried_only_when_a_retry_can_help(tmp_path, data_dir):
    orch = Orch(tmp_path)
    # Missing data: the trainer says so in result.json and the worker does not retry it.
    missing = write_experiment(tmp_path, tmp_path / "no-such-data", "nodata", "")
    orch("submit", str(missing), "--no-check-data")  # the submit-time check would refuse it (test_bad_input)
    orch("worker", "--until-empty", "--no-mlflow", "--heartbeat", "0.5")
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng, ["nodata"])
    assert run.state == "failed" and run.attempts == 1
    assert "does not exist" in run.error and "trainer.prepare" in run.error
    logs = orch("logs", run.id[:8]).stdout
    assert "last error" in logs and "does not exist" in logs
    # A crash leaves no result.json and is retried up to max_attempts: a vocabulary of 100 makes the
    # embedding lookup of GPT-2 token ids fail inside the training step.
    crash = write_experiment(tmp_path, data_dir, "crash", "")
    text = crash.read_text().replace("'run.steps': 12", "'run.steps': 12, 'model.vocab_size': 100")
    crash.write_text(text)
    orch("submit", str(crash))
    orch("worker", "--until-empty", "--no-mlflow", "--heartbeat", "0.5")
    [(_, _, run)] = queries.runs_of(eng, ["crash"])
    assert run.state == "failed" and run.attempts == 3 and run.exit_code != 0
    assert "IndexError" in run.error or "index out of range" in run.error


def test_gpu_slots_split_the_listed_gpus():
    from orchestrator.node import plan_slots

    slots = plan_slots(["0", "1", "2", "3"], 2, 1)
    assert [s.gpus for s in slots] == [["0", "1"], ["2", "3"]]
    assert [s.gpus for s in plan_slots(["4", "5"], 1, 1)] == [["4"], ["5"]]
    assert [s.gpus for s in plan_slots([], 1, 3)] == [None, None, None]  # CPU slots
    with pytest.raises(ValueError, match="not a multiple of --gpus-per-run 2"):
        plan_slots(["0", "1", "2"], 2, 1)

"""Faults the issue-8 campaign found, each reproduced against the real parts: one trainer per run directory
whatever dies, tracking that survives an MLflow outage, a takeover that is not a cancellation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator import queries
from orchestrator.db import connect
from tests.conftest import REPO, start_trainer, subprocess_env, trainer_cmd, wait_for_step
from tests.servers import MlflowServer, free_port
from tests.test_worker import Orch, logged_steps, wait_until, write_experiment
from trainer import runlock


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has died: only its parent has not read its status yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


def steps_once(run_dir: Path, total: int) -> None:
    """Every training step in metrics.jsonl exactly once after resume supersession, and no step going
    backwards without a resume event (the mark of two trainers writing one file)."""
    assert logged_steps(run_dir) == list(range(1, total + 1))
    last = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("event") == "resume":
            last = e["step"]
        elif "loss" in e:
            assert e["step"] > last, f"step {e['step']} after {last} without a resume: two writers"
            last = e["step"]


def test_a_second_trainer_on_a_busy_run_directory_is_refused_by_hand(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    first = start_trainer(run_dir, data_dir, {"run.steps": 400})
    try:
        wait_for_step(run_dir, first, 2)
        second = subprocess.run(
            trainer_cmd(run_dir, data_dir, {"run.steps": 400}),
            cwd=REPO,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and f"is being trained by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and first.poll() is None  # the holder trains on, untouched
        assert runlock.holder(run_dir)["pid"] == first.pid
    finally:
        first.kill()
        first.wait()
    assert runlock.holder(run_dir) is None  # a dead holder keeps nothing


def test_a_relaunch_waits_for_the_previous_trainer_and_resumes_after_it(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    first = start_trainer(run_dir, data_dir, {"run.steps": 40})
    wait_for_step(run_dir, first, 3)
    env = dict(subprocess_env(), ORCH_LAUNCH_ID="x.2")  # a launcher's relaunch: it may wait, and stop the old one
    second = subprocess.run(
        trainer_cmd(run_dir, data_dir, {"run.steps": 40}),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    first.communicate(timeout=60)
    assert first.returncode == 75  # told to stop: it checkpointed, ended preempted
    assert second.returncode == 0, second.stderr
    assert f"waiting for pid {first.pid}" in second.stdout
    steps_once(run_dir, 40)
    assert json.loads((run_dir / "result.json").read_text())["launch_id"] == "x.2"


@pytest.mark.slow  # 28-36 s on 2 cores; .ci/run runs it, on SQLite and PostgreSQL
def test_killed_torchrun_agent_leaves_no_second_trainer_and_costs_no_attempt(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "agent", "", steps=60)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    w = orch.start("worker", "--nproc-per-node", "2", "--heartbeat", "0.5", "--no-mlflow", "--until-empty")
    run_dir = orch.runs / run.id
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= 5, what="step 5")
    # The worker's child is the exec'd agent; the agent's children are the two ranks.
    [agent] = children(w.pid)
    ranks = children(agent)
    assert len(ranks) == 2
    os.kill(agent, signal.SIGKILL)
    out, _ = w.communicate(timeout=300)
    assert w.returncode == 0, out
    # The kernel stopped the orphaned ranks (parent-death signal): they checkpointed and ended preempted
    # before the worker launched the run again; nothing was counted as a crash.
    assert not any(alive(p) for p in ranks)
    [done] = queries.find(eng, run.id)
    assert done.state == "succeeded" and done.attempts == 1 and done.launches == 2, out
    assert f"{run.id} preempted (exit 75)" in out, out
    steps_once(run_dir, 60)


def test_a_killed_worker_takes_its_trainer_with_it(tmp_path, data_dir):
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "pdeath", "", steps=400)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    orch.env.update(ORCH_DB=orch.db, PGPASSWORD="s3cret", MLFLOW_TRACKING_TOKEN="t0ken")
    w = orch.start("worker", "--heartbeat", "0.5", "--no-mlflow")
    run_dir = orch.runs / run.id
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, what="step 2")
    [trainer] = children(w.pid)
    # Credentials stay with the worker: the trainer needs no database or tracking server.
    environ = Path(f"/proc/{trainer}/environ").read_bytes()
    assert b"s3cret" not in environ and b"t0ken" not in environ and b"ORCH_DB=" not in environ
    assert f"ORCH_LAUNCH_ID={run.id}.1".encode() in environ
    os.kill(w.pid, signal.SIGKILL)
    w.wait()
    wait_until(lambda: not alive(trainer), timeout=60, what="the orphan to stop")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "preempted" and result["step"] < 400
    assert runlock.holder(run_dir) is None


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_tracking_survives_an_mlflow_outage(tmp_path, data_dir):
    """The server is down when the run starts and when it ends: everything arrives once it is back."""
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "outage", "", steps=30)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    port = free_port()
    store = f"sqlite:///{tmp_path / 'mlflow-server.db'}"
    url = f"http://127.0.0.1:{port}"
    env = dict(orch.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    worker = subprocess.run(
        [*orch.args("worker", "--until-empty", "--heartbeat", "0.5"), "--mlflow", url],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 0, worker.stdout + worker.stderr
    assert "tracking paused" in worker.stdout and "kept for the next worker or `orch sync`" in worker.stdout
    [r] = queries.find(eng, run.id)
    assert r.state == "succeeded" and r.mlflow_run_id is None and r.tracked is None  # nothing was lost, only late

    server = MlflowServer(store, tmp_path / "mlartifacts")
    server.port, server.url = port, url
    server.cmd[server.cmd.index("--port") + 1] = str(port)
    server.start()
    try:
        env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "60"  # a fresh server on a busy 2-core machine answers slowly at first
        synced = subprocess.run(
            [*orch.args("sync"), "--mlflow", url, "--runs-dir", str(orch.runs)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert synced.returncode == 0 and "synced 1 run(s)" in synced.stdout, synced.stdout + synced.stderr
        again = subprocess.run(
            [*orch.args("sync"), "--mlflow", url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert "synced 0 run(s)" in again.stdout  # idempotent: nothing is sent twice

        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        [r] = queries.find(eng, run.id)
        mlrun = client.get_run(r.mlflow_run_id)
        assert mlrun.info.status == "FINISHED" and r.tracked == "succeeded"
        assert sorted(m.step for m in client.get_metric_history(r.mlflow_run_id, "loss")) == list(range(1, 31))
        assert mlrun.data.metrics["test_loss"] == r.test_loss
        assert {a.path for a in client.list_artifacts(r.mlflow_run_id)} >= {"config.json", "result.json", "train.log"}
    finally:
        server.stop()


@pytest.mark.slow  # 28-36 s on 2 cores; .ci/run runs it, on SQLite and PostgreSQL
def test_a_takeover_is_not_a_cancellation_and_only_the_owner_closes_mlflow(tmp_path, data_dir):
    """Worker A freezes (as if its database were unreachable) longer than --grace; B takes the run over,
    stops A's still-running trainer, resumes it and finishes it. A, thawed, learns it was taken over and
    leaves the MLflow run to B."""
    orch = Orch(tmp_path)
    exp = write_experiment(tmp_path, data_dir, "takeover", "", steps=60)
    orch("submit", str(exp))
    eng = connect(orch.db)
    [(_, _, run)] = queries.runs_of(eng)
    a = orch.start("worker", "--heartbeat", "0.5", "--grace", "3", "--until-empty")
    run_dir = orch.runs / run.id
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= 3, what="step 3")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b = orch.start("worker", "--heartbeat", "0.5", "--grace", "3", "--until-empty")
        wait_until(lambda: queries.find(eng, run.id)[0].launches == 2, what="B's claim")
        wait_until(lambda: (runlock.holder(run_dir) or {}).get("launch") == f"{run.id}.2", what="B's trainer")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out_b, _ = b.communicate(timeout=300)
    out_a, _ = a.communicate(timeout=300)
    assert b.returncode == 0 and a.returncode == 0, out_a + out_b
    assert "taken over" in out_a and "cancelled" not in out_a, out_a
    [done] = queries.find(eng, run.id)
    assert done.state == "succeeded" and done.attempts == 1, out_b  # A's launch ended preempted: free

    from mlflow.tracking import MlflowClient

    client = MlflowClient(orch.mlflow)
    assert client.get_run(done.mlflow_run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(done.mlflow_run_id, "loss")) == list(range(1, 61))
    assert len(client.search_runs([client.get_experiment_by_name("takeover").experiment_id])) == 1
    steps_once(run_dir, 60)


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_a_full_disk_costs_no_attempt_and_the_run_finishes_once_space_is_free(tmp_path, data_dir):
    mount = tmp_path / "runs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    try:
        orch = Orch(tmp_path)
        exp = write_experiment(tmp_path, data_dir, "full", "", steps=80)
        orch("submit", str(exp))
        eng = connect(orch.db)
        [(_, _, run)] = queries.runs_of(eng)
        w = orch.start("worker", "--heartbeat", "0.5", "--no-mlflow", "--until-empty")
        run_dir = orch.runs / run.id
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 5, what="step 5")
        junk = mount / "junk"
        with open(junk, "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        wait_until(
            lambda: queries.find(eng, run.id)[0].launches >= 2 or not alive(w.pid),
            timeout=120,
            what="the run handed back",
        )
        junk.unlink()
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0, out
        [done] = queries.find(eng, run.id)
        assert "no space left under" in out and done.state == "succeeded" and done.attempts == 1, out
        assert "Traceback" not in (run_dir / "train.log").read_text()
        steps_once(run_dir, 80)
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_the_stored_error_is_the_trainers_not_torchruns_report(tmp_path):
    """A failed rank under torchrun: the error kept for `orch logs` ends with the child's own message; the
    agent's traceback and summary box (~25 lines) are cut."""
    from orchestrator.worker import LOG, clean_tail
    from tests.conftest import PYTHON

    log = tmp_path / LOG
    log.write_text("=== attempt 1 (launch x.1) on an earlier worker\nold noise\n=== attempt 2 (launch x.2) on w\n")
    with open(log, "a") as f:  # a real torchrun whose one child fails with a one-line error
        subprocess.run(
            [
                PYTHON,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=1",
                "-m",
                "json.tool",
                str(tmp_path / "missing.json"),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            timeout=120,
        )
    raw = log.read_text()
    assert "ChildFailedError" in raw and "Root Cause" in raw
    kept = clean_tail(log)
    assert kept.splitlines()[0].startswith("=== attempt 2") and "old noise" not in kept
    assert kept.splitlines()[-1].startswith("python -m json.tool: error:") and "ChildFailedError" not in kept

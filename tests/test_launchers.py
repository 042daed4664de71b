"""The worker's parts on their own: the local launcher (environment, command, log, stop and kill), the
metrics tail with its resume handling, and the progress record a heartbeat writes. The worker's loop over
them is tested end to end in test_worker.py and test_faults.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.db import Run
from orchestrator.launchers import LOG, SECRET_ENV, Slot, clean_tail, local, trainer_env
from orchestrator.launchers.local import LocalHandle, LocalLauncher
from orchestrator.progress import Progress
from orchestrator.tail import MetricsTail
from tests.conftest import REPO, subprocess_env


def test_the_worker_imports_no_torch():
    """`orch worker` starts in well under a second and needs no GPU stack: only its trainers import torch."""
    code = (
        "import sys, orchestrator.worker, orchestrator.launchers.local, orchestrator.tail; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


class Captured:
    """Stands in for subprocess.Popen: what the launcher would have started."""

    def __init__(self, cmd, *, stdout, env, **kw):
        self.cmd, self.env, self.kw, self.pid = cmd, env, kw, 4242
        stdout.write(b"the trainer's output\n")


@pytest.fixture
def captured(monkeypatch):
    monkeypatch.setattr(local.subprocess, "Popen", Captured)


def a_run(attempts: int = 1) -> Run:
    return Run(id="abc", launches=2, attempts=attempts, config={})


def test_a_gpu_slot_runs_torchrun_with_one_rank_per_gpu(tmp_path, captured, monkeypatch):
    monkeypatch.setenv("ORCH_DB", "postgresql://u:pw@db/orch")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    env = trainer_env("abc.2", "c0ffee")
    assert not set(SECRET_ENV) & set(env) and env["ORCH_LAUNCH_ID"] == "abc.2" and env["ORCH_GIT_COMMIT"] == "c0ffee"
    handle = LocalLauncher("w1", cpu_slots=4).launch(a_run(), Slot(0, ["2", "3"]), tmp_path, env)
    proc = handle.proc
    assert proc.env["CUDA_VISIBLE_DEVICES"] == "2,3" and "ORCH_DB" not in proc.env
    assert proc.cmd[proc.cmd.index("torch.distributed.run") + 2] == "--nproc_per_node=2"
    assert proc.cmd[1:5] == ["-m", "trainer.runlock", "--signal", "KILL"]  # the agent dies with the worker
    assert proc.kw["start_new_session"] and handle.describe() == "pid 4242" and handle.pid == 4242


def test_a_cpu_slot_shares_the_cores_and_logs_each_launch_after_a_header(tmp_path, captured, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    launcher = LocalLauncher("w1", nproc_per_node=1, cpu_slots=2)
    first = launcher.launch(a_run(1), Slot(1, None), tmp_path, trainer_env("abc.1", None)).proc
    assert first.env["CUDA_VISIBLE_DEVICES"] == "" and first.env["OMP_NUM_THREADS"] == "4"
    assert first.cmd == [
        sys.executable,
        "-m",
        "trainer",
        "--config",
        str(tmp_path / "config.json"),
        "--run-dir",
        str(tmp_path),
    ]  # one process: no agent
    assert "ORCH_GIT_COMMIT" not in first.env and first.env["ORCH_WORKER_PID"].isdigit()
    launcher.launch(a_run(2), Slot(1, None), tmp_path, trainer_env("abc.2", None))
    log = (tmp_path / LOG).read_text()
    assert log.count("the trainer's output") == 2 and "=== attempt 1 (launch abc.2) on w1: " in log
    tail = clean_tail(tmp_path / LOG)
    assert tail.splitlines()[0].startswith("=== attempt 2") and tail.count("the trainer's output") == 1


def test_a_local_handle_stops_and_kills_its_whole_process_group():
    def group() -> LocalHandle:  # a shell and its child, in a session of their own like a launch
        return LocalHandle(subprocess.Popen(["sh", "-c", "sleep 60 & wait"], start_new_session=True))

    stopped, killed = group(), group()
    assert stopped.poll() is None
    stopped.stop()
    killed.kill()
    assert stopped.proc.wait(10) == -signal.SIGTERM and killed.proc.wait(10) == -signal.SIGKILL
    assert stopped.poll() == -signal.SIGTERM  # the same code on every later call
    stopped.stop()  # gone already: nothing to signal, no error
    killed.kill()


def append(path: Path, *lines: dict | str) -> None:
    with open(path, "a") as f:
        f.write("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def test_the_tail_reads_what_is_new_and_drops_what_a_resume_supersedes(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    tail, progress = MetricsTail(tmp_path), Progress(run_dir=str(tmp_path), total_steps=30)
    assert tail.read_into(progress).line() == "starting"  # no file yet
    append(
        metrics,
        {"step": 10, "loss": 3.0, "tokens_per_s": 100.0},
        {"step": 10, "val_loss": 3.1},
        {"step": 20, "loss": 2.5},
        {"step": 20, "val_loss": 2.6},
        '{"step": 21, "lo',
    )
    tail.read_into(progress)
    assert (progress.step, progress.train_loss, progress.tokens_per_s) == (20, 2.5, None)
    assert progress.val_curve == [[10, 3.1], [20, 2.6]]
    assert tail.offset == len(metrics.read_bytes()) - len('{"step": 21, "lo')  # a line being written waits
    # The first attempt died after its step-20 evaluation but before a checkpoint there: the relaunch
    # resumes from step 10, and the step-20 point of the lost attempt leaves the curve.
    append(
        metrics,
        'ss": 2.4}\n',
        "a damaged line\n",
        {"event": "resume", "step": 10},
        {"step": 20, "val_loss": 2.7},
        {"step": 30, "test_loss": 2.0},
    )
    tail.read_into(progress)
    assert (progress.step, progress.train_loss) == (21, 2.4)
    assert progress.val_curve == [[10, 3.1], [20, 2.7]]  # the test loss is no point of the curve
    assert tail.read() == [] and tail.offset == len(metrics.read_bytes())


def test_a_heartbeat_writes_only_columns_of_the_runs_table():
    progress = Progress(run_dir="runs/abc", total_steps=30)
    assert progress.columns() == {"run_dir": "runs/abc", "total_steps": 30, "val_curve": []}  # no step yet
    progress.step, progress.train_loss, progress.val_curve = 5, 2.0, [[5, 2.1]]
    columns = progress.columns()
    assert set(columns) <= set(Run.__table__.columns.keys()) and {"step", "train_loss", "tokens_per_s"} <= set(columns)

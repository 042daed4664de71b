"""Warm spares (orchestrator/launchers/spare.py, trainer/spare.py) against the real parts: a run handed to a
spare ends exactly as its cold launch does, failures included; a dead or unfit spare falls back to a cold
launch; spares die with their worker and hold no run; a worker hands its next run to the slot's spare and
MLflow gets each launch's time to first step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator import queries
from orchestrator.db import Run, connect
from orchestrator.launchers import LOG, Slot
from orchestrator.launchers.local import LocalHandle
from orchestrator.launchers.spare import Due, Spare, SpareLauncher, WarmHandle, setting
from orchestrator.node import compile_caches
from tests.conftest import FAST, PYTHON, read_result, subprocess_env, tiny_config, train_losses
from tests.test_faults import alive, children
from tests.test_worker import Orch, logged_steps, wait_until
from trainer import runlock
from trainer.rundir import write_json
from trainer.spare import LAUNCHED_AT

SLOT = Slot(0, None)
# What a run's result must share with its cold twin: everything but timings, the launch and its kind.
SAME = ("status", "step", "tokens", "test_loss", "val_loss", "train_loss", "params", "exit_code", "error")


# conftest's FAST runs without the closing samples (seconds of generation on this CPU, nothing to compare).
QUICK = {**FAST, "sample.prompts": []}


def fast() -> dict:
    """QUICK as tiny_config's keywords."""
    return {k.replace(".", "__"): v for k, v in QUICK.items()}


def experiment(tmp_path: Path, data_dir: Path, name: str, steps: int, seeds: int = 1) -> Path:
    base = {**QUICK, "data.path": str(data_dir), "run.steps": steps}
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from orchestrator.specs import Experiment\n"
        f"experiment = Experiment(name={name!r}, preset='tiny', base={base!r}, seeds={seeds})\n"
    )
    return path


def run_dir(tmp_path: Path, name: str, config) -> Path:
    d = tmp_path / name
    d.mkdir()
    write_json(d / "config.json", config.model_dump(mode="json") if hasattr(config, "model_dump") else config)
    return d


def env_for(launch_id: str) -> dict[str, str]:
    """What the worker gives a launch (trainer_env, as a test's subprocess environment)."""
    return {**subprocess_env(), "PYTHONUNBUFFERED": "1", "ORCH_LAUNCH_ID": launch_id, LAUNCHED_AT: str(time.time())}


def launch(launcher: SpareLauncher, tmp_path: Path, name: str, config) -> tuple[LocalHandle, Path]:
    d = run_dir(tmp_path, name, config)
    return launcher.launch(Run(id=name, launches=1, attempts=1, config={}), SLOT, d, env_for(f"{name}.1")), d


def finish(handle: LocalHandle, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while (code := handle.poll()) is None:
        assert time.monotonic() < deadline, f"{handle.describe()} still running after {timeout} s"
        time.sleep(0.05)
    return code


def wait_ready(launcher: SpareLauncher) -> None:
    """Tend the launcher, as a worker does every loop iteration, until the slot's spare has started and warmed."""

    def ready() -> bool:
        launcher.tend()
        return SLOT.index in launcher.spares and not launcher.warming(SLOT)

    wait_until(ready, timeout=180, what="the spare to start and warm up")
    assert launcher.spares[SLOT.index].ready(), launcher.spares[SLOT.index].state


def log_body(d: Path) -> list[str]:
    """train.log without timings (tokens/s, the sample's seconds) or the run's own directory."""
    text = re.sub(r"\(\d+(\.\d+)? s\)|[\d,]+(\.\d+)? tok/s", "(timing)", (d / LOG).read_text().replace(str(d), "RUN"))
    return text.splitlines()


@pytest.fixture
def launcher():
    messages: list[str] = []
    launcher = SpareLauncher("w1", warm="on", echo=messages.append)
    launcher.messages = messages
    yield launcher
    launcher.close()


def test_a_run_through_a_spare_ends_exactly_as_its_cold_launch(tmp_path, data_dir, launcher):
    config = tiny_config(data_dir, **{**fast(), "run__steps": 6})
    cold, cold_dir = launch(launcher, tmp_path, "cold", config)
    assert type(cold) is LocalHandle and cold.describe() == f"pid {cold.pid}"
    assert finish(cold) == 0
    wait_ready(launcher)
    spare = launcher.spares[SLOT.index].proc
    warm, warm_dir = launch(launcher, tmp_path, "warm", config)
    assert isinstance(warm, WarmHandle) and warm.pid == spare.pid and "(warm spare)" in warm.describe()
    assert finish(warm) == 0

    a, b = read_result(cold_dir), read_result(warm_dir)
    assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME} and a["status"] == "succeeded"
    assert train_losses(cold_dir) == train_losses(warm_dir)  # bit for bit: the same numbers in the same order
    assert (a["warm_start"], b["warm_start"]) == (False, True)
    assert (a["launch_id"], b["launch_id"]) == ("cold.1", "warm.1")
    assert 0 < b["time_to_first_step_s"] and 0 < a["time_to_first_step_s"]
    # The log: the launch's header first, then what the trainer printed, as a cold launch has it.
    assert log_body(cold_dir)[2:] == log_body(warm_dir)[2:]
    assert log_body(warm_dir)[:2] == ["", log_body(cold_dir)[1].replace("cold.1", "warm.1")]
    # A new spare waits for the next run (started once the run logged); close() ends it (a worker returning).
    launcher.tend()
    successor = launcher.spares[SLOT.index].proc
    assert successor.pid != spare.pid and successor.poll() is None
    launcher.close()
    assert successor.poll() is not None and not launcher.spares


def test_the_next_spare_starts_only_once_the_run_has_logged_past_its_set_up(tmp_path, data_dir, launcher):
    """A spare warming up beside a run's micro-batch search would take GPU memory that the search measures:
    the slot's next spare waits for the run's first metrics line since its launch (a resumed run's file
    already has lines); a run that ends before leaves its slot's next launch cold."""
    config = tiny_config(data_dir, **{**fast(), "run__steps": 400, "run__log_interval": 3})
    handle, d = launch(launcher, tmp_path, "long", config)
    try:
        launcher.tend()  # the trainer is still starting: nothing logged yet
        assert not launcher.spares and launcher.due[SLOT.index].metrics == d / "metrics.jsonl"
        wait_until(lambda: max(logged_steps(d), default=0) >= 3, timeout=180, what="step 3")
        assert not launcher.spares  # the launcher starts spares only when tended
        launcher.tend()
        assert launcher.spares[SLOT.index].state in ("warming", "ready") and not launcher.due
    finally:
        handle.kill()
    # A resumed run's metrics.jsonl holds its earlier launches' lines: only a line appended since counts.
    earlier = Due({}, handle, d / "metrics.jsonl", (d / "metrics.jsonl").stat().st_size)
    assert not earlier.logged()
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"event": "resume", "step": 3}\n')
    assert earlier.logged()
    # A run that ends before it logs (a config error): no spare for it, the slot's next launch is cold.
    launcher.close()
    broken = tiny_config(data_dir, **fast()).model_dump(mode="json")
    broken["data"]["path"] = str(tmp_path / "no-such-data")
    cold, cold_dir = launch(launcher, tmp_path, "broken", broken)
    launcher.tend()
    assert not launcher.spares and launcher.due[SLOT.index].metrics == cold_dir / "metrics.jsonl"
    assert type(cold) is LocalHandle and finish(cold) == 2 and not (cold_dir / "metrics.jsonl").exists()
    launcher.tend()
    assert not launcher.spares and not launcher.due


def test_a_spare_that_cannot_start_warns_and_the_worker_goes_on(tmp_path, monkeypatch):
    """Out of processes or descriptors when a spare is due (tend runs in the worker's loop): a warning and
    a failure counted against the slot, never an exception that would end the worker and its runs."""
    from orchestrator.launchers import spare as spares

    def no_process(env):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(spares, "Spare", no_process)
    messages: list[str] = []
    launcher = SpareLauncher("w1", warm="on", echo=messages.append)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')

    class Running:
        def poll(self):
            return None

    for attempt in range(1, spares.MAX_FAILURES + 1):
        launcher.due[SLOT.index] = Due({}, Running(), metrics, 0)
        launcher.tend()
        assert not launcher.spares and not launcher.due and launcher.failures[SLOT.index] == attempt
    assert messages[-1] == "warning: no warm spare for slot 0: [Errno 11] Resource temporarily unavailable"
    assert not launcher.wanted(SLOT)  # as after spares that died: the slot stops asking for them


def test_a_spare_fails_as_its_cold_launch_does(tmp_path, data_dir, launcher):
    """A config error (exit 2 and result.json) and a crash in the training step (a traceback, exit 1: the
    interpreter's report of an uncaught exception) come out of a spare as out of `python -m trainer`."""
    missing = tiny_config(data_dir, **fast()).model_dump(mode="json")
    missing["data"]["path"] = str(tmp_path / "no-such-data")
    crash = tiny_config(data_dir, model__vocab_size=100, **fast())
    good = tiny_config(data_dir, **{**fast(), "run__steps": 2})
    handles = {}
    for name, config in (("missing-cold", missing), ("missing-warm", missing), ("crash-warm", crash)):
        if name.endswith("warm"):  # a run failing in its set-up leaves no spare behind: one that logs first
            before, _ = launch(launcher, tmp_path, f"before-{name}", good)
            assert type(before) is LocalHandle
            wait_ready(launcher)
            assert finish(before) == 0
        handles[name] = launch(launcher, tmp_path, name, config)
        assert isinstance(handles[name][0], WarmHandle) == name.endswith("warm")
        assert finish(handles[name][0]) == (1 if name.startswith("crash") else 2)
    a, b = (read_result(handles[name][1]) for name in ("missing-cold", "missing-warm"))
    assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME} and "does not exist" in a["error"]
    crashed = handles["crash-warm"][1]
    log = (crashed / LOG).read_text()
    assert not (crashed / "result.json").exists() and "Traceback (most recent call last)" in log
    assert "IndexError" in log or "index out of range" in log


@pytest.mark.slow
def test_a_dead_or_unfit_spare_falls_back_to_a_cold_launch(tmp_path, data_dir, launcher):
    config = tiny_config(data_dir, **{**fast(), "run__steps": 2})
    first, _ = launch(launcher, tmp_path, "first", config)
    wait_ready(launcher)
    killed = launcher.spares[SLOT.index].proc
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=30)  # dead before the next launch looks (a dying one fails the handoff instead: also cold)
    assert finish(first) == 0
    second, second_dir = launch(launcher, tmp_path, "second", config)
    assert type(second) is LocalHandle and second.pid != killed.pid  # cold, and a fresh spare due
    assert any(f"pid {killed.pid}" in m and "exited with code -9: this run starts cold" in m for m in launcher.messages)
    assert finish(second) == 0 and read_result(second_dir)["warm_start"] is False
    # A spare started before the worker's environment changed would not be the run's cold launch: it declines.
    wait_ready(launcher)
    d = run_dir(tmp_path, "third", config)
    env = {**env_for("third.1"), "OMP_NUM_THREADS": "2"}
    third = launcher.launch(Run(id="third", launches=1, attempts=1, config={}), SLOT, d, env)
    assert type(third) is LocalHandle and finish(third) == 0
    assert any("did not take it (environment differs in OMP_NUM_THREADS)" in m for m in launcher.messages)


def test_a_spare_is_python_m_trainer_or_declines_or_reports_its_death(tmp_path):
    """Quick, at the process level: a spare runs the trainer's command line as `python -m trainer` does (the
    same output and exit code), declines a run whose environment it did not start with, and a killed one
    says so; every refusal leaves the run to a cold launch."""
    env = {**subprocess_env(), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    taking, declining, killed = Spare(env), Spare(env), Spare(env)
    try:
        os.kill(killed.proc.pid, signal.SIGKILL)
        wait_until(lambda: killed.broken(), what="the killed spare's state")
        assert killed.broken() == "exited with code -9" and not killed.ready()
        wait_until(lambda: taking.ready() and declining.ready(), timeout=180, what="two spares to warm up")
        argv = ["--preset", "tiny", "--run-dir", str(tmp_path / "never"), "--set", "optim.lr"]  # a user's typo
        cold = subprocess.run([PYTHON, "-m", "trainer", *argv], env=env, capture_output=True, text=True, timeout=120)
        assert cold.returncode == 2 and "error: --set expects key=value" in cold.stderr
        log = tmp_path / LOG
        assert taking.hand_off(argv, {**env, "ORCH_LAUNCH_ID": "x.1"}, "=== header\n", log) is None
        assert taking.proc.wait(timeout=60) == cold.returncode
        assert log.read_text() == "=== header\n" + cold.stdout + cold.stderr
        assert not (tmp_path / "never").exists()
        why = declining.hand_off(argv, {**env, "OMP_NUM_THREADS": "7"}, "=== header\n", log)
        assert why == "environment differs in OMP_NUM_THREADS" and declining.proc.poll() is not None
        assert log.read_text().count("=== header") == 1  # a declined run's log is left to its cold launch
    finally:
        for spare in (taking, declining, killed):
            spare.kill()


def test_the_setting_is_checked_and_gpu_slots_get_spares_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCH_WARM_SPARE", raising=False)
    auto = SpareLauncher("w1")
    assert auto.wanted(Slot(0, ["0"])) and not auto.wanted(Slot(0, None))  # a CPU slot's cores are its trainer's
    assert SpareLauncher("w1", warm="on").wanted(Slot(0, None)) and not SpareLauncher("w1", warm="off").wanted(
        Slot(0, ["0"])
    )
    monkeypatch.setenv("ORCH_WARM_SPARE", "sometimes")
    with pytest.raises(ValueError, match="ORCH_WARM_SPARE='sometimes': expected one of auto, on, off"):
        setting()
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)  # an earlier test's import of inductor in this process sets one
    caches = compile_caches(tmp_path / "runs")
    assert caches["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1" and Path(caches["TRITON_CACHE_DIR"]).is_absolute()
    assert caches["TORCHINDUCTOR_CACHE_DIR"].startswith(str((tmp_path / "runs" / ".compile-cache").absolute()))
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")  # the user's own cache wins
    assert "TRITON_CACHE_DIR" not in compile_caches(tmp_path / "runs")


@pytest.mark.slow
def test_a_worker_hands_its_next_run_to_the_spare_and_mlflow_gets_the_time_to_first_step(tmp_path, data_dir):
    orch = Orch(tmp_path)
    orch.env["ORCH_WARM_SPARE"] = "on"
    orch("submit", str(experiment(tmp_path, data_dir, "warm", steps=6, seeds=2)))
    out = orch("worker", "--until-empty", "--heartbeat", "0.5").stdout
    started = [line for line in out.splitlines() if line.startswith("started ")]
    assert len(started) == 2 and "(warm spare)" not in started[0] and "(warm spare)" in started[1], out
    eng = connect(orch.db)
    runs = {r.id: r for _, _, r in queries.runs_of(eng, ["warm"])}
    assert {r.state for r in runs.values()} == {"succeeded"}
    first, second = (started[i].split()[1] for i in (0, 1))
    assert read_result(orch.runs / first)["warm_start"] is False and read_result(orch.runs / second)["warm_start"]

    from mlflow.tracking import MlflowClient

    for run_id in (first, second):
        tags = MlflowClient(orch.mlflow).get_run(runs[run_id].mlflow_run_id).data.tags
        assert float(tags["result.time_to_first_step_s"]) == pytest.approx(
            read_result(orch.runs / run_id)["time_to_first_step_s"], rel=1e-5
        )


def test_a_spare_holds_no_run_and_dies_with_its_worker(tmp_path, data_dir):
    orch = Orch(tmp_path)
    orch.env["ORCH_WARM_SPARE"] = "on"
    orch("submit", str(experiment(tmp_path, data_dir, "pdeath", steps=400)))
    [(_, _, run)] = queries.runs_of(connect(orch.db))
    w = orch.start("worker", "--heartbeat", "0.5", "--no-mlflow")
    run_dir = orch.runs / run.id
    try:
        wait_until(lambda: max(logged_steps(run_dir), default=0) >= 2, what="step 2")
        wait_until(lambda: len(children(w.pid)) == 2, what="the spare")
        cmdlines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in children(w.pid)}
        [spare] = [p for p, cmd in cmdlines.items() if b"trainer.spare" in cmd]
        [trainer] = [p for p in cmdlines if p != spare]
        assert runlock.holder(run_dir)["pid"] == trainer  # the run's trainer holds its directory, never a spare
    finally:
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
    wait_until(lambda: not alive(spare) and not alive(trainer), timeout=60, what="the spare and trainer to die")
    assert json.loads((run_dir / "result.json").read_text())["status"] == "preempted"

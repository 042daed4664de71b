"""`orch ui` as a user meets it: the server it starts (one light process tree, no job runner), and the page
it prints, rendered by a real headless browser (Debian's chromium) — the experiment's runs in model-training
mode and orch's saved view: the run names, each run's changes and test loss in the table, sorted by test loss,
and the loss charts first."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from tests.servers import free_port
from tests.test_report import _chromium as report_chromium
from tests.test_tracking import TEST_LOSSES, tracked_experiment

pytestmark = pytest.mark.slow  # a server and five browser loads: 1-2 minutes on two busy cores
CHROMIUM = shutil.which("chromium")  # Debian's package puts it at /usr/bin/chromium
INSTALL = "apt-get update && apt-get install -y chromium"


def _session(sid: int) -> dict[int, str]:
    """pid → command line of every process in the session `sid` (the server and all it started)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                out[int(pid)] = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except (OSError, IndexError):
            continue
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`orch ui ui-demo` over a store that holds a small experiment's runs; (its URL, its process, the runs)."""
    root = tmp_path_factory.mktemp("ui")
    _, tracker, runs = tracked_experiment(root)
    port = free_port()
    log = root / "ui.log"
    cmd = [sys.executable, "-m", "orchestrator.cli", "ui", "ui-demo", "--port", str(port), "--mlflow", tracker.uri]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline, url = time.time() + 240, None
        while time.time() < deadline:
            assert proc.poll() is None, f"orch ui exited {proc.returncode}:\n{log.read_text()}"
            found = re.search(r"experiment ui-demo: (http://\S+)", log.read_text())
            if found:
                url = found.group(1)
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"orch ui did not answer within 240 s:\n{log.read_text()}")
        yield url, proc, tracker, runs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _chromium(*args: str, profile: Path) -> str:
    """tests/test_report.py's headless chromium, at a window wide enough for the runs table; its stdout."""
    return report_chromium("--window-size=1600,1000", *args, profile=profile, timeout=180).stdout


def _page(url: str, tmp_path: Path, name: str, drawn: str) -> str:
    """The page's DOM once the React app has fetched and drawn what the regex `drawn` finds (virtual time
    runs the app's timers to completion, but on a busy machine the charts can still be loading: then again,
    with more of it), saved beside a screenshot of it, for a person to look at."""
    for budget in (30_000, 60_000, 120_000):
        dom = _chromium(f"--virtual-time-budget={budget}", "--dump-dom", url, profile=tmp_path / f"{name}-{budget}")
        (tmp_path / f"{name}.html").write_text(dom, encoding="utf-8")
        if re.search(drawn, dom):
            break
    shot = tmp_path / f"{name}.png"
    _chromium(
        f"--virtual-time-budget={budget}", f"--screenshot={shot}", "--hide-scrollbars", url, profile=tmp_path / name
    )
    assert shot.stat().st_size > 20_000, "a blank screenshot"
    return dom


def test_orch_ui_starts_one_light_server_without_a_job_runner(served):
    _, proc, _, _ = served
    processes = _session(proc.pid)
    # MLflow's default: a CLI, uvicorn with 4 workers, a job runner and 7 huey consumers (16 with orch's own).
    assert len(processes) <= 2, processes
    assert not [cmd for cmd in processes.values() if "huey" in cmd or "_job_runner" in cmd], processes
    assert proc.pid in processes  # `orch ui` runs the server itself: no orch process waits beside it


def test_the_runs_page_shows_model_training_with_the_runs_changes_and_test_losses(served, tmp_path):
    if CHROMIUM is None:
        pytest.skip(f"chromium not installed: {INSTALL}")
    url, _, tracker, runs = served
    assert "workflowType=machine_learning" in url and "viewStateShareKey=orch" in url
    dom = _page(url, tmp_path, "runs", r'row-index="3"')
    exp = tracker.client.get_experiment_by_name("ui-demo")
    found = tracker.client.search_runs([exp.experiment_id], order_by=["metrics.test_loss ASC"])
    assert len(found) == len(runs)
    for run in found:
        assert run.info.run_name in dom, run.info.run_name
    assert "model.dropout=0.0" in dom and "(none)" in dom  # the changes column (orch.changes)
    for loss in TEST_LOSSES:
        assert f">{loss}<" in dom  # the test-loss column
    # Model training: the sidebar's runs and models, not the GenAI pages' traces overview.
    assert re.search(r">Runs<", dom) and re.search(r">Models<", dom)
    assert "Detect issues" not in dom and ">Overview<" not in dom
    # Sorted by test loss (the view's order): ag-grid's row-index of each run, best first.
    rows = sorted(set(re.findall(r'row-index="(\d+)" row-id="([0-9a-f]{32})"', dom)), key=lambda row: int(row[0]))
    assert [run_id for _, run_id in rows] == [r.info.run_id for r in found]


def test_the_charts_start_with_the_loss_curves(served, tmp_path):
    if CHROMIUM is None:
        pytest.skip(f"chromium not installed: {INSTALL}")
    url, _, _, _ = served
    dom = _page(url + "&compareRunsMode=CHART", tmp_path, "charts", r'<h4 [^>]*title="test_loss"')
    titles = re.findall(r'<h4 [^>]*title="([^"]+)"', dom)
    assert titles[:3] == ["loss", "val_loss", "test_loss"], titles
    assert not [t for t in titles if t.startswith("final.")], titles


def test_orch_ui_over_a_tracking_server_prints_its_pages_and_starts_nothing(served):
    url, _, _, _ = served
    server = url.split("/#/")[0]
    cmd = [sys.executable, "-m", "orchestrator.cli", "ui", "ui-demo", "--mlflow", server]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(url)  # the same page, of the server that is running already

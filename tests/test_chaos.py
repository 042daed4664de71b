"""The CI-size chaos campaign (bench/chaos.py --short): workers, trainers, torchrun agents and the sweep driver
killed, PostgreSQL restarted and stopped past the grace period, the MLflow server down for a minute, the runs
directory full, concurrent claimers — and afterwards nothing lost, failed, duplicated or different from an
uninterrupted run. Minutes long, so it carries the `chaos` marker: `pytest -m chaos`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.servers import pg_bin

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(900)
def test_short_campaign_loses_fails_duplicates_and_changes_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    db = "both" if pg_bin() is not None else "sqlite"  # .ci/run installs PostgreSQL; elsewhere SQLite alone
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--short", "--db", db, "--seed", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=870,
    )
    assert out.exists(), f"no JSON written (exit {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads(out.read_text())
    assert "harness_error" not in results, results.get("traceback")
    problems = {}
    for name, entry in results["databases"].items():
        assert "harness_error" not in entry, f"{name}: {entry.get('traceback')}"
        nonzero = {k: entry["figures"][k] for k in results["zero_figures"] if entry["figures"].get(k)}
        if nonzero:
            problems[name] = nonzero
        # Every kind fired at least once (a tmpfs for the disk-full fault needs root).
        undone = {
            k: f
            for k, f in entry["faults"].items()
            if not f["done"] and not (k == "disk_full" and not results["machine"]["root"])
        }
        assert not undone, f"{name}: fault kinds that never fired: {undone}"
    assert not problems, f"figures that must be zero are not: {problems}\n{proc.stdout[-6000:]}"
    assert proc.returncode == 0, proc.stdout[-4000:]

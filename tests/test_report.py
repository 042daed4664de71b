"""`orch report`: the HTML page of a real (tiny) study — files, contents, MLflow artifacts — and the page as
a real headless browser (Debian's chromium) renders it."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from orchestrator import queries, report, runspec, specs, submission
from orchestrator import table as tbl
from orchestrator.db import Run, connect
from tests.test_worker import Orch, write_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT_FILES = ["train_loss.png", "val_loss.png", "improvement.png"]
CHROMIUM = shutil.which("chromium")  # Debian's package puts it at /usr/bin/chromium
INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def study(tmp_path_factory, data_dir):
    """2 arms × 2 seeds on the tiny preset, a validation loss every 4 of 16 steps, trained by `orch worker`."""
    tmp = tmp_path_factory.mktemp("report")
    orch = Orch(tmp)
    exp = write_experiment(
        tmp, data_dir, "rep", "Intervention(name='no-dropout', set={'model.dropout': 0.0})", steps=16, seeds=2
    )
    exp.write_text(exp.read_text().replace("'run.steps': 16", "'run.steps': 16, 'eval.interval': 4"))
    orch("submit", str(exp))
    orch("worker", "--until-empty", "--no-mlflow", "--parallel", "2", "--heartbeat", "0.5")
    engine = connect(orch.db)
    assert queries.counts(engine) == {"succeeded": 4}, [(r.state, r.error) for _, _, r in queries.runs_of(engine)]
    index = report.write_report(engine, "rep", tmp / "out", runs_dir=orch.runs)
    return orch, engine, index


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_page_and_pngs(study):
    orch, engine, index = study
    assert index == orch.cwd / "out" / "index.html" and index.exists()
    page = index.read_text(encoding="utf-8")
    assert "<h1>rep</h1>" in page and "4 runs (4 succeeded)" in page
    for arm in ("baseline", "no-dropout"):
        assert f"<td>{arm}</td>" in page
    # One inlined image per plot, each the same bytes as the PNG written beside the page.
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(uris) == len(PLOT_FILES)
    for name, uri in zip(PLOT_FILES, uris):
        data = (index.parent / name).read_bytes()
        assert base64.b64decode(uri) == data
        width, height = _png_size(data)
        assert width >= 600 and height >= 150 and len(data) > 10_000
    # The leaderboard: the markdown table's columns, the summary above it, nothing unranked.
    for column in (
        "intervention",
        "n",
        "test loss",
        "improvement",
        "95% CI",
        "p",
        "verdict",
        "P(better on a fresh seed) [95% CI]",
    ):
        assert f"<th>{column}</th>" in page
    assert "baseline σ = " in page and "Not ranked" not in page
    assert re.search(r"<td>2</td><td>\d\.\d{4} ± \d\.\d{4}</td><td>[+-]\d\.\d{4}</td><td>\[", page)


def test_curves_come_from_every_finished_run(study):
    orch, engine, _ = study
    runs = [(arm, run) for _, arm, run in queries.runs_of(engine, ["rep"])]
    events = report._events(runs, None)  # run_dir as the worker's heartbeat recorded it
    assert sorted(events) == ["baseline", "no-dropout"] and all(len(v) == 2 for v in events.values())
    for per_run in events.values():
        for ev in per_run:
            assert len([e for e in ev if "loss" in e]) == 16
            assert [e["step"] for e in ev if e.get("val_loss") is not None] == [4, 8, 12, 16]  # 16: the final eval
    # Without a recorded run_dir (or one relative to another cwd) the runs folder is the fallback.
    for _, run in runs:
        run.run_dir = None
    assert report._events(runs, None) == {}
    assert {a: len(v) for a, v in report._events(runs, orch.runs).items()} == {"baseline": 2, "no-dropout": 2}
    x, y = report._series(events["baseline"][0], "loss", smooth=True)
    assert len(x) == 16 and np.all(np.diff(x) > 0) and np.all(np.isfinite(y))


def test_report_is_logged_to_mlflow_in_one_report_run(study, tmp_path):
    from orchestrator.tracking import Tracker

    _, engine, _ = study
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    report.write_report(engine, "rep", tmp_path / "a", tracker=tracker)
    report.write_report(engine, "rep", tmp_path / "b", tracker=tracker)  # reuses the run, replaces the files
    exp_id = tracker.experiment_id("rep/reports")  # apart from the training runs
    found = tracker.client.search_runs([exp_id])
    assert len(found) == 1
    run = found[0]
    assert run.info.run_name == "report" and run.data.tags["orch.kind"] == "report"
    assert sorted(a.path for a in tracker.client.list_artifacts(run.info.run_id)) == sorted(["index.html", *PLOT_FILES])


def test_imported_and_failed_runs(tmp_path):
    """Imported runs (a result, no run directory) are ranked but draw no curves; failures are listed."""
    engine = connect(f"sqlite:///{tmp_path / 'results.db'}")
    exp = specs.Experiment(
        name="imp",
        preset="tiny",
        seeds=3,
        interventions=[
            specs.Intervention(name="qkv-bias", set={"model.qkv_bias": True}),
            specs.Intervention(name="no-dropout", set={"model.dropout": 0.0}),
            specs.Intervention(name="tied", set={"model.tie_weights": True}),
        ],
    )
    runs = runspec.expand(exp)
    submission.submit(engine, exp, runs)
    losses = {
        "baseline": [5.0, 5.1, 5.2],
        "qkv-bias": [4.8, 4.91, None],  # paired on the 2 seeds it shares: p = 0.016
        "no-dropout": [5.35, 5.38, 5.5],
        "tied": [5.0, 5.25, 5.1],
    }
    with engine.begin() as conn:
        for r in runs:
            loss = losses[r.arm][r.seed - runs[0].seed]
            values = (
                dict(state="succeeded", test_loss=loss, result={"imported": True, "seed": r.seed, "test_loss": loss})
                if loss is not None
                else dict(state="failed", error="Traceback …\nRuntimeError: boom")
            )
            conn.execute(sa.update(Run).where(Run.id == r.id).values(**values))
    # Uncorrected (one arm of each verdict); Holm across the 3 arms is the default (tests/test_verdicts.py).
    index = report.write_report(
        engine, "imp", tmp_path / "out", tbl.Options(correction="none"), runs_dir=tmp_path / "runs"
    )
    page = index.read_text(encoding="utf-8")
    assert "<tr class='baseline'><td>baseline (imported)</td><td>3</td>" in page
    assert "<td>qkv-bias (imported)</td>" in page
    assert page.count("<td>better</td>") == page.count("<td>worse</td>") == page.count("<td>undecided</td>") == 1
    assert "RuntimeError: boom" in page and "<h3>Not ranked</h3>" in page
    assert page.count("data:image/png;base64,") == 3
    with pytest.raises(ValueError, match="no runs in experiment 'nope'"):
        report.write_report(engine, "nope", tmp_path / "none")


# ---------------------------------------------------------------------------------------------------------
# The page in a real browser.


def _chromium(*args: str, profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # Headless, no sandbox (CI runs as root), and nothing that would reach for the network.
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    out = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert out.returncode == 0, f"chromium exited {out.returncode}\n{out.stderr[-3000:]}"
    return out


def test_page_renders_in_headless_chromium(study, tmp_path):
    if CHROMIUM is None:
        pytest.skip(f"chromium not installed: {INSTALL}")
    _, _, index = study
    # Copy the page alone elsewhere: it must not need the PNGs beside it.
    alone = tmp_path / "alone" / "index.html"
    alone.parent.mkdir()
    shutil.copy(index, alone)
    # --virtual-time-budget lets the page's load handler run before the DOM is dumped.
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", alone.as_uri(), profile=tmp_path / "p1").stdout
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == 3
    assert 'data-images-loaded="3"' in dom  # every plot decoded: complete with a natural width > 0
    assert '<table id="leaderboard">' in dom and "<td>no-dropout</td>" in dom

    shot = tmp_path / "screenshot.png"
    _chromium(
        f"--screenshot={shot}", "--window-size=1200,2000", "--hide-scrollbars", alone.as_uri(), profile=tmp_path / "p2"
    )
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    rgb = pixels[..., :3].reshape(-1, 3)
    # Not blank: many colours (the arms' lines and bands), and a good share of the page not white.
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 100
    assert (rgb.min(axis=1) < 0.9).mean() > 0.02

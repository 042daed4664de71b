"""What a user watches while work goes on: data preparation's progress (a bar on a terminal, plain lines in a
log), the worker's progress line, and `orch status` (its running table at 80 columns, the queue's ETA, and
--format json)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from orchestrator import queue, runspec, specs, submission
from orchestrator.cli import app
from orchestrator.db import Run, connect
from orchestrator.launch import Launch
from orchestrator.launchers import Slot
from orchestrator.progress import Busy, Progress, queue_eta
from orchestrator.tail import MetricsTail
from tests.conftest import synthetic_documents
from trainer.prepare import Meter, Reporter, file_corpus, prepare

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.py"

# ---------------------------------------------------------------------------------------------------------
# trainer.prepare


def test_prepare_in_a_log_prints_plain_lines_with_totals_and_an_eta(tmp_path):
    """Not a terminal (a log, a pipe, CI): whole lines, each with the total, the rate and an ETA; no \\r."""
    stream = io.StringIO()
    docs = synthetic_documents(100, seed=3)
    meta = prepare(
        docs,
        tmp_path / "o",
        source="s",
        command="c",
        val_fraction=0.2,
        test_fraction=0.2,
        batch_docs=10,
        stream=stream,
    )
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # A line per tenth of the input (10 batches of 10 documents: the last one is the summary's to say).
    progress = [line for line in lines if "ETA" in line]
    assert len(progress) == 9, text
    assert re.fullmatch(r"tokenised \S+/~\S+ tokens \(10% of 100 documents\), \S+ tokens/s, ETA \d+ s", progress[0])
    assert "(90% of 100 documents)" in progress[-1]
    total = sum(meta["tokens"].values())
    assert lines[-1].startswith(f"tokenised {total:,} tokens (100 documents) in ")


def test_prepare_measures_files_by_their_bytes(tmp_path):
    """The total of a files source is the input's size, known before the first document."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = synthetic_documents(60, seed=4)
    (inputs / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    for i, d in enumerate(docs[30:]):
        (inputs / f"{i:02d}.txt").write_text(d)
    size = sum(f.stat().st_size for f in inputs.iterdir())
    meter, stream = Meter(), io.StringIO()
    prepare(
        file_corpus([str(inputs)], meter=meter),
        tmp_path / "o",
        source="files",
        command="c",
        val_fraction=0.2,
        test_fraction=0.2,
        batch_docs=5,
        meter=meter,
        stream=stream,
    )
    assert meter.total == size and meter.done == pytest.approx(size)
    lines = [line for line in stream.getvalue().splitlines() if "ETA" in line]
    assert lines and all(re.search(r"\(\d+% of [\d.]+ kB read\), \S+ tokens/s, ETA ", line) for line in lines), lines


def test_max_tokens_is_the_total_when_it_ends_the_preparation_sooner():
    reporter = Reporter(Meter(total=1000, done=100), 10_000, io.StringIO())
    reporter.update(docs=40, tokens=5_000)
    assert reporter.text().startswith("tokenised 5.0k/10.0k tokens (50% of --max-tokens), ")


def test_the_terminal_bar_runs_and_leaves_the_summary(tmp_path):
    stream = io.StringIO()
    reporter = Reporter(Meter(total=100), None, stream, bar=True)
    reporter.meter.done = 50
    reporter.update(docs=5, tokens=500)
    assert "ETA" in reporter.text()
    reporter.close(finished=True)
    assert stream.getvalue().rstrip().splitlines()[-1].startswith("tokenised 500 tokens (5 documents) in ")


# ---------------------------------------------------------------------------------------------------------
# The worker's progress line


@pytest.fixture
def engine(tmp_path):
    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    exp = specs.load_experiment(QUICKSTART)
    submission.submit(eng, exp, runspec.expand(exp, source=str(QUICKSTART)), source=str(QUICKSTART))
    return eng


def arm_of(eng, run_id: str) -> str:
    from orchestrator import queries

    [(experiment, arm)] = queries.memberships(eng, run_id)
    return f"{experiment}/{arm}"


def test_the_worker_progress_line_names_the_arm_and_the_eta(engine, tmp_path):
    from orchestrator.worker import Worker

    [run] = queue.claim(engine, "w1", 1)
    progress = Progress.of(run, tmp_path / run.id, 40, engine)  # what Worker._open makes of a claimed run
    assert progress.line() == f"{arm_of(engine, run.id)} seed {run.seed}: starting"
    progress.step, progress.train_loss, progress.tokens_per_s = 15, 9.76, 1024.0
    # tiny: 16 sequences × 64 tokens a step; 25 steps left at 1,024 tokens/s
    assert progress.line() == f"{arm_of(engine, run.id)} seed {run.seed}: step 15/40 loss 9.760 1,024 tok/s ETA 25 s"
    assert "label" not in progress.columns() and "tokens_per_step" not in progress.columns()

    said: list[str] = []
    worker = Worker(engine, runs_dir=tmp_path, slots=[Slot(0, None)], echo=said.append)
    launch = Launch(run, Slot(0, None), tmp_path / run.id, progress, MetricsTail(tmp_path / run.id))
    launch.handle = object()  # training
    worker.active[run.id] = launch
    worker._show_progress()
    assert said == [f"14 queued, 1 running | {run.id[:8]} {progress.line()}"]


def test_a_progress_without_the_database_still_names_the_seed(engine, tmp_path):
    [run] = queue.claim(engine, "w1", 1)
    progress = Progress.of(run, tmp_path, 40)
    progress.step, progress.train_loss, progress.tokens_per_s = 1, 10.0, None
    assert progress.line() == f"seed {run.seed}: step 1/40 loss 10.000 0 tok/s"  # no rate yet: no ETA


# ---------------------------------------------------------------------------------------------------------
# The queue's ETA and `orch status`


def test_the_queue_eta_fills_the_slot_that_frees_first_and_says_how():
    eta = queue_eta([Busy("q", 10.0, 30.0), Busy("q", 30.0, 10.0)], ["q"] * 4, {"q": [40.0, 38.0, 44.0]})
    # slots free at 10 and 30; four runs of 40 s: 10→50→90, 30→70→110
    assert eta.eta_s == 110 and eta.slots == 2 and eta.run_s == {"q": 40.0} and eta.unestimated == 0
    assert eta.how == "queue ETA ≈ 1 min 50 s: 4 queued at the 40 s median of 3 finished q runs, 2 running at a time"
    # Nothing of "new" has finished: its running run's projection (elapsed + ETA) times its queued runs.
    eta = queue_eta([Busy("new", 20.0, 40.0)], ["new", "new", None], {})
    assert eta.eta_s == 20 + 60 + 60 and eta.unestimated == 1
    assert eta.how.startswith("queue ETA ≥ 2 min 20 s: 2 queued at 1 min 00 s each, projected from 1 running new run")
    assert "not counting 1 queued run that nothing times yet" in eta.how
    assert queue_eta([], ["q"], {"q": [1.0]}).eta_s is None  # no worker: no ETA
    assert queue_eta([], [], {}).how == "queue empty: nothing queued or running"


@pytest.fixture
def busy(engine):
    """quickstart: 3 runs finished in 40, 42 and 44 s, 2 running at step 15/40, 10 queued."""
    for seconds in (40.0, 42.0, 44.0):
        [run] = queue.claim(engine, "w0", 1)
        queue.finish(engine, run.id, "w0", "succeeded", result={"test_loss": 8.0, "step": 40})
        with engine.begin() as conn:
            conn.execute(sa.update(Run).where(Run.id == run.id).values(finished_at=Run.started_at + seconds))
    running = queue.claim(engine, "build-host-01:123456:ab12", 2)
    columns = {"step": 15, "total_steps": 40, "train_loss": 9.76, "tokens_per_s": 1024.0}
    queue.heartbeat(engine, "build-host-01:123456:ab12", {r.id: columns for r in running})
    return engine


def invoke(args: list[str], columns: int = 80):
    return CliRunner().invoke(app, args, env={"COLUMNS": str(columns)})


def test_status_json_has_the_queue_eta(busy):
    out = invoke(["status", "--format", "json", "--db", str(busy.url)])
    assert out.exit_code == 0, out.output
    status = json.loads(out.stdout)
    assert status["counts"]["queued"] == 10 and len(status["running"]) == 2
    assert all(r["eta_s"] == 25 and r["arm"] and r["elapsed_s"] >= 0 for r in status["running"])
    q = status["queue_eta"]
    # slots free at 25 s each; 10 runs of 42 s on 2 slots: 25 + 5 × 42
    assert q["eta_s"] == pytest.approx(235) and q["queued"] == 10 and q["slots"] == 2
    assert q["how"] == (
        "queue ETA ≈ 3 min 55 s: 10 queued at the 42 s median of 3 finished quickstart runs, 2 running at a time"
    )
    refused = invoke(["status", "--format", "json", "--watch", "--db", str(busy.url)])
    assert refused.exit_code == 2 and "--watch" in refused.stderr and len(refused.stderr.splitlines()) == 1


@pytest.mark.parametrize("columns", [80, 160])
def test_status_at_80_columns_shows_whole_arm_names(busy, columns):
    out = invoke(["status", "--db", str(busy.url)], columns)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert max(map(len, lines)) <= columns, out.stdout
    status = json.loads(invoke(["status", "--format", "json", "--db", str(busy.url)]).stdout)
    rows = [line for line in lines if any(line.startswith(r["id"][:8]) for r in status["running"])]
    assert len(rows) == 2
    for r in status["running"]:
        [row] = [line for line in rows if line.startswith(r["id"][:8] + " ")]  # the id, shortened
        assert f" {r['experiment']}/{r['arm']} " in row and "15/40" in row and "25 s" in row
    assert ("build-host-01:123456:ab12" in "".join(rows)) == (columns > 80)  # a worker line where it does not fit
    assert any(line.startswith("queue ETA ≈ ") for line in lines)

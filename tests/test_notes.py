"""Notes and tags on experiments: stored with the spec, kept across a resubmitted file, and carried to the
experiment in MLflow (a real SQLite-backed MLflow store)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator import api, queries, runspec, specs, submission
from orchestrator.cli import app
from orchestrator.db import connect
from orchestrator.tracking import NOTE_TAG, Tracker


@pytest.fixture
def where(tmp_path):
    db = f"sqlite:///{tmp_path / 'results.db'}"
    exp = specs.Experiment(name="noted", description="does clipping help?", tags={"owner": "ana"})
    submission.submit(connect(db), exp, runspec.expand(exp))
    return db, f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_notes_and_tags_are_kept_and_reach_mlflow(where):
    db, mlflow = where
    tracker = Tracker(mlflow)
    exp_id = tracker.experiment_id("noted")  # the experiment is tracked already: changes reach it at once
    api.tag("noted", {"stage": "pilot"}, mlflow=mlflow, db=db)
    spec = api.note("noted", "seed 44 ran on a slow node", mlflow=mlflow, db=db)
    assert spec.tags == {"owner": "ana", "stage": "pilot"} and spec.notes == ["seed 44 ran on a slow node"]
    found = tracker.client.get_experiment(exp_id)
    assert found.tags["stage"] == "pilot" and found.tags["owner"] == "ana"
    assert found.tags[NOTE_TAG] == "does clipping help?\n\n- seed 44 ran on a slow node"
    api.tag("noted", remove=["stage"], mlflow=mlflow, db=db)
    assert "stage" not in tracker.client.get_experiment(exp_id).tags
    # The file submitted again (its own tags, no notes) keeps what `orch tag` / `orch note` added.
    again = specs.Experiment(name="noted", description="does clipping help?", tags={"owner": "bo"})
    submission.submit(connect(db), again, runspec.expand(again))
    stored = queries.spec(connect(db), "noted")
    assert stored.tags == {"owner": "bo"} and stored.notes == ["seed 44 ran on a slow node"]


def test_the_cli_refuses_what_it_cannot_store(where):
    db, mlflow = where
    run = CliRunner().invoke
    assert run(app, ["tag", "noted", "owner", "--db", db, "--no-mlflow"]).output.startswith("error: a tag is KEY=VALUE")
    out = run(app, ["tag", "nope", "a=b", "--db", db, "--no-mlflow"])
    assert out.exit_code == 2 and "no experiment named 'nope'" in out.output
    assert "needs some text" in run(app, ["note", "noted", " ", "--db", db, "--no-mlflow"]).output
    ok = run(app, ["tag", "noted", "stage=final", "--db", db, "--mlflow", mlflow])
    assert ok.exit_code == 0 and "owner=ana, stage=final" in ok.output

"""What MLflow holds of an experiment, as orch's own tracking code sends it (no training: run directories are
written by hand, then sent by the outbox): the experiment shown as model training with its note and orch's
saved view, each run's changes, one test-loss metric and no one-point final.* metrics, reports apart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator import api, mlflow_ui, runspec, specs, submission, tracking
from orchestrator.db import Run, connect
from orchestrator.outbox import Outbox
from orchestrator.tracking import Tracker

DESCRIPTION = "Does dropout help a tiny GPT?"
TEST_LOSSES = [3.875, 3.75, 3.625, 3.5]  # exact in binary: the UI shows them as written
STEPS = 20


def tracked_experiment(root: Path, name: str = "ui-demo") -> tuple[sa.Engine, Tracker, list[runspec.RunSpec]]:
    """A small experiment (baseline and no-dropout, 2 seeds), its runs finished with hand-written metrics and
    results, and sent to a SQLite MLflow store under `root` by the outbox, as a worker sends them."""
    root.mkdir(parents=True, exist_ok=True)
    engine = connect(f"sqlite:///{root / 'results.db'}")
    exp = specs.Experiment(
        name=name,
        description=DESCRIPTION,
        seeds=2,
        interventions=[specs.Intervention(name="no-dropout", set={"model.dropout": 0.0}, description="p = 0")],
    )
    runs = runspec.expand(exp)
    submission.submit(engine, exp, runs)
    now = time.time()
    for r, test_loss in zip(runs, TEST_LOSSES):
        d = root / "runs" / r.id
        d.mkdir(parents=True)
        events = []
        for step in range(1, STEPS + 1):
            events.append(
                dict(step=step, tokens=512 * step, loss=test_loss + 3 / step, lr=1e-3, grad_norm=1.0, time=now)
            )
            if step % 5 == 0:
                events.append(dict(step=step, tokens=512 * step, val_loss=test_loss + 2 / step, time=now))
        events.append(dict(step=STEPS, tokens=512 * STEPS, val_loss=test_loss + 0.1, test_loss=test_loss, time=now))
        (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        result = dict(
            status="succeeded",
            step=STEPS,
            tokens=512 * STEPS,
            test_loss=test_loss,
            val_loss=test_loss + 0.1,
            train_loss=test_loss + 0.15,
            tokens_per_s=12345.678,
            params=1000,
            launches=1,
        )
        (d / "result.json").write_text(json.dumps(result))
        with engine.begin() as conn:
            values = dict(state="succeeded", launches=1, run_dir=str(d), result=result, test_loss=test_loss)
            conn.execute(sa.update(Run).where(Run.id == r.id).values(**values, finished_at=now))
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
    outbox = Outbox(engine, tracker, "test", runs_dir=root / "runs")
    for r in runs:
        assert outbox.sync(r.id).done
    return engine, tracker, runs


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    return tracked_experiment(tmp_path_factory.mktemp("tracked"))


def test_the_experiment_is_model_training_with_its_note_and_orchs_view(tracked):
    _, tracker, _ = tracked
    exp = tracker.client.get_experiment_by_name("ui-demo")
    tags = exp.tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # not genai_development
    assert tags[tracking.NOTE_TAG] == DESCRIPTION
    view = json.loads(tags[mlflow_ui.VIEW_TAG])
    assert view["name"] == "orch" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`test_loss`" and state["orderByAsc"] is True
    assert {"tags.`orch.changes`", "metrics.`test_loss`"} <= set(state["selectedColumns"])
    charts = [c["metricKey"] for c in state["compareRunCharts"]]
    assert charts[:3] == ["loss", "val_loss", "test_loss"]  # the curves first, then the test loss's bars
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} == {s["uuid"] for s in state["compareRunSections"]}
    url = mlflow_ui.runs_url("http://127.0.0.1:5000", exp.experiment_id)
    assert url == (
        f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
        "?workflowType=machine_learning&viewStateShareKey=orch"
    )


def test_each_run_says_what_it_changed_and_logs_the_test_loss_once(tracked):
    _, tracker, runs = tracked
    exp = tracker.client.get_experiment_by_name("ui-demo")
    found = tracker.client.search_runs([exp.experiment_id])
    assert len(found) == len(runs)  # the training runs, and nothing else
    for run in found:
        tags, metrics = run.data.tags, run.data.metrics
        arm = tags["orch.intervention"]
        assert tags[mlflow_ui.CHANGES_TAG] == {"baseline": "(none)", "no-dropout": "model.dropout=0.0"}[arm]
        assert tags.get(tracking.NOTE_TAG) == {"baseline": None, "no-dropout": "p = 0"}[arm]
        # The curves, and the test loss as one metric: no final.* metrics, one chart each.
        assert sorted(metrics) == ["grad_norm", "loss", "lr", "test_loss", "tokens", "val_loss"]
        history = tracker.client.get_metric_history(run.info.run_id, "test_loss")
        assert [(m.step, m.value) for m in history] == [(STEPS, metrics["test_loss"])]
        assert len(tracker.client.get_metric_history(run.info.run_id, "loss")) == STEPS
        # The other final numbers as tags; the losses are metrics' last points already.
        assert tags["result.tokens_per_s"] == "12345.7" and tags["result.params"] == "1000"
        assert not {"result.test_loss", "result.val_loss", "result.train_loss"} & set(tags)
        assert tags["orch.status"] == "succeeded" and run.info.status == "FINISHED"


def test_finishing_again_adds_no_test_loss_point(tracked):
    engine, tracker, runs = tracked
    from orchestrator import queries

    [row] = queries.runs(engine, [runs[0].id])
    tracker.finish_run(row.mlflow_run_id, "succeeded", Path(row.run_dir), row.result, row.finished_at)
    assert len(tracker.client.get_metric_history(row.mlflow_run_id, "test_loss")) == 1


def test_an_older_experiment_is_brought_up_to_date_and_a_changed_view_is_kept(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    assert Tracker(uri).experiment_id("old") == old
    tags = client.get_experiment(old).tags
    assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development" and mlflow_ui.VIEW_TAG in tags
    client.set_experiment_tag(old, mlflow_ui.VIEW_TAG, '{"name": "mine"}')  # "Override saved view" in the UI
    spec = specs.Experiment(name="old", description="now described", tags={"owner": "ana"})
    Tracker(uri).experiment_id("old", spec)  # another process, with the spec
    tags = client.get_experiment(old).tags
    assert tags[mlflow_ui.VIEW_TAG] == '{"name": "mine"}'
    assert tags[tracking.NOTE_TAG] == "now described" and tags["owner"] == "ana"


def test_a_report_is_kept_apart_from_the_training_runs(tracked, tmp_path):
    _, tracker, runs = tracked
    page = tmp_path / "index.html"
    page.write_text("<h1>ui-demo</h1>")
    first = tracker.log_report("ui-demo", [page])
    assert tracker.log_report("ui-demo", [page]) == first  # one report run, its files replaced
    reports = tracker.client.get_experiment_by_name("ui-demo/reports")
    [run] = tracker.client.search_runs([reports.experiment_id])
    assert run.info.run_id == first and run.info.run_name == "report" and run.data.tags["orch.kind"] == "report"
    assert [a.path for a in tracker.client.list_artifacts(first)] == ["index.html"]
    assert reports.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert mlflow_ui.VIEW_TAG not in reports.tags  # its columns and charts are a training run's
    training = tracker.client.get_experiment_by_name("ui-demo")
    assert len(tracker.client.search_runs([training.experiment_id])) == len(runs)


def test_a_sweep_trial_is_tagged_with_its_parameters(tracked):
    _, tracker, _ = tracked
    parent = tracker.sweep_parent("a-sweep")
    child = tracker.client.create_run(tracker.experiment_id("a-sweep")).info.run_id
    tracker.set_parent(child, parent, changes={"optim.lr": 0.001, "optim.weight_decay": 0.1})
    tags = tracker.client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags[mlflow_ui.CHANGES_TAG] == "optim.lr=0.001, optim.weight_decay=0.1"


def test_orch_ui_names_the_experiments_it_knows_and_starts_a_light_server(tracked, tmp_path):
    _, tracker, _ = tracked
    with pytest.raises(ValueError, match=r"no experiment named 'nope'; known: .*ui-demo"):
        api.ui("nope", mlflow=tracker.uri, echo=lambda _: None)
    assert tracker.ui_pages() == [("ui-demo", tracker.experiment_id("ui-demo"))]  # not the reports, not Default
    cmd, env = mlflow_ui.ui_server(tracker.uri, 5123)
    assert cmd[1:4] == ["-m", "mlflow", "server"] and cmd[cmd.index("--workers") + 1] == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no job runner, no huey consumers

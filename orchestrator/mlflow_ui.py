"""MLflow's UI as orch shows it: the saved view its experiments open in, and the URLs `orch ui` prints and the
MLflow server it starts. The Tracker (tracking.py) writes the view onto every experiment it makes or touches.

- A saved view, "orch" (the experiment tag mlflow.sharedViewState.orch, which `orch ui`'s URLs open): the
  runs sorted by test loss with their changes and test / val / train loss as columns, and the charts
  pinned loss, val_loss, test_loss first, then optimisation, then throughput. Without it MLflow orders
  charts alphabetically, and the table shows no metric or tag at all.
- Model training, not GenAI: the URLs carry the `workflowType=machine_learning` parameter the 3.17 UI picks
  its mode from (the Tracker sets the experiment kind tag older and hosted UIs read).
- `orch ui`'s server: one light process, artifacts served from beside a SQLite store.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

WORKFLOW = "workflowType=machine_learning"  # the URL parameter that shows model training in the 3.17 UI
VIEW_ID = "orch"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_ID}"  # a saved view, opened by ?viewStateShareKey=orch
VIEW_VERSION_TAG = "orch.view"  # the layout orch last wrote; a view changed in the UI stays until it changes
VIEW_VERSION = "1"
# A run's intervention as its changed config keys: "model.dropout=0.0" (tracking.format_changes). Here rather
# than in tracking.py, which imports this module: it is the view's first column.
CHANGES_TAG = "orch.changes"


# -- orch's saved view -----------------------------------------------------------------------------------
# MLflow's own default orders charts alphabetically (clipped, grad_norm, loss, lr, …, val_loss), hides every
# metric and tag from the runs table and sorts runs by start time. The view (the UI's own saved-view format:
# an envelope {name, createdAt, updatedAt, state}, the state a JSON string of the page's search facets and UI
# state) pins what a user wants first. Charts of metrics it does not name are added after these by the UI.

VIEW_CHARTS = {
    "Loss": [("loss", "LINE"), ("val_loss", "LINE"), ("test_loss", "BAR")],  # the test loss: one bar per run
    "Optimisation": [("lr", "LINE"), ("grad_norm", "LINE"), ("clipped", "LINE"), ("loss_scale", "LINE")],
    "Throughput": [("tokens_per_s", "LINE"), ("mfu", "LINE"), ("tokens", "LINE")],
}
VIEW_COLUMNS = [f"tags.`{CHANGES_TAG}`", "metrics.`test_loss`", "metrics.`val_loss`", "metrics.`loss`"]


def _chart(key: str, kind: str, section: str) -> dict:
    chart = {
        "uuid": f"orch-{key}",
        "type": kind,
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,  # a generated bar chart would be turned into a line chart of one point
        "displayName": key,
        "metricKey": key,
    }
    if kind == "LINE":
        chart.update(
            lineSmoothness=0,
            xAxisScaleType="linear",
            scaleType="linear",
            range={},
            xAxisKey="step",
            selectedXAxisMetricKey="",
            yAxisKey="metric",
            yAxisExpressions=[],
            ignoreOutliers=False,
            useGlobalXaxisKey=True,
            useGlobalLineSmoothing=True,
        )
    return chart


def view_state() -> dict:
    """The state of orch's saved view: runs by test loss, each with its changes and its test, validation
    and (last) training loss, and the loss charts first."""
    sections = [(f"orch-{name.lower()}", name) for name in VIEW_CHARTS]
    return {
        "searchFilter": "",
        "orderByKey": "metrics.`test_loss`",
        "orderByAsc": True,
        "selectedColumns": VIEW_COLUMNS,
        "columnOrder": ["attributes.`Run Name`", *VIEW_COLUMNS],  # the changes beside the run, then its losses
        "columnWidths": {VIEW_COLUMNS[0]: 240},
        "compareRunCharts": [
            _chart(key, kind, uuid) for (uuid, _), charts in zip(sections, VIEW_CHARTS.values()) for key, kind in charts
        ],
        "compareRunSections": [
            {"uuid": uuid, "name": name, "display": True, "isReordered": True, "deleted": False, "isGenerated": False}
            for uuid, name in sections
        ],
        "isAccordionReordered": True,  # else the UI sorts the sections by name
        "hideEmptyCharts": True,
        "runsHiddenMode": "SHOW_ALL",  # every run in the charts, not the first 10
    }


def with_view(tags: dict[str, str]) -> dict[str, str]:
    """`tags`, with the view itself before its version tag where that is to be set."""
    if VIEW_VERSION_TAG not in tags:
        return tags
    now = int(time.time() * 1000)
    envelope = {"name": VIEW_ID, "createdAt": now, "updatedAt": now, "state": json.dumps(view_state())}
    return {VIEW_TAG: json.dumps(envelope), **tags}


# -- `orch ui`: the pages it prints and the server it starts ---------------------------------------------


def runs_url(base: str, experiment_id: str) -> str:
    """An experiment's runs page in MLflow's UI, as model training, in orch's saved view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW}&viewStateShareKey={VIEW_ID}"


def experiments_url(base: str) -> str:
    return f"{base.rstrip('/')}/#/experiments?{WORKFLOW}"


def ui_server(uri: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment of `orch ui`'s MLflow server: one uvicorn worker (MLflow starts 4, and with
    them a job runner and seven huey consumers for GenAI jobs: 16 processes, ~3 GiB), no job execution, no
    telemetry; artifacts served from beside a SQLite store, as the Tracker writes them."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:///"):
        store = Path(uri.removeprefix("sqlite:///")).resolve()
        cmd += ["--artifacts-destination", (store.parent / "mlartifacts").as_uri()]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return cmd, env


def serve_ui(uri: str, port: int) -> int:
    """Run ui_server's command in this process, through MLflow's own CLI, until the server stops; its exit
    code. A process that has imported MLflow already (a Tracker's) saves importing it again (~8 s of the
    start here), and no process of its own waits beside the server."""
    cmd, env = ui_server(uri, port)
    os.environ.update(env)
    from mlflow.cli import cli

    try:
        cli.main(args=cmd[3:], prog_name="mlflow")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0

"""Many hosts, one source of truth for tracking: an MLflow server whose store is PostgreSQL and which serves
the artifacts itself, so a worker needs nothing but the server's URL — no disk shared with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, subprocess_env
from tests.servers import MlflowServer

pytestmark = pytest.mark.postgres
ORCH = [sys.executable, "-m", "orchestrator.cli"]


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_a_worker_tracks_to_a_server_on_postgresql_that_keeps_the_artifacts(postgres, tmp_path, data_dir):
    server_side, worker_side = tmp_path / "server", tmp_path / "worker"
    server_side.mkdir()
    worker_side.mkdir()
    server = MlflowServer(postgres.create_db("mlflow_tracking"), server_side / "artifacts", serve_artifacts=True)
    server.start()
    try:
        base = {**FAST, "data.path": str(data_dir)}
        (worker_side / "exp.py").write_text(
            f"from orchestrator.specs import Experiment\nexperiment = Experiment(name='shared', preset='tiny', "
            f"base={base!r})\n"
        )
        env = {**subprocess_env(), "ORCH_DB": postgres.create_db("orch_queue"), "ORCH_MLFLOW": server.url}
        for args in (["submit", "exp.py"], ["worker", "--until-empty"]):
            out = subprocess.run([*ORCH, *args], cwd=worker_side, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr

        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.url)
        [run] = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 13))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "result.json" in names, names
        # The artifacts live on the server's side only; the worker's directory holds no tracking store.
        assert list((server_side / "artifacts").rglob("result.json"))
        assert not any(p.name in ("mlruns", "mlartifacts", "mlflow.db") for p in Path(worker_side).iterdir())
    finally:
        server.stop()

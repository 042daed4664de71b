"""MLflow: the only module that imports it.

One MLflow experiment per orch experiment; one MLflow run per orch run, created in the experiment that first
queued it (a baseline shared by several experiments is one run, tagged with all of them). The full config
goes in as params, identity as tags, every metrics.jsonl event as metrics (in batches: one REST call per
1,000 points rather than one per point), and config, result and log as artifacts.

Default store: a SQLite file, `mlflow.db` (MLflow refuses its plain-file store without a flag). Any
tracking URI works, e.g. http://host:5000 for a shared tracking server.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.states import RunState

DEFAULT_URI = "sqlite:///mlflow.db"
ENV_URI = "ORCH_MLFLOW"
BATCH = 1000  # MLflow's limit on metrics per log_batch
# A final run state as MLflow's run status (mlflow.entities.RunStatus).
TERMINAL = {
    RunState.SUCCEEDED: "FINISHED",
    RunState.FAILED: "FAILED",
    RunState.DIVERGED: "FAILED",
    RunState.PRUNED: "KILLED",
    RunState.CANCELLED: "KILLED",
}
KIND_TAG = "orch.kind"  # what an MLflow run that is not an orch run holds: "sweep" (a parent) or "report"


def resolve_uri(uri: str | None = None) -> str:
    return uri or os.environ.get(ENV_URI) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


class Tracker:
    def __init__(self, uri: str | None = None):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # MLflow's client retries for minutes by default; a worker must not miss its heartbeats meanwhile.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self._experiments: dict[str, str] = {}
        if self.uri.startswith("sqlite:///"):
            # MLflow creates and migrates its SQLite schema when a client first opens it; two workers
            # starting together race in that migration and one dies. The first does it, the others wait.
            from orchestrator.db import file_lock

            path = Path(self.uri.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(path):
                self.client = MlflowClient(self.uri)
                self.client.search_experiments(max_results=1)
        else:
            self.client = MlflowClient(self.uri)

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        if name not in self._experiments:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiments[name] = self.client.create_experiment(
                        name, artifact_location=self._artifacts(name)
                    )
                except MlflowException:  # another worker created it first
                    self._experiments[name] = self.client.get_experiment_by_name(name).experiment_id
            else:
                self._experiments[name] = exp.experiment_id
        return self._experiments[name]

    def _artifacts(self, name: str) -> str | None:
        # With a local SQLite store, keep artifacts beside it rather than in ./mlruns of whatever cwd.
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / name).as_uri()
        return None

    def start_run(
        self,
        *,
        experiment: str,
        all_experiments: list[str],
        arm: str,
        run_id: str,
        config: dict,
        seed: int,
        data_seed: int,
        repeat: int,
        git_commit: str | None,
    ) -> str:
        """Create the MLflow run for an orch run, with params and tags; return its MLflow id."""
        from mlflow.entities import Param

        tags = {
            "orch.run_id": run_id,
            "orch.experiment": experiment,
            "orch.experiments": ",".join(all_experiments),
            "orch.intervention": arm,
            "orch.seed": str(seed),
            "orch.data_seed": str(data_seed),
            "orch.repeat": str(repeat),
            "orch.config_hash": run_id,
            "mlflow.source.git.commit": git_commit or "",
        }
        run = self.client.create_run(
            self.experiment_id(experiment), run_name=f"{arm}-s{seed}-r{repeat}-{run_id[:6]}", tags=tags
        )
        params = [Param(k, str(v)) for k, v in sorted(flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow's limit on params per batch
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def find_run(self, experiment: str, run_id: str) -> str | None:
        """The MLflow run of an orch run, by its tag: made by a process that died before recording its id."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        found = self.client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`orch.run_id` = '{run_id}'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        return found[0].info.run_id if found else None

    def last_steps(self, mlflow_run_id: str) -> dict[str, int]:
        """Per metric key, the last step already logged (so a resumed run logs no step twice)."""
        run = self.client.get_run(mlflow_run_id)
        out = {}
        for key in run.data.metrics:
            history = self.client.get_metric_history(mlflow_run_id, key)
            out[key] = max((m.step for m in history), default=-1)
        return out

    def log_events(self, mlflow_run_id: str, events: list[dict], last_steps: dict[str, int]) -> int:
        """Log metrics.jsonl events, skipping (key, step) pairs at or before what was logged; return #points."""
        from mlflow.entities import Metric

        points, sent = [], dict(last_steps)
        for e in events:
            if "event" in e:
                continue
            step, ts = int(e.get("step", 0)), int(1000 * e.get("time", time.time()))
            for key, value in e.items():
                if key in ("step", "time") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if step <= sent.get(key, -1) or not math.isfinite(value):
                    continue
                points.append(Metric(key, float(value), ts, step))
                sent[key] = step
        for i in range(0, len(points), BATCH):
            self.client.log_batch(mlflow_run_id, metrics=points[i : i + BATCH])
        last_steps.update(sent)  # only once MLflow has them: a failed send is retried from the same events
        return len(points)

    def reopen(self, mlflow_run_id: str) -> None:
        """A run trains again (orch retry) in the MLflow run it was closed in: show it as running."""
        if self.client.get_run(mlflow_run_id).info.status != "RUNNING":
            self.client.update_run(mlflow_run_id, status="RUNNING")

    def finish_run(
        self, mlflow_run_id: str, state: str, run_dir: Path, result: dict | None, finished_at: float | None = None
    ) -> None:
        """Final metrics, status tag, artifacts and terminal status; safe to repeat after a failure part-way:
        the final metrics carry the run's finish time, so sending them again adds nothing (MLflow keeps one
        point per key, step, time and value), artifacts overwrite themselves, the status is set again."""
        from mlflow.entities import Metric

        if result:
            ts = int((finished_at or time.time()) * 1000)
            final = {
                f"final.{k}": v
                for k, v in result.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            }
            self.client.log_batch(
                mlflow_run_id, metrics=[Metric(k, float(v), ts, int(result.get("step") or 0)) for k, v in final.items()]
            )
        self.client.set_tag(mlflow_run_id, "orch.status", state)
        for name in ("config.json", "result.json", "train.log"):
            if (run_dir / name).exists():
                self.client.log_artifact(mlflow_run_id, str(run_dir / name))
        if state in TERMINAL:
            self.client.set_terminated(mlflow_run_id, status=TERMINAL[state])

    # -- sweeps: a parent run per sweep, the trials' runs as its children ---------------------------------

    def sweep_parent(self, sweep: str) -> str:
        """The sweep's parent run (found by tag, so a restarted driver reuses it)."""
        exp_id = self.experiment_id(sweep)
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{KIND_TAG}` = 'sweep' and tags.`orch.sweep` = '{sweep}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        return self.client.create_run(
            exp_id, run_name=f"sweep {sweep}", tags={KIND_TAG: "sweep", "orch.sweep": sweep}
        ).info.run_id

    def set_tags(self, mlflow_run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(mlflow_run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def set_parent(self, child_run_id: str, parent_run_id: str) -> None:
        """Nest a trial's run under the sweep in the MLflow UI (the standard mlflow.parentRunId tag)."""
        self.client.set_tag(child_run_id, "mlflow.parentRunId", parent_run_id)

    def finish_sweep(self, parent_run_id: str, params: dict, value: float, counts: dict[str, int]) -> None:
        """Close the sweep's parent run with the best parameters, their validation loss and the trial counts
        by state (`complete`, `pruned`, …)."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        run = self.client.get_run(parent_run_id)
        new_params = [Param(f"best.{k}", str(v)) for k, v in params.items() if f"best.{k}" not in run.data.params]
        self.client.log_batch(
            parent_run_id,
            params=new_params,
            metrics=[Metric("best.val_loss", value, now, 0)]
            + [Metric(f"trials.{k}", float(v), now, 0) for k, v in counts.items()],
        )
        self.client.set_terminated(parent_run_id, status="FINISHED")

    # -- reports ----------------------------------------------------------------------------------------

    def log_report(self, experiment: str, files: list[Path]) -> str:
        """Log the files to the experiment's "report" run (made once, then reused); return its MLflow id."""
        exp_id = self.experiment_id(experiment)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'report'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(exp_id, run_name="report", tags={KIND_TAG: "report"}).info.run_id
        for path in files:
            self.client.log_artifact(run_id, str(path))  # same names each time: a new report replaces the old
        self.client.set_terminated(run_id)
        return run_id

    # -- experiment tags and notes ----------------------------------------------------------------------

    def describe_experiment(self, spec, removed=()) -> bool:
        """Carry an experiment spec's tags, description and notes (`orch tag`, `orch note`) to its MLflow
        experiment where it exists already (False where it does not: it gets them when it is created)."""
        found = self.client.get_experiment_by_name(spec.name)
        if found is None:
            return False
        for key, value in spec.tags.items():
            self.client.set_experiment_tag(found.experiment_id, key, str(value))
        for key in removed:
            if key in found.tags:
                self.client.delete_experiment_tag(found.experiment_id, key)
        self.client.set_experiment_tag(found.experiment_id, NOTE_TAG, experiment_note(spec))
        return True


NOTE_TAG = "mlflow.note.content"  # what MLflow's UI shows as an experiment's description


def experiment_note(spec) -> str:
    """An experiment's MLflow note: its description, then its notes, newest last."""
    notes = "\n".join(f"- {n}" for n in spec.notes)
    return "\n\n".join(part for part in (spec.description, notes) if part)


def open_tracker(uri: str | None = None, enabled: bool = True) -> Tracker | None:
    """The tracker every command that tracks uses: None when tracking is off (--no-mlflow). A URI given as
    a value (a command line that `ps` shows anyone, a notebook that gets shared) must not hold a password:
    MLflow reads $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, or $ORCH_MLFLOW may hold the whole URI."""
    from urllib.parse import urlsplit

    if not enabled:
        return None
    if uri is not None and urlsplit(uri).password:
        raise ValueError(
            "--mlflow holds a password, which anyone on this machine can read in `ps`: set "
            "$MLFLOW_TRACKING_USERNAME and $MLFLOW_TRACKING_PASSWORD, or give the URI in $ORCH_MLFLOW"
        )
    return Tracker(uri)

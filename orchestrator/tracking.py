"""MLflow: what orch logs to it. With mlflow_ui.py (its UI and server), the only module that imports it.

One MLflow experiment per orch experiment; one MLflow run per orch run, created in the experiment that first
queued it (a baseline shared by several experiments is one run, tagged with all of them). The full config
goes in as params, identity as tags (`orch.changes`: what the intervention changed, `(none)` for the
baseline), every metrics.jsonl event as metrics (in batches: one REST call per 1,000 points rather than one
per point), and config, result, samples (as samples.json and samples.md) and log as artifacts.

How it looks in MLflow's UI (3.17), which a new user opens with `orch ui`:
- Model training, not GenAI. The UI picks its mode from the page's `workflowType=machine_learning` URL
  parameter, else the browser's last choice (GenAI on first use); older and hosted UIs read the experiment's
  `mlflow.experimentKind` tag. orch sets the tag on every experiment it creates or touches, and `orch ui`
  prints URLs with the parameter.
- The experiment's note (its description in the UI) is the spec's description and `orch note`s.
- A chart per training metric and no one-point `final.*` copies: the test loss is the metric `test_loss`,
  logged once (by the final evaluation's metrics.jsonl event), result.json's other final numbers are
  `result.*` tags (in the run's overview, and columns of the runs table on request).
- A saved view, "orch", which `orch ui`'s URLs open: runs sorted by test loss, loss charts first
  (mlflow_ui.py, which also holds those URLs and the server `orch ui` starts).
- Reports (`orch report`) go to an experiment of their own, "EXP/reports", never among the training runs;
  a sweep's parent run holds its trials' runs as children (MLflow's nested runs).

Default store: a SQLite file, `mlflow.db` (MLflow refuses its plain-file store without a flag). Any
tracking URI works, e.g. http://host:5000 for a shared tracking server.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.mlflow_ui import CHANGES_TAG, VIEW_VERSION, VIEW_VERSION_TAG, with_view
from orchestrator.states import RunState
from trainer.rundir import SAMPLES
from trainer.sample import markdown, read_samples

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
NO_CHANGES = "(none)"  # CHANGES_TAG (a run's intervention as its changed config keys) for the baseline
SAMPLE_TAG = "orch.sample"  # the greedy completion of a run's first sample prompt, prompt included
RESULT_TAG = "result."  # result.json's final numbers other than the losses, as tags: result.tokens_per_s
# Final numbers that are a metric's last point already: not repeated as result.* tags.
LOSSES = ("test_loss", "val_loss", "train_loss")
REPORTS = "reports"  # `orch report` of experiment E goes to the MLflow experiment "E/reports"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" in the UI, as opposed to genai_development


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
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing to send it to from an offline node
        from mlflow.tracking import MlflowClient

        self.uri = resolve_uri(uri)
        self._experiments: dict[str, str] = {}
        self._applied: dict[str, dict[str, str]] = {}  # per experiment, the tags this process has seen it hold
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

    def experiment_id(self, name: str, spec=None) -> str:
        """The MLflow experiment of an orch experiment, made if missing. Made or not, it is shown as model
        training with orch's saved view, and with a spec (specs.Experiment) its tags and note are the spec's:
        checked once per process (and spec), so existing experiments are brought up to date by the first
        orch process that touches them."""
        return self._experiment(name, experiment_tags(spec))

    def _experiment(self, name: str, wanted: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException

        seen = self._applied.get(name)
        if name in self._experiments and seen is not None and all(seen.get(k) == v for k, v in wanted.items()):
            return self._experiments[name]
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                self._experiments[name] = self.client.create_experiment(
                    name, artifact_location=self._artifacts(name), tags=with_view(wanted)
                )
                self._applied[name] = dict(wanted)
                return self._experiments[name]
            except MlflowException:  # another worker created it first
                exp = self.client.get_experiment_by_name(name)
        self._experiments[name] = exp.experiment_id
        held = dict(exp.tags)
        for key, value in with_view({k: v for k, v in wanted.items() if held.get(k) != v}).items():
            self.client.set_experiment_tag(exp.experiment_id, key, value)
            held[key] = value
        self._applied[name] = held
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
        spec=None,
        changes: dict | None = None,
        description: str = "",
    ) -> str:
        """Create the MLflow run for an orch run, with params and tags; return its MLflow id. `spec`: the
        experiment's (specs.Experiment), for its MLflow experiment; `changes`: the intervention's dotted
        changes ({} for the baseline, None where unknown), as the orch.changes tag; `description`: the
        intervention's, as the run's note."""
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
        if changes is not None:
            tags[CHANGES_TAG] = format_changes(changes)
        if description:
            tags[NOTE_TAG] = description
        run = self.client.create_run(
            self.experiment_id(experiment, spec), run_name=f"{arm}-s{seed}-r{repeat}-{run_id[:6]}", tags=tags
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
        """The test loss (where no event logged it), result.* and status tags, artifacts and terminal status;
        safe to repeat after a failure part-way: the test loss is sent only where MLflow lacks it, tags and
        artifacts overwrite themselves, the status is set again."""
        from mlflow.entities import Metric

        tags = {"orch.status": state}
        if result:
            numbers = {k: v for k, v in result.items() if _finite(v)}
            # The test loss is a metric once: the final evaluation's event logged it (at the last step),
            # unless that event never reached metrics.jsonl.
            if "test_loss" in numbers and "test_loss" not in self.client.get_run(mlflow_run_id).data.metrics:
                ts, step = int((finished_at or time.time()) * 1000), int(result.get("step") or 0)
                self.client.log_batch(
                    mlflow_run_id, metrics=[Metric("test_loss", float(numbers["test_loss"]), ts, step)]
                )
            tags.update({RESULT_TAG + k: _number(v) for k, v in numbers.items() if k not in LOSSES})
        # A succeeded run's completions (trainer/sample.py): samples.json, samples.md to read in the UI, and the
        # greedy completion of the first prompt as the tag orch.sample (a column of the runs table on request).
        samples = read_samples(run_dir)
        if samples is not None and (first := samples.greedy()) is not None:
            tags[SAMPLE_TAG] = _tag_text(first.prompt + first.text)
        self.set_tags(mlflow_run_id, tags)
        for name in ("config.json", "result.json", SAMPLES, "train.log"):
            if (run_dir / name).exists():
                self.client.log_artifact(mlflow_run_id, str(run_dir / name))
        if samples is not None:
            self.client.log_text(mlflow_run_id, markdown(samples, "Samples of this run"), "samples.md")
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

    def set_parent(self, child_run_id: str, parent_run_id: str, changes: dict | None = None) -> None:
        """Nest a trial's run under the sweep in the MLflow UI (the standard mlflow.parentRunId tag); `changes`:
        the trial's parameters, as its orch.changes tag."""
        tags = {"mlflow.parentRunId": parent_run_id}
        if changes:
            tags[CHANGES_TAG] = format_changes(changes)
        self.set_tags(child_run_id, tags)

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
        """Log the files to the experiment's "report" run (made once, then reused) in the MLflow experiment
        "EXPERIMENT/reports" (report_experiment): apart from the training runs, whose table, charts and
        comparisons it would only clutter; return its MLflow id."""
        note = f"The pages `orch report {experiment}` wrote: open the run **report**, then its artifacts, index.html."
        exp_id = self._experiment(report_experiment(experiment), {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: note})
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{KIND_TAG}` = 'report'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(exp_id, run_name="report", tags={KIND_TAG: "report"}).info.run_id
        for path in files:
            self.client.log_artifact(run_id, str(path))  # same names each time: a new report replaces the old
        self.client.set_terminated(run_id)
        return run_id

    # -- the UI -------------------------------------------------------------------------------------------

    def ui_pages(self, experiment: str | None = None) -> list[tuple[str, str]]:
        """(name, MLflow id) of the experiment `orch ui` opens, or without one of every experiment that holds
        orch runs; each is made to show as model training with orch's view (an experiment tracked by an older
        orch gets them here). ValueError naming the known ones for an experiment MLflow does not have."""
        if experiment is not None:
            if self.client.get_experiment_by_name(experiment) is None:
                known = [e.name for e in self.client.search_experiments(max_results=200) if e.name != "Default"]
                raise ValueError(
                    f"MLflow at {self.uri} has no experiment named {experiment!r}; "
                    f"known: {', '.join(sorted(known)) or 'none'}"
                )
            return [(experiment, self.experiment_id(experiment))]
        pages = []
        for exp in self.client.search_experiments(max_results=200, order_by=["name ASC"]):
            if self.client.search_runs([exp.experiment_id], filter_string="tags.`orch.run_id` != ''", max_results=1):
                pages.append((exp.name, self.experiment_id(exp.name)))
        return pages

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


def experiment_tags(spec=None) -> dict[str, str]:
    """The tags an orch experiment's MLflow experiment holds: model training, orch's saved view, and with a
    spec its tags and its note."""
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, VIEW_VERSION_TAG: VIEW_VERSION}
    if spec is not None:
        tags.update({k: str(v) for k, v in spec.tags.items()})
        if note := experiment_note(spec):
            tags[NOTE_TAG] = note
    return tags


def report_experiment(experiment: str) -> str:
    """The MLflow experiment of an experiment's reports ('/' is in no orch name: it never meets one)."""
    return f"{experiment}/{REPORTS}"


def format_changes(changes: dict) -> str:
    """An intervention's changes as a tag value: `model.dropout=0.0, optim.grad_clip=3.5`; `(none)`."""
    text = ", ".join(f"{k}={v!r}" for k, v in changes.items()) or NO_CHANGES
    return text if len(text) <= 5000 else text[:4999] + "…"  # MLflow keeps 8,000 characters of a tag


def _tag_text(text: str) -> str:
    return text if len(text) <= 5000 else text[:4999] + "…"  # MLflow keeps 8,000 characters of a tag


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(v: int | float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


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

"""Notes and tags on experiments, from Python: `note` is `orch note`, `tag` is `orch tag`. They are stored on
the experiment's spec (a resubmitted file keeps them) and carried to MLflow: tags as the experiment's tags,
the description and notes as its note (tracking.py), at once where the experiment is already tracked."""

from __future__ import annotations

from orchestrator import submission
from orchestrator.api.connection import connect
from orchestrator.api.runs import Db, known_experiments
from orchestrator.specs import Experiment, check_name
from orchestrator.tracking import open_tracker


def note(experiment: str, text: str, *, mlflow: str | None = None, track: bool = True, db: Db = None) -> Experiment:
    """Add a note to an experiment (kept with its spec, shown in MLflow as part of its note)."""
    if not text.strip():
        raise ValueError('a note needs some text: orch note EXPERIMENT "what you noticed"')
    return _annotate(experiment, mlflow, track, db, note=text.strip())


def tag(
    experiment: str,
    tags: dict[str, str] | None = None,
    *,
    remove: list[str] | tuple = (),
    mlflow: str | None = None,
    track: bool = True,
    db: Db = None,
) -> Experiment:
    """Set (and with `remove`, drop) an experiment's tags, here and on its MLflow experiment."""
    tags = tags or {}
    if not tags and not remove:
        raise ValueError("give a tag to set, KEY=VALUE (e.g. owner=ana), or one to drop with --remove KEY")
    for key in [*tags, *remove]:
        try:
            check_name(key, "tag")
        except ValueError as exc:
            raise ValueError(f"{exc} (a tag is KEY=VALUE, e.g. owner=ana)") from None
    return _annotate(experiment, mlflow, track, db, tags=tags, drop=tuple(remove))


def _annotate(experiment, mlflow, track, db, **change) -> Experiment:
    engine = connect(db)
    known_experiments(engine, [experiment])
    spec = submission.annotate(engine, experiment, **change)
    tracker = open_tracker(mlflow, track)
    if tracker is not None:
        tracker.describe_experiment(spec, removed=change.get("drop", ()))
    return spec

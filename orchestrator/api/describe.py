"""One run in detail and two runs side by side, from Python: `show` is `orch show`, `diff` is `orch diff`
(orchestrator/describe.py does the work)."""

from __future__ import annotations

from orchestrator import describe
from orchestrator.api.connection import connect
from orchestrator.api.runs import Db, find_run
from orchestrator.describe import RunDiff, RunView


def show(run: str, *, runs_dir: str = "runs", db: Db = None) -> RunView:
    """A run (a unique id prefix is enough): its experiments and arms with each intervention's changes, what
    its config differs in from the baseline run it pairs with, state, results, run directory and MLflow run."""
    engine = connect(db)
    return describe.show(engine, find_run(run, db=engine), runs_dir)


def diff(a: str, b: str, *, db: Db = None) -> RunDiff:
    """Two runs (unique id prefixes): the config keys in which they differ, and their results side by side."""
    engine = connect(db)
    return describe.diff(find_run(a, db=engine), find_run(b, db=engine))

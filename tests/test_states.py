"""The transition table is the state machine: every write of a run's state goes through queue.py (or, creating
the run, submission.py), and they move a run exactly as states.MOVES says — no more, no less."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sqlalchemy as sa

from orchestrator import queries, queue, runspec, specs, states, submission
from orchestrator.db import Run, connect
from orchestrator.states import Event, IllegalMove, RunState
from trainer.rundir import Status

REPO = Path(__file__).resolve().parents[1]
# queue.py moves stored runs; submission.py creates them (submit, import). No other module writes a run.
STATE_LAYER = (REPO / "orchestrator" / "queue.py", REPO / "orchestrator" / "submission.py")


def _product_modules():
    for pkg in ("orchestrator", "trainer"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "migrations" not in path.parts:  # a schema migration may backfill columns; it runs no moves
                yield path


def _writes_runs(node: ast.AST) -> bool:
    """sa.update(Run) / insert(Run) / delete(Run), Run.__table__, or raw SQL that writes the runs table."""
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
        "update",
        "insert",
        "delete",
    ):
        return any(isinstance(a, ast.Name) and a.id == "Run" for a in node.args)
    if isinstance(node, ast.Attribute) and node.attr == "__table__":
        return isinstance(node.value, ast.Name) and node.value.id == "Run"
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        sql = " ".join(node.value.upper().split())
        return any(w in sql for w in ("UPDATE RUNS", "INSERT INTO RUNS", "DELETE FROM RUNS"))
    return False


def test_only_the_state_layer_writes_runs():
    offenders = []
    for path in _product_modules():
        if path in STATE_LAYER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _writes_runs(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"runs written outside orchestrator/queue.py and submission.py: {offenders}"
    for layer in STATE_LAYER:
        assert any(_writes_runs(n) for n in ast.walk(ast.parse(layer.read_text()))), "the scan finds nothing at all"


def test_the_state_layer_sets_state_only_through_the_table():
    """In queue.py a `state=` value is written only by `_move` (an event's target), and in submission.py only
    by the two inserts, whose state is the table's move from "not stored yet"."""
    trees = {layer.name: ast.parse(layer.read_text()) for layer in STATE_LAYER}
    writers = {name: set() for name in trees}
    for name, tree in trees.items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, ast.keyword) and node.arg == "state":
                        writers[name].add(fn.name)
    assert writers == {"queue.py": {"_move"}, "submission.py": {"submit", "add_imported"}}
    for name in ("submit", "add_imported"):
        tree = trees["submission.py"]
        fn = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == name)
        assert "move(None, Event." in ast.unparse(fn)


def test_table_is_complete_and_refuses_the_rest():
    assert states.FINAL | states.ACTIVE == frozenset(RunState) and not states.FINAL & states.ACTIVE
    for event in Event:
        assert states.sources(event), f"{event} can never happen"
        states.target(event)  # one target per event
    for s in [None, *RunState]:
        for event in Event:
            if (s, event) in states.MOVES:
                assert states.move(s, event) == states.MOVES[(s, event)]
            else:
                with pytest.raises(IllegalMove):
                    states.move(s, event)
    # a final run is left alone by everything but a retry (a success not even by that)
    for s in states.FINAL:
        assert {e for (src, e) in states.MOVES if src == s} <= {Event.RETRY}
    with pytest.raises(
        IllegalMove,
        match=r"run abc is succeeded: only a run that is cancelled, diverged, failed, "
        r"pruned can be retried \(`orch retry`\)",
    ):
        states.move("succeeded", Event.RETRY, "abc")


def _one_run_in(eng, state: RunState, worker: str = "w") -> str:
    """A new run put in `state` directly (tests may; product code may not), as if worker `w` had it."""
    exp = specs.Experiment(name=f"in-{state}", base={"run.seed": 1000 + list(RunState).index(state)})
    [run] = submission.submit(eng, exp, runspec.expand(exp), max_attempts=3).queued
    with eng.begin() as conn:
        conn.execute(
            sa.update(Run)
            .where(Run.id == run.id)
            .values(
                state=str(state),
                worker=worker if state == RunState.RUNNING else None,
                heartbeat_at=0.0,
                attempts=1 if state == RunState.RUNNING else 0,
                open_launch=1 if state == RunState.RUNNING else None,
                launches=1,
            )
        )
    return run.id


def _state(eng, run_id: str) -> RunState:
    return RunState(queries.find(eng, run_id)[0].state)


# Each public write, as the event it asks for, and how to ask it.
def _finish(status):
    return lambda eng, rid: queue.finish(eng, rid, "w", status)


CALLS = {
    Event.CLAIM: lambda eng, rid: queue.claim(eng, "w2", 5),
    Event.CANCEL: lambda eng, rid: queue.cancel(eng, [rid]),
    Event.RETRY: lambda eng, rid: queue.retry(eng, [rid]),
    Event.LOSE: lambda eng, rid: queue.requeue_stale(eng, grace_s=1.0),
    Event.SUCCEED: _finish(Status.SUCCEEDED),
    Event.DIVERGE: _finish(Status.DIVERGED),
    Event.PRUNE: _finish(Status.PRUNED),
    Event.PREEMPT: _finish(Status.PREEMPTED),
    Event.CRASH: lambda eng, rid: queue.finish(eng, rid, "w", Status.FAILED),  # attempts left: retried
    Event.FAIL: lambda eng, rid: queue.finish(eng, rid, "w", Status.FAILED, count=False),
}


@pytest.mark.parametrize("event", list(CALLS), ids=str)
def test_every_write_moves_exactly_as_the_table_says(db_url, event):
    eng = connect(db_url)
    for state in RunState:
        rid = _one_run_in(eng, state)
        CALLS[event](eng, rid)
        expected = states.MOVES.get((state, event), state)  # not in the table: nothing moves
        assert _state(eng, rid) == expected, f"{event} on a {state} run"
        if expected != state:  # out of the way of the next starting state's claim or reaping
            queue.cancel(eng, [rid])  # (a no-op for a final run)


def test_user_moves_report_the_refusal_in_the_tables_words(db_url):
    eng = connect(db_url)
    rid = _one_run_in(eng, RunState.SUCCEEDED)
    moves = queue.cancel(eng, [rid, "0000000000000000"])  # an unknown id is neither moved nor refused
    assert moves.done == [] and [str(m) for m in moves.refused] == [
        f"run {rid} is succeeded: only a run that is queued, running can be cancelled"
    ]
    assert _state(eng, rid) == RunState.SUCCEEDED
    assert queue.retry(eng, [rid]).refused[0].state == RunState.SUCCEEDED

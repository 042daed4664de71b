"""The queue's state transitions, against SQLite and a real PostgreSQL server alike."""

from __future__ import annotations

import collections
import threading
import time

import pytest
import sqlalchemy as sa

from orchestrator import leases, queries, queue, runspec, specs, submission
from orchestrator.db import SchemaError, connect


def experiment(n_seeds=2, name="exp", **kw):
    return specs.Experiment(
        name=name, interventions=[specs.Intervention(name="nodrop", set={"model.dropout": 0})], seeds=n_seeds, **kw
    )


def test_submit_queues_then_reuses(db_url):
    eng = connect(db_url)
    exp = experiment()
    runs = runspec.expand(exp)
    first = submission.submit(eng, exp, runs)
    assert len(first.queued) == 4 and not first.reused
    again = submission.submit(eng, exp, runs)
    assert not again.queued and len(again.reused) == 4
    # Another experiment with the same baseline shares its runs.
    other = specs.Experiment(
        name="other", interventions=[specs.Intervention(name="bias", set={"model.qkv_bias": True})], seeds=2
    )
    rep = submission.submit(eng, other, runspec.expand(other))
    assert len(rep.queued) == 2 and {r.arm for r, _ in rep.reused} == {"baseline"}
    assert queries.counts(eng) == {"queued": 6}
    assert {(e, a) for e, a, _ in queries.runs_of(eng, ["other"])} == {("other", "baseline"), ("other", "bias")}


def test_claim_heartbeat_finish(db_url):
    eng = connect(db_url)
    exp = experiment()
    submission.submit(eng, exp, runspec.expand(exp))
    [run] = queue.claim(eng, "w1", 1)
    assert run.state == "running" and run.worker == "w1" and run.attempts == 0 and run.launches == 1
    assert queue.start(eng, run, "w1") and run.attempts == 1 and run.open_launch == 1  # its trainer starts
    assert not queue.start(eng, run, "w2")  # not w2's run
    assert queue.heartbeat(eng, "w1", {run.id: {"step": 3}}).owned == {run.id: None}
    beat = queue.heartbeat(eng, "w2", {run.id: {"step": 3}})  # not w2's run
    assert beat.owned == {} and beat.lost == {run.id: "taken over"}
    assert queue.request_stop(eng, [run.id], "pruned") == [run.id]
    assert queue.heartbeat(eng, "w1", {run.id: {"step": 4, "val_curve": [[2, 9.5], [4, 9.1]]}}).owned == {
        run.id: "pruned"
    }
    assert queue.finish(eng, run.id, "w1", "succeeded", result={"test_loss": 7.5, "step": 12}) == "succeeded"
    assert queue.finish(eng, run.id, "w1", "failed") is None  # a finished run is never modified
    [done] = queries.find(eng, run.id)
    assert done.state == "succeeded" and done.test_loss == 7.5 and done.finished_at is not None


def test_failures_retry_until_attempts_run_out(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp), max_attempts=2)
    [r] = queue.claim(eng, "w", 1)
    assert queue.start(eng, r, "w")
    assert queue.finish(eng, r.id, "w", "failed", exit_code=1, error="boom") == "queued"
    [r] = queue.claim(eng, "w", 1)
    assert r.attempts == 1 and queue.start(eng, r, "w") and r.attempts == 2
    assert queue.finish(eng, r.id, "w", "failed", exit_code=1, error="boom again") == "failed"
    [r] = queries.find(eng, r.id)
    assert r.error == "boom again" and r.exit_code == 1 and r.attempts == 2
    assert queue.retry(eng, [r.id]).done == [r.id]
    [r] = queue.claim(eng, "w", 1)
    assert queue.start(eng, r, "w") and r.attempts == 1
    # Preemption hands the run back without using up an attempt.
    assert queue.finish(eng, r.id, "w", "preempted") == "queued"
    [r] = queue.claim(eng, "w", 1)
    assert r.attempts == 0
    # A launch that fails before its trainer starts counts too (or a broken set-up would retry forever) ...
    assert queue.finish(eng, r.id, "w", "failed", error="launch failed") == "queued"
    [r] = queue.claim(eng, "w", 1)
    assert r.attempts == 1
    # ... but a claim handed back before it started anything (a full disk, a worker stopping) costs nothing.
    assert queue.finish(eng, r.id, "w", "preempted") == "queued"
    assert queries.find(eng, r.id)[0].attempts == 1


def test_stale_runs_are_requeued_on_the_database_clock(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1)
    submission.submit(eng, exp, runspec.expand(exp))
    a, b = queue.claim(eng, "dead", 2)
    time.sleep(0.6)
    queue.heartbeat(eng, "dead", {b.id: {}})  # b still beats
    assert queue.requeue_stale(eng, 0.5) == [a.id]
    assert queries.counts(eng) == {"queued": 1, "running": 1}
    assert queue.heartbeat(eng, "dead", {a.id: {}}).lost == {
        a.id: "taken over"
    }  # the old worker learns it lost the run


def test_cancel(db_url):
    eng = connect(db_url)
    exp = experiment()
    submission.submit(eng, exp, runspec.expand(exp))
    [running] = queue.claim(eng, "w", 1)
    assert len(queue.cancel(eng, [r.id for _, _, r in queries.runs_of(eng)]).done) == 4
    assert queries.counts(eng) == {"cancelled": 4}
    assert queue.heartbeat(eng, "w", {running.id: {}}).lost == {running.id: "cancelled"}


def _lose(eng, worker: str = "dead"):
    """Claim the one queued run as `worker` and start it, let it go stale, requeue it and claim it again as
    "next": the started launch is still open for "next" to judge."""
    [r] = queue.claim(eng, worker, 1)
    assert queue.start(eng, r, worker)
    time.sleep(0.05)
    assert queue.requeue_stale(eng, 0.0) == [r.id]
    [again] = queue.claim(eng, "next", 1)
    assert again.open_launch == r.launches and again.launches == r.launches + 1
    assert not queue.start(eng, again, "next")  # not before the open launch is judged
    return r, again


def test_a_lost_launch_that_checkpointed_costs_no_attempt(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp), max_attempts=2)
    for _ in range(5):  # five worker deaths, each after its trainer checkpointed: never "no attempts left"
        lost, r = _lose(eng)
        ending = {"status": "preempted", "launch_id": lost.launch_id(), "step": 4}
        assert queue.judge_lost(eng, r, "next", ending) == "launch" and r.attempts == 0
        assert queue.judge_lost(eng, r, "next", ending) == "launch" and r.attempts == 0  # judged once only
        assert queue.start(eng, r, "next") and r.attempts == 1
        assert queue.finish(eng, r.id, "next", "preempted") == "queued"
    [r] = queries.find(eng, r.id)
    assert r.attempts == 0 and r.state == "queued" and r.open_launch is None and r.launches == 10


def test_a_lost_launch_without_an_ending_was_a_crash(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp), max_attempts=2)
    lost, r = _lose(eng)
    assert queue.judge_lost(eng, r, "next", None) == "launch" and r.attempts == 1  # counted: one left
    assert queue.start(eng, r, "next") and r.attempts == 2
    time.sleep(0.05)
    queue.requeue_stale(eng, 0.0)
    [r] = queue.claim(eng, "third", 1)
    assert r.attempts == 2 and queue.judge_lost(eng, r, "third", None) == "failed"
    [r] = queries.find(eng, r.id)
    assert r.state == "failed" and "no attempts left" in r.error


def test_a_lost_launch_that_finished_is_recorded_not_retrained(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp))
    lost, r = _lose(eng)
    ending = {"status": "succeeded", "launch_id": lost.launch_id(), "test_loss": 6.25, "step": 12, "exit_code": 0}
    assert queue.judge_lost(eng, r, "next", ending) == "succeeded"
    [r] = queries.find(eng, r.id)
    assert r.state == "succeeded" and r.test_loss == 6.25 and r.exit_code == 0


def test_a_claim_that_never_started_costs_nothing_and_leaves_the_open_launch_open(db_url):
    """A dies after starting launch 1; B claims launch 2 and dies while waiting for the directory; C judges
    launch 1 (which checkpointed): no attempt is charged for either."""
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp))
    lost, b = _lose(eng, "A")
    time.sleep(0.05)
    queue.requeue_stale(eng, 0.0)  # B never started anything
    [c] = queue.claim(eng, "C", 1)
    assert c.open_launch == lost.launches == 1 and c.launches == 3
    ending = {"status": "preempted", "launch_id": lost.launch_id()}
    assert queue.judge_lost(eng, c, "C", ending) == "launch" and c.attempts == 0


def test_shared_names_the_other_experiments_of_a_run(db_url):
    eng = connect(db_url)
    a = specs.Experiment(name="a", interventions=[specs.Intervention(name="x", set={"optim.lr": 1e-3})])
    b = specs.Experiment(name="b")  # its baseline is a's baseline: one run, two experiments
    submission.submit(eng, a, runspec.expand(a))
    submission.submit(eng, b, runspec.expand(b))
    ids = {arm: r.id for exp, arm, r in queries.runs_of(eng, ["a"])}
    assert queries.shared(eng, ids.values(), "a") == {ids["baseline"]: ["b"]}
    assert queries.shared(eng, ids.values(), "b") == {ids["x"]: ["a"]}


def test_a_lease_has_one_holder_until_its_beats_stop(db_url):
    eng = connect(db_url)
    assert leases.take(eng, "sweep:s", "a", grace_s=0.5) is None
    assert leases.take(eng, "sweep:s", "b", grace_s=0.5).startswith("a (last beat")
    assert leases.take(eng, "sweep:s", "a", grace_s=0.5) is None  # the holder renews
    assert leases.take(eng, "sweep:other", "b", grace_s=0.5) is None  # leases are per name
    time.sleep(0.7)
    assert leases.take(eng, "sweep:s", "b", grace_s=0.5) is None  # a's beats stopped: b takes over
    assert leases.take(eng, "sweep:s", "a", grace_s=0.5).startswith("b ")  # and a learns it lost
    leases.release(eng, "sweep:s", "a")  # not a's to release: nothing happens
    assert leases.take(eng, "sweep:s", "c", grace_s=60).startswith("b ")
    leases.release(eng, "sweep:s", "b")
    assert leases.take(eng, "sweep:s", "c", grace_s=60) is None  # released: taken at once


def test_a_spec_another_version_wrote_keeps_the_tables_stacks_and_looks(db_url):
    from orchestrator.db import Experiment as ExperimentRow

    eng = connect(db_url)
    a = specs.Experiment(name="a", seeds=2, interventions=[specs.Intervention(name="x", set={"optim.lr": 1e-3})])
    submission.submit(eng, a, runspec.expand(a))
    raw = {
        "name": "old",
        "future_key": 1,
        "looks": {"first": 2, "last": 6},
        "interventions": [{"name": "p"}, {"name": "q"}, {"name": "pq", "stack": ["p", "q"], "extra": True}],
    }
    with eng.begin() as conn:
        conn.execute(sa.insert(ExperimentRow).values(name="old", spec=raw, created_at=0.0))
    got = queries.specs(eng)
    assert got["a"].seeds == 2 and got["old"].looks == specs.Looks(first=2, last=6)
    assert [i.stack for i in got["old"].interventions] == [[], [], ["p", "q"]]


def test_eight_concurrent_claimers_claim_each_run_exactly_once(db_url):
    eng = connect(db_url)
    exp = specs.Experiment(name="many", seeds=200)
    submission.submit(eng, exp, runspec.expand(exp))
    claimed: collections.Counter = collections.Counter()
    errors = []
    lock = threading.Lock()

    def claimer(i):
        try:
            own = connect(db_url)  # one engine (and connection pool) per worker, as separate processes have
            while batch := queue.claim(own, f"w{i}", 2):
                with lock:
                    claimed.update(r.id for r in batch)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(claimed) == 200 and set(claimed.values()) == {1}
    assert queries.counts(eng) == {"running": 200}
    with eng.connect() as conn:
        from orchestrator.db import Run

        owners = conn.execute(sa.select(Run.worker, sa.func.count()).group_by(Run.worker)).all()
    assert sum(n for _, n in owners) == 200


def test_old_schema_is_refused_with_the_upgrade_command(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    connect(url)
    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.exec_driver_sql("UPDATE orch_alembic_version SET version_num = '0000'")
    with pytest.raises(SchemaError, match="newer orch"):
        connect(url)
    foreign = f"sqlite:///{tmp_path / 'foreign.db'}"
    with sa.create_engine(foreign).begin() as conn:
        conn.exec_driver_sql("CREATE TABLE runs (x int)")
    with pytest.raises(SchemaError, match="no orch schema version"):
        connect(foreign)


def test_unreachable_database_is_one_clear_error():
    with pytest.raises(SchemaError, match="cannot connect"):
        connect("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(SchemaError, match="not a database URL"):
        connect("results.db")


def test_a_database_from_the_previous_schema_is_refused_then_upgraded_with_its_data(tmp_path):
    from alembic import command

    from orchestrator import migrations

    url = f"sqlite:///{tmp_path / 'v1.db'}"
    raw = sa.create_engine(url)
    command.upgrade(migrations.alembic_config(raw), "0001")  # what orch wrote before the sweep columns
    with raw.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO runs (id, state, config, seed, data_seed, repeat, priority, attempts, "
            "max_attempts, created_at, test_loss) VALUES ('abc', 'succeeded', '{}', 42, 0, 0, 0, 1, 3, 0, 3.7)"
        )
    head = migrations.head(raw)
    assert head >= "0004"
    with pytest.raises(SchemaError, match=rf"schema 0001, this orch needs {head}.*orch db upgrade"):
        connect(url)
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "db", "upgrade", "--db", url], capture_output=True, text=True
    )
    assert out.returncode == 0 and f"0001 -> {head}" in out.stdout, out.stderr
    [run] = queries.find(connect(url), "abc")
    assert run.test_loss == 3.7 and run.val_curve is None and run.stop is None
    assert leases.take(connect(url), "sweep:s", "a", grace_s=60) is None  # 0004's table is there


def test_non_finite_numbers_are_stored_as_null_on_both_databases(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp))
    [r] = queue.claim(eng, "w", 1)
    assert queue.heartbeat(eng, "w", {r.id: {"train_loss": float("nan"), "val_curve": [[2, float("inf")]]}}).owned == {
        r.id: None
    }
    result = {"status": "diverged", "train_loss": float("nan"), "diverged_step": 7, "test_loss": None}
    assert queue.finish(eng, r.id, "w", "diverged", result=result) == "diverged"
    [r] = queries.find(eng, r.id)
    assert r.result["train_loss"] is None and r.result["diverged_step"] == 7 and r.val_curve == [[2, None]]


def test_a_prune_request_outlives_a_preemption(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1, include_baseline=False)
    submission.submit(eng, exp, runspec.expand(exp))
    [r] = queue.claim(eng, "w", 1)
    queue.request_stop(eng, [r.id], "pruned")
    # The worker was stopped (SIGTERM) before it passed the request on: the trainer says "preempted".
    assert queue.finish(eng, r.id, "w", "preempted", result={"status": "preempted", "step": 3}) == "pruned"


def test_find_treats_like_wildcards_as_characters(db_url):
    eng = connect(db_url)
    exp = experiment(n_seeds=1)
    submission.submit(eng, exp, runspec.expand(exp))
    assert queries.find(eng, "%") == [] and queries.find(eng, "_") == []
    [r] = queue.claim(eng, "w", 1)
    assert [x.id for x in queries.find(eng, r.id[:6])] == [r.id]

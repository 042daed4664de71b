"""A run over two nodes on a real (throwaway, localhost) two-node Slurm cluster: an experiment of `nodes=2`, a
pilot of `--nodes-per-job 2`, and the run trained by one srun task per node (a torchrun agent each, joined by
a c10d rendezvous on the first node) with exactly the numbers of the same run trained by one local worker as
two processes on one node. Needs Debian's slurm-wlm and munge (tests/slurm_cluster.py), and a Slurm that can
run two slurmd on one host."""

from __future__ import annotations

import pytest

from tests.conftest import read_result, train_losses
from tests.slurm_cluster import SlurmCluster, install
from tests.test_slurm_pilots import Site, wait_for_pilots, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster():
    ok, reason = install(timeout=240)
    if not ok:
        pytest.skip(f"no Slurm: {reason}")
    try:
        c = SlurmCluster(nodes=2).start()
    except RuntimeError as exc:
        pytest.skip(f"cannot start a two-node Slurm cluster here: {str(exc).splitlines()[0]}")
    try:
        yield c
    finally:
        c.stop()


def test_a_two_node_pilot_trains_a_two_node_run_like_one_node_with_two_processes(cluster, tmp_path, data_dir):
    local, pilot = Site(tmp_path, cluster, "local"), Site(tmp_path, cluster, "pilots")
    # The same run (nodes is not part of a run's id): on one node here, on two nodes there.
    local.orch("submit", str(local.experiment(data_dir, "wide", steps=12, seeds=1)))
    pilot.orch("submit", str(pilot.experiment(data_dir, "wide", steps=12, seeds=1, nodes=2)))
    local.orch(
        "worker", "--until-empty", "--nproc-per-node", "2", "--runs-dir", str(local.runs), "--no-mlflow", timeout=600
    )
    [job] = pilot.pilots("--nodes-per-job", "2", "--time", "10", "--no-mlflow")
    wait_for_pilots(cluster, [job], pilot, timeout=600)
    [(run_id, run)] = pilot.run_rows().items()
    [(local_id, want)] = local.run_rows().items()
    assert run_id == local_id
    assert run.state == "succeeded", pilot.pilot_log() + (pilot.runs / run_id / "train.log").read_text()
    assert want.state == "succeeded" and (run.nodes, want.nodes) == (2, 1)
    assert run.slurm_job == job and run.node
    result = read_result(pilot.runs / run_id)
    assert result["environment"]["world_size"] == 2
    assert read_result(local.runs / run_id)["environment"]["world_size"] == 2
    log = (pilot.runs / run_id / "train.log").read_text()
    assert "srun" in log and "--nnodes=2" in log and "--rdzv-backend=c10d" in log
    losses = train_losses(pilot.runs / run_id)
    assert [s for s, _ in losses] == list(range(1, 13))
    assert losses == train_losses(local.runs / run_id)
    assert run.test_loss == want.test_loss and result["test_loss"] == want.test_loss


def test_a_two_node_pilot_requeued_mid_run_resumes_the_run_exactly(cluster, tmp_path, data_dir):
    """`scontrol requeue` (what a preemption does): SIGTERM to every process on both nodes; the ranks
    checkpoint, the run goes back to the queue with no attempt used, and the requeued pilot resumes it over
    two nodes again: every step once, the numbers of one uninterrupted node with two processes."""
    local, pilot = Site(tmp_path, cluster, "local"), Site(tmp_path, cluster, "pilots")
    base = {"run.checkpoint_interval": 5, "run.log_interval": 1}
    local.orch("submit", str(local.experiment(data_dir, "wide", steps=60, seeds=1, **base)))
    pilot.orch("submit", str(pilot.experiment(data_dir, "wide", steps=60, seeds=1, nodes=2, **base)))
    local.orch(
        "worker", "--until-empty", "--nproc-per-node", "2", "--runs-dir", str(local.runs), "--no-mlflow", timeout=600
    )
    [job] = pilot.pilots("--nodes-per-job", "2", "--time", "10", "--no-mlflow")
    [run_id] = pilot.run_rows()
    metrics = pilot.runs / run_id / "metrics.jsonl"
    wait_until(
        "step 12", lambda: metrics.exists() and len(train_losses(pilot.runs / run_id)) >= 12, 300, pilot, cluster
    )
    cluster.run("scontrol", "requeue", job)
    wait_for_pilots(cluster, [job], pilot, timeout=600)
    run = pilot.run_rows()[run_id]
    assert run.state == "succeeded", pilot.pilot_log() + (pilot.runs / run_id / "train.log").read_text()[-5000:]
    assert run.attempts == 1 and run.launches >= 2, (run.attempts, run.launches, pilot.pilot_log())
    result = read_result(pilot.runs / run_id)
    assert result["launches"] >= 2 and result["environment"]["world_size"] == 2
    losses = train_losses(pilot.runs / run_id)
    assert [s for s, _ in losses] == list(range(1, 61))
    assert losses == train_losses(local.runs / run_id)
    assert run.test_loss == local.run_rows()[run_id].test_loss


def test_a_two_node_pilot_warned_of_its_walltime_stops_the_run_and_requeues_itself(cluster, tmp_path, data_dir):
    """The walltime warning (USR1 to the batch shell, i.e. the worker): the worker's STOP file reaches rank 0
    through the shared directory, both nodes checkpoint, srun ends, the run goes back to the queue with no
    attempt used, and the pilot requeues itself since a two-node run is left; it then finishes the run."""
    site = Site(tmp_path, cluster)
    base = {"run.checkpoint_interval": 50, "run.log_interval": 1}
    site.orch("submit", str(site.experiment(data_dir, "warned", steps=60, seeds=1, nodes=2, **base)))
    [job] = site.pilots("--nodes-per-job", "2", "--time", "10", "--no-mlflow")
    [run_id] = site.run_rows()
    wait_until("step 12", lambda: len(train_losses(site.runs / run_id)) >= 12, 300, site, cluster)
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    wait_for_pilots(cluster, [job], site, timeout=600)
    run = site.run_rows()[run_id]
    log = site.pilot_log()
    assert run.state == "succeeded", log + (site.runs / run_id / "train.log").read_text()[-5000:]
    assert "requeued" in log and run.attempts == 1 and run.launches >= 2, (run.attempts, run.launches, log)
    steps = [s for s, _ in train_losses(site.runs / run_id)]
    assert steps == list(range(1, 61))  # stopped between checkpoints: it checkpointed where it stopped

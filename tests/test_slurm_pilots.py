"""Slurm pilots on a real (throwaway, localhost) Slurm cluster: `orch slurm workers` finishes a study with the
same numbers as a local worker; a pilot requeued mid-run (what a preemption does) and a pilot whose walltime
ends mid-run lose no run and no step, and keep one MLflow run per orch run; Slurm's own refusal of a pilot
comes before anything is submitted. Needs Debian's slurm-wlm and munge (tests/slurm_cluster.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import queries
from orchestrator.db import connect
from tests.conftest import FAST, read_result, results_db, subprocess_env, train_losses
from tests.slurm_cluster import SlurmCluster, install

# Pilots start, train, requeue and wait for Slurm: minutes, not pytest-timeout's default 300 s.
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1200)]
ORCH = [sys.executable, "-m", "orchestrator.cli"]


@pytest.fixture(scope="module")
def cluster():
    ok, reason = install(timeout=240)
    if not ok:
        pytest.skip(f"no Slurm: {reason}")
    c = SlurmCluster(nodes=1).start()
    try:
        yield c
    finally:
        c.stop()


class Site:
    """One database, MLflow store and runs directory, used from the login node (this process) and pilots."""

    def __init__(self, tmp_path: Path, cluster: SlurmCluster, name: str = "site"):
        self.root = tmp_path / name
        self.root.mkdir()
        self.db = results_db(self.root)
        self.mlflow = f"sqlite:///{self.root / 'mlflow.db'}"
        self.runs = self.root / "runs"
        self.env = {**subprocess_env(), **cluster.env, "ORCH_DB": self.db, "ORCH_MLFLOW": self.mlflow}

    def orch(self, *args: str, code: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [*ORCH, *args], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == code, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
        return out

    def experiment(
        self, data_dir: Path, name: str, steps: int, seeds: int, arms: str = "", nodes: int = 1, **base
    ) -> Path:
        path = self.root / f"{name}.py"
        base = {**FAST, "data.path": str(data_dir), "run.steps": steps, **base}
        path.write_text(
            "from orchestrator.specs import Experiment, Intervention\n"
            f"experiment = Experiment(name={name!r}, preset='tiny', base={base!r}, seeds={seeds}, nodes={nodes},\n"
            f"    interventions=[{arms}])\n"
        )
        return path

    def pilots(self, *args: str) -> list[str]:
        out = self.orch("slurm", "workers", "--runs-dir", str(self.runs), "--cpus-per-node", "1", *args)
        line = out.stdout.strip().splitlines()[-1]
        assert line.startswith("submitted "), out.stdout
        return line.split(": ", 1)[1].split(" (")[0].split(", ")

    def states(self) -> dict[str, str]:
        engine = connect(self.db)
        try:
            return {m.run.id: m.run.state for m in queries.runs_of(engine)}
        finally:
            engine.dispose()

    def run_rows(self):
        engine = connect(self.db)
        try:
            return {m.run.id: m.run for m in queries.runs_of(engine)}
        finally:
            engine.dispose()

    def pilot_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((self.runs / "pilots").glob("*.out")))


def wait_until(what: str, check, timeout: float, site: Site, cluster: SlurmCluster, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}\n--- pilots ---\n{site.pilot_log()}\n--- slurm ---\n{cluster.logs()}")


def wait_for_pilots(cluster: SlurmCluster, jobs: list[str], site: Site, timeout: float) -> None:
    wait_until(
        "the pilots to finish",
        lambda: all(cluster.squeue_state(j) in (None, "COMPLETED") for j in jobs),
        timeout,
        site,
        cluster,
    )


@pytest.mark.timeout(2400)  # 20 runs on 2 cores: ~8 minutes alone, 20 beside another suite
def test_pilots_finish_the_quickstart_study_with_the_leaderboard_of_a_local_worker(cluster, tmp_path, data_dir):
    """experiments/quickstart.py itself (at 2 of its 3 seeds: 10 runs), on the session's synthetic corpus: two
    1-CPU pilots reach the leaderboard that `orch worker` (as `make demo` runs it) reaches, number for number."""
    quickstart = str(Path(__file__).resolve().parent.parent / "experiments" / "quickstart.py")
    local, pilot = Site(tmp_path, cluster, "local"), Site(tmp_path, cluster, "pilots")
    for site in (local, pilot):
        site.orch("submit", quickstart, "--seeds", "2", "--set", f"data.path={data_dir}")
    local.orch("worker", "--until-empty", "--parallel", "2", "--runs-dir", str(local.runs), "--no-mlflow", timeout=900)
    jobs = pilot.pilots("--jobs", "2", "--time", "20", "--warn", "60", "--no-mlflow")
    assert len(jobs) == 2
    wait_for_pilots(cluster, jobs, pilot, timeout=1500)
    assert set(pilot.states().values()) == {"succeeded"}, pilot.pilot_log()
    got, want = pilot.run_rows(), local.run_rows()
    assert len(got) == 10 and sorted(got) == sorted(want)  # the same run ids: the same configs
    assert {i: r.test_loss for i, r in got.items()} == {i: r.test_loss for i, r in want.items()}
    assert all(r.slurm_job in jobs and r.node for r in got.values())  # where each trained is recorded
    table = json.loads(pilot.orch("table", "quickstart", "--format", "json").stdout)
    assert table == json.loads(local.orch("table", "quickstart", "--format", "json").stdout)
    listing = pilot.orch("ls", "quickstart").stdout
    assert all(f"slurm job {r.slurm_job}" in listing for r in got.values())


def reference_losses(tmp_path: Path, data_dir: Path, run) -> list[tuple[int, float]]:
    """The run's per-step losses when trained straight through by the trainer alone."""
    ref = tmp_path / "reference"
    (ref / "cfg").mkdir(parents=True)
    (ref / "cfg" / "config.json").write_text(json.dumps(run.config))
    out = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", str(ref / "cfg" / "config.json"), "--run-dir", str(ref / "run")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return train_losses(ref / "run")


def mlflow_steps(site: Site, run_id: str) -> list[int]:
    """The `loss` steps MLflow holds for the orch run, after checking that it holds exactly one MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(site.mlflow)
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`orch.run_id` = '{run_id}'"
    )
    assert len(found) == 1, [r.info.run_id for r in found]
    assert found[0].data.tags.get("orch.slurm_job")
    return sorted(m.step for m in client.get_metric_history(found[0].info.run_id, "loss"))


def test_a_pilot_requeued_mid_run_loses_no_run_and_no_step(cluster, tmp_path, data_dir):
    """`scontrol requeue` is what a preemption does to the job: SIGTERM to every process, then the job runs
    again. The trainer checkpoints, the run goes back to the queue with no attempt used, and the requeued
    pilot resumes it: every step exactly once, the numbers of a straight run, one MLflow run."""
    site = Site(tmp_path, cluster)
    site.orch(
        "submit",
        str(
            site.experiment(
                data_dir, "preempt", steps=200, seeds=1, **{"run.checkpoint_interval": 20, "run.log_interval": 1}
            )
        ),
    )
    [job] = site.pilots("--time", "10", "--warn", "60")
    run_id = next(iter(site.run_rows()))
    metrics = site.runs / run_id / "metrics.jsonl"
    wait_until("step 30", lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 30, 240, site, cluster)
    cluster.run("scontrol", "requeue", job)
    wait_for_pilots(cluster, [job], site, timeout=420)
    run = site.run_rows()[run_id]
    assert run.state == "succeeded", site.pilot_log()
    assert run.attempts == 1 and run.launches >= 2, (run.attempts, run.launches)
    assert int(cluster.job_info(job).get("Restarts", "0") or 0) >= 1 or run.launches >= 2
    assert read_result(site.runs / run_id)["launches"] >= 2
    assert train_losses(site.runs / run_id) == reference_losses(tmp_path, data_dir, run)
    # MLflow: the run's points were sent as they came, across the requeue, each step once.
    site.orch("sync")
    assert mlflow_steps(site, run_id) == list(range(1, 201))


def test_a_walltime_that_ends_mid_run_hands_the_run_on(cluster, tmp_path, data_dir):
    """A 1-minute pilot warned 50 s ahead (Slurm may warn a little early) stops its trainer, hands the run
    back and requeues itself; the run completes over several pilot starts with the numbers of a straight run."""
    site = Site(tmp_path, cluster)
    site.orch(
        "submit",
        str(
            site.experiment(
                data_dir, "walltime", steps=200, seeds=1, **{"run.checkpoint_interval": 10, "run.log_interval": 1}
            )
        ),
    )
    [job] = site.pilots("--time", "1", "--warn", "50", "--no-mlflow")
    run_id = next(iter(site.run_rows()))
    wait_for_pilots(cluster, [job], site, timeout=600)
    run = site.run_rows()[run_id]
    assert run.state == "succeeded", site.pilot_log()
    assert run.attempts == 1 and run.launches >= 2, (run.attempts, run.launches, site.pilot_log())
    assert "requeued" in site.pilot_log()
    assert train_losses(site.runs / run_id) == reference_losses(tmp_path, data_dir, run)


def test_slurm_refuses_an_impossible_pilot_before_anything_is_submitted(cluster, tmp_path):
    site = Site(tmp_path, cluster)
    out = site.orch("slurm", "workers", "--runs-dir", str(site.runs), "--partition", "nosuch", code=2)
    assert out.stderr.startswith("error: sbatch refused the pilot, nothing was submitted:"), out.stderr
    assert "partition" in out.stderr.lower()
    assert cluster.run("squeue", "--noheader").stdout.strip() == ""

"""Slurm pilots without a cluster: the batch script, the refusals before anything is submitted, the GPUs a
worker takes inside an allocation, and a run whose checkpoint only another host can see.

tests/test_slurm_pilots.py runs pilots on a real one-node Slurm cluster (the `slurm` marker)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import sqlalchemy as sa
import sqlalchemy.orm

from orchestrator import queue, slurm, specs
from orchestrator.db import Run, connect
from orchestrator.worker import Worker, detect_gpus, plan_slots
from tests.conftest import FAST, subprocess_env

ORCH = [sys.executable, "-m", "orchestrator.cli"]


def orch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ORCH, *args], capture_output=True, text=True, timeout=60, env=env or subprocess_env())


def test_the_dry_run_prints_the_exact_batch_script(tmp_path):
    env = {**subprocess_env(), "ORCH_DB": "postgresql+psycopg://orch:s3cret@db.example/orch"}
    out = orch(
        "slurm",
        "workers",
        "--dry-run",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--time",
        "2-00:00:00",
        "--account",
        "lab",
        "--warn",
        "240",
        "--runs-dir",
        str(tmp_path / "my runs"),
        "--sbatch-arg=--qos=high",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "#!/bin/bash"
    options = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    for want in (
        "--job-name=orch-pilot",
        "--nodes=1",
        "--time=2-00:00:00",
        "--signal=B:USR1@240",
        "--requeue",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
    ):
        assert want in options, (want, options)
    # The worker is exec'd (so it, not a shell, gets USR1), with its arguments quoted as one shell word each.
    exec_line = lines[-1]
    assert exec_line.startswith("exec ")
    argv = shlex.split(exec_line.removeprefix("exec "))
    assert argv[1:5] == ["-m", "orchestrator.cli", "worker", "--until-empty"] and "--slurm-requeue" in argv
    assert argv[argv.index("--runs-dir") + 1] == str(tmp_path / "my runs")
    assert "s3cret" not in out.stdout and "ORCH_DB" not in exec_line  # the URL travels in the environment
    assert not (tmp_path / "my runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize(
    "args, says",
    [
        (["--time", "forever"], "is not a Slurm time"),
        (["--time", "4"], "leaves no training before"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be 0"),
        (["--partition", "gpu;rm -rf /"], "is not a Slurm name"),
        (["--account", "a b"], "is not a Slurm name"),
        (["--sbatch-arg=--signal=USR2@60"], "sets what the pilot sets itself"),
        (["--sbatch-arg=-t5"], "sets what the pilot sets itself"),
        (["--sbatch-arg=qos=high"], "is not an sbatch option"),
        (["--sbatch-arg=--comment=two words"], "whitespace"),
        (["--nodes-per-job", "2"], "not supported by pilots yet"),
        (["--warn", "5"], "at least 10 s"),
        (["--db", "postgresql+psycopg://orch:pw@host/orch"], "password"),
    ],
)
def test_bad_options_are_refused_before_anything_is_submitted(tmp_path, args, says):
    out = orch("slurm", "workers", "--runs-dir", str(tmp_path / "runs"), *args)
    assert out.returncode == 2, out
    assert out.stderr.startswith("error: ") and says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # no script written, nothing handed to sbatch


@pytest.mark.parametrize(
    "text, s",
    [("90", 5400), ("10:30", 630), ("1:00:00", 3600), ("2-0", 172800), ("1-02:03", 93780), ("0-00:00:30", 30)],
)
def test_walltimes_parse_as_sbatch_reads_them(text, s):
    assert slurm.TIME_FORMS.match(text) and slurm.seconds(text) == s


def test_inside_an_allocation_the_worker_takes_the_gpus_slurm_gave_it(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []


def test_a_run_whose_checkpoint_another_host_holds_is_not_restarted_from_step_0(tmp_path, data_dir):
    """A runs directory that is not shared: the run trained to step 7 on node-a, this worker (another host)
    sees no checkpoint of it. It says so, hands the run back without using an attempt, and exits when only
    such runs are left, instead of training the run again from the start."""
    engine = connect(f"sqlite:///{tmp_path / 'results.db'}")
    exp = specs.Experiment(name="moved", preset="tiny", base={**FAST, "data.path": str(data_dir), "run.steps": 12})
    queue.submit(engine, exp, specs.expand(exp))
    with engine.begin() as conn:  # as a pilot on node-a would have left it: claimed, started, beaten to step 7
        conn.execute(sa.update(Run).values(node="node-a", slurm_job="41", step=7, launches=1))
    said: list[str] = []
    w = Worker(engine, runs_dir=tmp_path / "runs", slots=plan_slots(None, 1, 1), echo=said.append)
    assert w.run(until_empty=True) == 0
    with sa.orm.Session(engine) as session:
        run = session.execute(sa.select(Run)).scalar_one()
    assert run.state == "queued" and run.attempts == 0 and run.step == 7
    assert "no checkpoint of it is visible here" in run.error and "node-a" in run.error
    assert any("not restarting it from step 0" in line for line in said)
    assert not (tmp_path / "runs" / run.id / "metrics.jsonl").exists()  # no trainer started

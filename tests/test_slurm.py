"""Slurm pilots without a cluster: the batch script, the refusals before anything is submitted, the GPUs a
worker takes inside an allocation, and a run whose checkpoint only another host can see.

tests/test_slurm_pilots.py runs pilots on a real one-node Slurm cluster (the `slurm` marker)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys

import pytest
import sqlalchemy as sa
import sqlalchemy.orm

from orchestrator import queue, runspec, slurm, specs, submission
from orchestrator.db import Run, connect
from orchestrator.launchers import Slot
from orchestrator.launchers.slurm import SlurmLauncher, srun_command
from orchestrator.node import detect_gpus, plan_slots
from orchestrator.worker import Worker
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
        (["--nodes-per-job", "2", "--parallel", "2"], "drop --parallel"),
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
    submission.submit(engine, exp, runspec.expand(exp))
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


def test_a_pilot_of_two_nodes_runs_one_worker_over_both(tmp_path):
    out = orch("slurm", "workers", "--dry-run", "--nodes-per-job", "2", "--runs-dir", str(tmp_path / "runs"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks-per-node=1" in lines
    argv = shlex.split(lines[-1].removeprefix("exec "))
    assert argv[argv.index("--nodes") + 1] == "2" and "--parallel" not in argv


def test_runs_are_claimed_only_by_workers_spanning_as_many_nodes(tmp_path, data_dir):
    """An experiment's `nodes` is stored on its runs (not in their ids); a one-node worker never takes a
    two-node run, a two-node worker never a one-node run, and a resubmission keeps the stored count."""
    engine = connect(f"sqlite:///{tmp_path / 'results.db'}")
    base = {**FAST, "data.path": str(data_dir), "run.steps": 12}
    one = specs.Experiment(name="one", preset="tiny", base=base, seeds=2)
    two = specs.Experiment(name="two", preset="tiny", base={**base, "run.steps": 14}, seeds=2, nodes=2)
    runs_one, runs_two = runspec.expand(one), runspec.expand(two)
    assert {r.nodes for r in runs_one} == {1} and {r.nodes for r in runs_two} == {2}
    # nodes is launch resources: the same config on two nodes is the same run
    assert [r.id for r in runspec.expand(one.model_copy(update={"nodes": 2}))] == [r.id for r in runs_one]
    submission.submit(engine, one, runs_one)
    submission.submit(engine, two, runs_two)
    submission.submit(engine, two.model_copy(update={"nodes": 3}), runspec.expand(two.model_copy(update={"nodes": 3})))
    assert queue.claim(engine, "w3", 10, nodes=3) == []  # the reused runs kept nodes=2
    got2 = queue.claim(engine, "w2", 10, nodes=2)
    assert sorted(r.id for r in got2) == sorted(r.id for r in runs_two) and {r.nodes for r in got2} == {2}
    assert queue.claim(engine, "w2b", 10, nodes=2) == []
    got1 = queue.claim(engine, "w1", 10)
    assert sorted(r.id for r in got1) == sorted(r.id for r in runs_one) and {r.nodes for r in got1} == {1}
    with pytest.raises(ValueError, match="nodes"):
        specs.Experiment(name="zero", nodes=0)


def test_the_slurm_launcher_starts_one_torchrun_agent_per_node(tmp_path, monkeypatch):
    """The exact command of a 2-node launch: srun, one task per node, torchrun with a c10d rendezvous at the
    first node's NodeAddr (read with scontrol: node names need not resolve), the trainer on the run directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a7\\ngpu-a8\\n"; exit 0; fi\n'
        'echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1"\n'
        'echo "   NodeAddr=10.1.2.7 NodeHostName=$3 Version=22.05"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{subprocess_env()['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu-a[7-8]")
    run = Run(id="abc", launches=3)
    run_dir = tmp_path / "runs" / "abc"
    cmd = SlurmLauncher("w", nodes=2, nproc_per_node=1).command(run, Slot(0, ["0", "1", "2", "3"]), run_dir)
    assert calls.read_text().splitlines() == ["show hostnames gpu-a[7-8]", "show node gpu-a7"]
    endpoint = next(a for a in cmd if a.startswith("--rdzv-endpoint=")).split("=", 1)[1]
    assert endpoint.startswith("10.1.2.7:") and int(endpoint.rsplit(":", 1)[1]) > 0
    py = sys.executable
    assert cmd == [
        py, "-m", "trainer.runlock", str(bin_dir / "srun"),
        "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--quit-on-interrupt",
        "--job-name=abc.3", "--gpus-per-node=4",
        py, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", "--rdzv-id=abc.3",
        "-m", "trainer", "--config", str(run_dir / "config.json"), "--run-dir", str(run_dir),
    ]  # fmt: skip
    # A CPU slot: nproc_per_node ranks per node, no GPUs asked of srun.
    cpu = srun_command(run_dir, "abc.3", 3, 2, "10.0.0.1:29500", srun="srun")
    assert "--gpus-per-node" not in " ".join(cpu) and "--nproc-per-node=2" in cpu and "--nnodes=3" in cpu


def test_a_worker_over_two_nodes_has_one_slot_and_claims_two_node_runs(tmp_path, monkeypatch):
    from orchestrator.launchers.slurm import SlurmLauncher as Launcher

    engine = connect(f"sqlite:///{tmp_path / 'results.db'}")
    w = Worker(engine, runs_dir=tmp_path / "runs", slots=plan_slots(None, 1, 1), nodes=2, echo=lambda _: None)
    assert isinstance(w.launcher, Launcher) and w.launcher.nodes == 2
    with pytest.raises(ValueError, match="one slot"):
        Worker(engine, runs_dir=tmp_path / "runs", slots=plan_slots(None, 1, 2), nodes=2)


def test_the_slurm_handle_stops_its_step_by_name_and_kills_through_srun(tmp_path, monkeypatch):
    """stop(): SIGTERM to the tasks of the launch's own step (srun would end the step on SIGTERM, leaving no
    checkpoint); kill(): SIGINT to srun (--quit-on-interrupt ends the step), then SIGKILL."""
    from orchestrator.launchers.slurm import SlurmHandle

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "squeue").write_text('#!/bin/sh\nprintf "7.0|abc.3\\n7.1|other.1\\n"\n')
    (bin_dir / "scancel").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{subprocess_env()['PATH']}")
    # srun sets its own SIGINT handler; the stand-in must not inherit SIGINT ignored (a test run started in the
    # background by a non-interactive shell has it so, and `sleep` would then outlive the kill).
    srun = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    handle = SlurmHandle(srun, "abc.3", "7")
    handle.stop()
    assert calls.read_text().splitlines() == ["--signal=TERM 7.0"]
    assert handle.poll() is None and "job 7" in handle.describe()
    handle.kill()
    assert handle.proc.wait(timeout=10) == -2  # SIGINT


def test_a_worker_over_several_nodes_outside_such_an_allocation_is_refused(tmp_path):
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("SLURM_")}
    db = tmp_path / "results.db"
    out = orch("worker", "--nodes", "2", "--db", f"sqlite:///{db}", "--no-mlflow", env=env)
    assert out.returncode == 2 and out.stderr.startswith("error: --nodes 2 needs a Slurm allocation"), out.stderr
    assert "Traceback" not in out.stderr and not db.exists()


def test_status_asks_squeue_only_when_told(tmp_path, monkeypatch):
    """`orch status --watch` reads the database every second but squeue only every SQUEUE_EVERY_S."""
    from orchestrator import api

    asked = []
    monkeypatch.setattr(
        slurm, "pilots", lambda: asked.append(1) or [slurm.Pilot("7", "RUNNING", 1, "n1", "1:00", "2:00")]
    )
    db = f"sqlite:///{tmp_path / 'results.db'}"
    connect(db)  # an empty queue
    assert api.status(db, pilots=False).pilots == [] and asked == []
    assert [p.job_id for p in api.status(db).pilots] == ["7"] and asked == [1]

"""The throwaway Slurm cluster of tests/slurm_cluster.py: it starts, runs batch jobs and steps on one and two
emulated nodes, requeues, signals, preempts, hands out fake GPUs, and leaves nothing running when stopped.

Needs Debian's slurm-wlm and munge (installed here when root with apt-get; skipped otherwise)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, install, slurm_version

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    ok, reason = install(timeout=240)  # within pytest-timeout's 300 s; CI installs the packages beforehand
    if not ok:
        pytest.skip(f"no Slurm: {reason}")
    # Two emulated nodes (two slurmd on this host) with two fake GPUs each; one node if the build cannot.
    try:
        c = SlurmCluster(nodes=2, gpus=2).start()
    except RuntimeError:
        c = SlurmCluster(nodes=1, gpus=2).start()
    try:
        yield c
    finally:
        c.stop()


def trace_script(path: Path, trace: Path) -> Path:
    """A batch script that logs its start and every signal it gets to `trace`, then sleeps until killed."""
    path.write_text(
        "#!/bin/bash\n"
        f'log() {{ echo "$*" >> {trace}; }}\n'
        'log "start restart=${SLURM_RESTART_COUNT:-0}"\n'
        'for s in USR1 USR2 TERM INT HUP; do trap "log got $s" $s; done\n'
        # A short foreground sleep: bash runs a trap only once the command in the foreground returns.
        "while true; do sleep 0.2; done\n"
    )
    return path


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_startup_time_and_version(cluster, capsys):
    with capsys.disabled():
        print(
            f"\n[slurm] {slurm_version()}: {cluster.nodes} node(s) × {cluster.cpus} CPUs up in "
            f"{cluster.startup_s:.2f}s ({cluster.root})"
        )
    assert cluster.node_states() == {n: "idle" for n in cluster.node_names}


def test_sbatch_wait_runs_a_script(cluster, tmp_path):
    out = tmp_path / "out.txt"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\necho "job $SLURM_JOB_ID on $SLURMD_NODENAME" > {out}\n')
    done = cluster.run("sbatch", "--parsable", "--wait", "-o", str(tmp_path / "slurm-%j.out"), str(script))
    job = done.stdout.strip()
    word, job_id, on, node = out.read_text().split()  # written before sbatch --wait returned
    assert (word, job_id, on) == ("job", job, "on") and node in cluster.node_names
    assert cluster.wait_job(job, timeout=10) == "COMPLETED"


def test_srun_hostname(cluster):
    out = cluster.run("srun", "-N1", "hostname")
    assert out.stdout.strip() == socket.gethostname()  # every emulated node is this host


def test_srun_on_two_nodes(cluster):
    if cluster.nodes < 2:
        pytest.skip("this Slurm build cannot run two slurmd on one host")
    out = cluster.run("srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME")
    assert sorted(out.stdout.split()) == ["n1", "n2"]


def test_fake_gpus_are_allocated(cluster):
    one = cluster.run("srun", "-N1", "--gpus-per-node=1", "printenv", "CUDA_VISIBLE_DEVICES").stdout.strip()
    two = cluster.run("srun", "-N1", "--gpus-per-node=2", "printenv", "CUDA_VISIBLE_DEVICES").stdout.strip()
    assert one in ("0", "1") and two == "0,1"
    refused = cluster.run("srun", "-N1", "--gpus-per-node=3", "true", check=False)
    assert refused.returncode != 0


def test_scancel_batch_signal_reaches_the_script(cluster, tmp_path):
    trace = tmp_path / "trace"
    job = cluster.sbatch(["-o", "/dev/null", str(trace_script(tmp_path / "job.sh", trace))])
    wait_for(lambda: lines(trace), 30, "the job to start")
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: "got USR1" in lines(trace), 10, "USR1 in the batch script")
    # Without --batch (or --full) a signal goes to the job's steps only, not to the batch script.
    cluster.run("scancel", "--signal=USR2", job)
    time.sleep(1.5)
    assert "got USR2" not in lines(trace)
    assert cluster.squeue_state(job) == "RUNNING"
    cluster.run("scancel", job)  # SIGTERM to the script, SIGKILL after KillWait
    assert cluster.wait_job(job, timeout=30) == "CANCELLED"
    assert "got TERM" in lines(trace)


def test_scontrol_requeue_restarts_the_job(cluster, tmp_path):
    trace = tmp_path / "trace"
    job = cluster.sbatch(["-o", "/dev/null", str(trace_script(tmp_path / "job.sh", trace))])
    wait_for(lambda: lines(trace), 30, "the job to start")
    t0 = time.monotonic()
    cluster.run("scontrol", "requeue", job)
    # SIGTERM to the script, SIGKILL after KillWait, back to PENDING (Reason=BeginTime: held cred_expire
    # seconds), then a second run with SLURM_RESTART_COUNT=1.
    wait_for(lambda: "start restart=1" in lines(trace), 60, "the requeued job to start again")
    print(f"requeue -> running again in {time.monotonic() - t0:.1f}s")
    assert lines(trace)[:2] == ["start restart=0", "got TERM"]
    assert cluster.job_info(job)["Restarts"] == "1"
    cluster.run("scancel", "--signal=KILL", job)
    # --no-requeue jobs refuse it.
    other = cluster.sbatch(["--no-requeue", "-o", "/dev/null", "--wrap", "sleep 60"])
    refused = cluster.run("scontrol", "requeue", other, check=False)
    assert refused.returncode != 0 and "disabled" in refused.stderr
    cluster.run("scancel", "--signal=KILL", other)


def test_urgent_partition_preempts_and_requeues(cluster, tmp_path):
    trace = tmp_path / "trace"
    node = cluster.node_names[0]
    low = cluster.sbatch(
        ["-w", node, "-c", str(cluster.cpus), "-o", "/dev/null", str(trace_script(tmp_path / "job.sh", trace))]
    )
    wait_for(lambda: lines(trace), 30, "the low-priority job to start")
    high = cluster.sbatch(["-p", "urgent", "-w", node, "-c", "1", "-o", "/dev/null", "--wrap", "true"])
    assert cluster.wait_job(high, timeout=60) == "COMPLETED"
    assert "got TERM" in lines(trace)
    wait_for(lambda: "start restart=1" in lines(trace), 60, "the preempted job to be requeued and restarted")
    cluster.run("scancel", "--signal=KILL", low)


def test_stop_leaves_nothing_running(tmp_path):
    ok, reason = install(timeout=240)
    if not ok:
        pytest.skip(f"no Slurm: {reason}")
    c = SlurmCluster(nodes=1).start()
    root, name = c.root, c.name
    try:
        # A job that leaves an orphan behind (proctrack/linuxproc loses it once its parent exits) and one
        # still running.
        c.sbatch(["-o", "/dev/null", "--wrap", "setsid sleep 600 & sleep 0.5"])
        running = c.sbatch(["-o", "/dev/null", "--wrap", "sleep 600"])
        wait_for(lambda: c.squeue_state(running) == "RUNNING", 30, "the job to run")
        daemons = list(c._procs.values())
    finally:
        c.stop()
    assert not root.exists()
    leftovers = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                env = (d / "environ").read_bytes()
                status = (d / "status").read_text()
            except OSError:
                continue
            ours = f"SLURM_CLUSTER_NAME={name}".encode() in env or str(root).encode() in env
            if ours and "State:\tZ" not in status:  # zombies wait for init to reap them; they run nothing
                leftovers.append(d.name)
    assert not leftovers
    assert all(p.poll() is not None for p in daemons)

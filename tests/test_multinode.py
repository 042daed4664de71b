"""One run over two "nodes": two torchrun agents on 127.0.0.1 joined by a c10d rendezvous, one rank each, sharing
the run directory (as nodes share a filesystem), against one `torchrun --standalone --nproc-per-node 2`.

The world size is 2 either way, so the trainer must not be able to tell the layouts apart: global rank r reads
the same shard of each global batch (TrainOrder.micro_batch shards by RANK, never LOCAL_RANK, which is 0 on both
nodes here), draws the same dropout masks (seeded by RANK, restored per RANK from a checkpoint), and gloo sums
the same two gradients. Every logged number must therefore be equal with ==, not approximately: a sum of two
floats is commutative, so an all-reduce over 2 ranks gives every rank the same bits whatever the transport.

- two nodes train exactly like one node with two processes;
- two nodes stopped by a STOP file (each agent reports its rank's exit code 75) and relaunched as two nodes
  continue with the same numbers;
- a run checkpointed by two nodes and resumed by one node with two processes does too (same world size,
  another agent layout: a checkpoint's RNG states and data position belong to global ranks, not to nodes).

The agents use the rendezvous a Slurm launch uses (c10d); since both run on one host and would both claim the
store from the endpoint's address, `--rdzv-conf is_host=1|0` says which one serves it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TORCHRUN, read_result, set_args, subprocess_env, wait_for_step
from trainer import checkpoint
from trainer.rundir import checkpoint_paths, read_metrics

# Four trainer launches of ~12-20 s each (torch's start-up dominates) and one of ~10 s: over a minute on the
# 2-core VM, so not in the default suite (run with -m slow).
pytestmark = pytest.mark.slow

# The tiny preset at 16 tokens (as tests/test_golden.py), dropout 0.1 as configured: 12 steps of 8 sequences,
# 4 per rank as 2 micro-batches of 2 (accumulation under DDP's no_sync), clipping on some steps and not others,
# cosine schedule with warm-up, shuffled data, a validation at step 6, checkpoints every 4 steps.
OVERRIDES = {
    "model.context_length": 16,
    "run.batch_size": 8,
    "run.micro_batch_size": 2,
    "run.steps": 12,
    "run.log_interval": 1,
    "run.checkpoint_interval": 4,
    "eval.interval": 6,
    "eval.val_sequences": 8,
    "eval.test_sequences": 32,
    "optim.grad_clip": 1.65,
    "schedule.kind": "cosine",
    "schedule.warmup_steps": 3,
    "schedule.min_lr_ratio": 0.1,
    "data.order": "shuffled",
    "data.seed": 7,
}
STEPS = OVERRIDES["run.steps"]
STEP_KEYS = ("loss", "grad_norm", "lr", "clipped")
LAUNCH_TIMEOUT = 180  # seconds for one launch (rendezvous, training, exit) before its agents are killed
# What torchrun's agent prints for a failed worker: its global rank, its local rank, and its exit code.
FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def trainer_args(run_dir: Path, data_dir: Path) -> list[str]:
    sets = {"data.path": str(data_dir), **OVERRIDES}
    return ["-m", "trainer", "--preset", "tiny", "--run-dir", str(run_dir), *set_args(sets)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(scratch: Path) -> dict:
    """A node's own environment: nothing inherited from a launcher around pytest, its own temporary directory
    (where torchrun keeps its per-node logs)."""
    env = subprocess_env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    scratch.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(scratch)
    return env


class Launch:
    """The torchrun agents of one launch of a run, with their output in files (no pipe to fill up)."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "w") as out, open(self.logs / f"{name}.err", "w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        proc.name = name
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> tuple[str, str]:
        return (self.logs / f"{proc.name}.out").read_text(), (self.logs / f"{proc.name}.err").read_text()

    def wait(self, timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
        """(exit code, stdout, stderr) of every agent; an agent still running at the deadline fails the test."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                tails = "\n".join(f"--- {p.name}:\n{self.output(p)[1][-3000:]}" for p in self.procs)
                raise AssertionError(f"launch still running after {timeout} s:\n{tails}") from None
        return [(p.returncode, *self.output(p)) for p in self.procs]

    def kill(self) -> None:
        """SIGKILL whatever of the launch is still running: each agent and its trainers (which torchrun starts
        in sessions of their own, so they are found by parent pid before their agent goes)."""
        for proc in self.procs:
            if proc.poll() is None:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=30)


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def start_two_nodes(launch: Launch, run_dir: Path, data_dir: Path, scratch: Path) -> None:
    """Two agents, one process each, started together: node0 serves the rendezvous store."""
    port, run_id = free_port(), f"mn-{os.getpid()}-{time.monotonic_ns()}"
    for node in (0, 1):
        cmd = [
            TORCHRUN,
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            run_id,
            "--rdzv-conf",
            f"is_host={1 if node == 0 else 0}",
            *trainer_args(run_dir, data_dir),
        ]
        launch.start(f"node{node}", cmd, node_env(scratch / f"node{node}"))


def start_one_node(launch: Launch, run_dir: Path, data_dir: Path, scratch: Path) -> None:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", *trainer_args(run_dir, data_dir)]
    launch.start("node", cmd, node_env(scratch / "node"))


def launch_and_wait(start, run_dir: Path, data_dir: Path, scratch: Path) -> list[tuple[int, str, str]]:
    launch = Launch(scratch / "logs")
    try:
        start(launch, run_dir, data_dir, scratch)
        return launch.wait()
    finally:
        launch.kill()


def succeeded(agents: list[tuple[int, str, str]]) -> None:
    for code, out, err in agents:
        assert code == 0, f"agent exit {code}\nstdout:\n{out}\nstderr:\n{err[-5000:]}"
    # Rank 0 alone prints the summary, whichever agent it landed on.
    assert sum("succeeded: test loss" in out for _, out, _ in agents) == 1, [out for _, out, _ in agents]


def observed(run_dir: Path) -> dict:
    """Every number of the run that does not depend on timing."""
    events, result = read_metrics(run_dir), read_result(run_dir)
    return {
        "steps": [(e["step"], *(e[k] for k in STEP_KEYS)) for e in events if "loss" in e],
        "val_losses": [(e["step"], e["val_loss"]) for e in events if "val_loss" in e],
        "test_loss": result["test_loss"],
        "result": {
            k: result[k]
            for k in ("status", "step", "tokens", "train_loss", "val_loss", "test_loss", "clipped_fraction")
        },
    }


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint_paths(run_dir)[-1])


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = observed(run_dir), observed(reference)
    assert [s[0] for s in got["steps"]] == list(range(1, STEPS + 1))
    moved = [(a, b) for a, b in zip(got["steps"], want["steps"]) if a != b]
    assert not moved, f"(step, loss, grad_norm, lr, clipped) here vs. one node, where they differ: {moved}"
    assert got == want  # validation and test losses, the result's numbers: bit for bit
    result = read_result(run_dir)
    assert result["environment"]["world_size"] == 2
    assert (result["micro_batch_size"], result["grad_accum_steps"]) == (2, 2)
    # The final weights and every rank's RNG streams too, not only what was logged.
    a, b = final_state(run_dir), final_state(reference)
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["rng"]) == len(b["rng"]) == 2
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], b["rng"]))


@pytest.fixture(scope="module")
def one_node(data_dir, tmp_path_factory) -> Path:
    """The reference: the run uninterrupted on one node, two processes."""
    root = tmp_path_factory.mktemp("one-node")
    run = root / "run"
    succeeded(launch_and_wait(start_one_node, run, data_dir, root))
    result = read_result(run)
    assert result["status"] == "succeeded" and result["launches"] == 1
    assert 0 < result["clipped_fraction"] < 1  # the run clips on some steps, not all
    return run


def test_two_nodes_train_exactly_like_one_node(one_node, data_dir, tmp_path):
    run = tmp_path / "run"
    succeeded(launch_and_wait(start_two_nodes, run, data_dir, tmp_path))
    assert read_result(run)["launches"] == 1
    assert_same_run(run, one_node)


@pytest.fixture(scope="module")
def stopped_by_two_nodes(data_dir, tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """The run on two nodes, stopped by a STOP file once past its step-4 checkpoint: (run dir, agents).
    Tests resume copies of the directory."""
    root = tmp_path_factory.mktemp("stopped")
    run = root / "run"
    launch = Launch(root / "logs")
    try:
        start_two_nodes(launch, run, data_dir, root)
        wait_for_step(run, launch.procs[0], 5, timeout=LAUNCH_TIMEOUT)
        (run / "STOP").write_text("")
        agents = launch.wait()
    finally:
        launch.kill()
    return run, agents


def test_two_nodes_stopped_and_relaunched_continue_exactly(stopped_by_two_nodes, one_node, data_dir, tmp_path):
    stopped, agents = stopped_by_two_nodes
    # Each trainer exits 75 (preempted); torchrun reports it per rank and exits 1 itself. Both agents had a
    # local rank 0, and the two global ranks are 0 and 1.
    ranks = set()
    for code, out, err in agents:
        assert code != 0, f"agent exit {code}\nstdout:\n{out}\nstderr:\n{err[-5000:]}"
        failures = FAILURE.findall(err)
        assert len(failures) == 1, err[-5000:]
        rank, local_rank, exit_code = map(int, failures[0])
        assert (local_rank, exit_code) == (0, 75), err[-5000:]
        ranks.add(rank)
    assert ranks == {0, 1}
    result = read_result(stopped)
    assert (result["status"], result["exit_code"], result["test_loss"]) == ("preempted", 75, None)
    stopped_at = result["step"]
    assert 5 <= stopped_at < STEPS
    state = final_state(stopped)
    assert state["step"] == stopped_at and len(state["rng"]) == 2  # both ranks' RNG states, from two nodes
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank its own dropout

    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "STOP").unlink()
    succeeded(launch_and_wait(start_two_nodes, run, data_dir, tmp_path))
    assert any(e.get("event") == "resume" and e["step"] == stopped_at for e in read_metrics(run))
    assert read_result(run)["launches"] == 2
    assert_same_run(run, one_node)


def test_checkpoint_of_two_nodes_resumes_on_one_node(stopped_by_two_nodes, one_node, data_dir, tmp_path):
    stopped, _ = stopped_by_two_nodes
    stopped_at = read_result(stopped)["step"]
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    (run / "STOP").unlink()
    succeeded(launch_and_wait(start_one_node, run, data_dir, tmp_path))
    assert any(e.get("event") == "resume" and e["step"] == stopped_at for e in read_metrics(run))
    assert read_result(run)["launches"] == 2
    assert_same_run(run, one_node)

"""The golden tiny run: a fixed CPU config whose every logged number is committed in tests/golden/tiny_run.json.

The trainer must reproduce that file exactly (==, not approx): each step's training loss, gradient norm,
learning rate and clipped fraction, the validation losses, and the final test loss. It is the proof that a
change to the training loop (a refactor, a reordering of set-up steps) moved nothing: the same weights
initialised from the same RNG draws, the same batches in the same order, the same dropout masks, the same
optimizer arithmetic. The config exercises the parts of the loop that are easy to disturb silently:
gradient accumulation (2 micro-batches), clipping that triggers on some steps and not others, a cosine
schedule with warmup, shuffled data order, dropout, a mid-run validation and mid-run checkpoints.

A second test interrupts the same run (a STOP file, then a SIGKILL after a checkpoint) and resumes it: the
resumed run must reproduce the same golden numbers, because a checkpoint restores RNG states and the data
position along with the weights.

Bit-exact floats hold for one torch build on one kind of CPU (kernels differ between versions, instruction
sets and CPU models: the same file moved by ~2e-7 relative on an AMD EPYC with AVX2); the file records the
torch version, CPU and instruction set it was made with. Where all three match, the comparison is ==; elsewhere
it is to 1e-5 relative, and the resumed runs are in any case compared with == against a straight run made on
the same machine in the same session, which holds everywhere.

To regenerate the file deliberately (after a change that is *meant* to move the numbers, or on a new torch):

    ORCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -k reproduces_the_golden_file

then review the diff of tests/golden/tiny_run.json and commit it with the change that explains it.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, ok, read_result, set_args, subprocess_env, tiny_config, wait_for_step
from trainer.perf import cpu_name
from trainer.rundir import checkpoint_paths, read_metrics

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"
REGENERATE = os.environ.get("ORCH_REGEN_GOLDEN") == "1"

# The `tiny` preset with these overrides (data.path is the session's synthetic dataset from conftest.py).
# 40 steps of 8 × 16 tokens as 2 micro-batches of 4: a few seconds on one CPU thread.
OVERRIDES = {
    "model.context_length": 16,
    "run.batch_size": 8,
    "run.micro_batch_size": 4,
    "run.steps": 40,
    "run.log_interval": 1,
    "run.checkpoint_interval": 10,
    "eval.interval": 20,
    "eval.val_sequences": 8,
    "eval.test_sequences": 32,
    "optim.grad_clip": 1.65,
    "schedule.kind": "cosine",
    "schedule.warmup_steps": 5,
    "schedule.min_lr_ratio": 0.1,
    "data.order": "shuffled",
    "data.seed": 7,
}
STEP_KEYS = ("loss", "grad_norm", "lr", "clipped")


def golden_cmd(run_dir: Path, data_dir: Path) -> list[str]:
    sets = {"data.path": str(data_dir), **OVERRIDES}
    return [PYTHON, "-m", "trainer", "--preset", "tiny", "--run-dir", str(run_dir), *set_args(sets)]


def run_golden(run_dir: Path, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        golden_cmd(run_dir, data_dir), cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


def start_golden(run_dir: Path, data_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        golden_cmd(run_dir, data_dir),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def resolved_config(data_dir: Path) -> dict:
    """The run's full config as it identifies the run (trainer.identity.LATER_KEYS at their neutral value left
    out), without the (per-session) data path."""
    cfg = tiny_config(data_dir, **{k.replace(".", "__"): v for k, v in OVERRIDES.items()}).identity()
    cfg["data"].pop("path")
    return cfg


def dataset_identity(data_dir: Path) -> dict:
    meta = json.loads((data_dir / "meta.json").read_text())
    return {"sha256": meta["sha256"], "tokens": meta["tokens"]}


def observed(run_dir: Path) -> dict:
    """What the golden file pins, read from a finished run directory."""
    events = read_metrics(run_dir)
    result = read_result(run_dir)
    return {
        "steps": [{"step": e["step"], **{k: e[k] for k in STEP_KEYS}} for e in events if "loss" in e],
        "val_losses": [{"step": e["step"], "val_loss": e["val_loss"]} for e in events if "val_loss" in e],
        "test_loss": result["test_loss"],
        "result": {
            k: result[k]
            for k in (
                "status",
                "step",
                "tokens",
                "train_loss",
                "val_loss",
                "test_loss",
                "clipped_fraction",
                "micro_batch_size",
                "grad_accum_steps",
                "params",
            )
        },
    }


def write_golden(data_dir: Path, obs: dict) -> None:
    GOLDEN.parent.mkdir(exist_ok=True)
    golden = {
        "about": "tests/test_golden.py: a fixed tiny CPU run; regenerate with ORCH_REGEN_GOLDEN=1 (see there)",
        "preset": "tiny",
        "overrides": OVERRIDES,
        "config": resolved_config(data_dir),
        "dataset": dataset_identity(data_dir),
        "made_with": {**machine_kind(), "python": platform.python_version(), "machine": platform.machine()},
        **obs,
    }
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")


def load_golden() -> dict:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with ORCH_REGEN_GOLDEN=1 (see {__file__})")
    return json.loads(GOLDEN.read_text())


def machine_kind() -> dict:
    """What decides which floating-point kernels run: the torch build, the CPU model, its instruction set."""
    return {"torch": torch.__version__, "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def close(a, b) -> bool:
    """== for everything but floats, which may differ in their last bits on another kind of machine."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1e-2)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def assert_matches_golden(run_dir: Path, golden: dict) -> None:
    obs, made, here = observed(run_dir), golden["made_with"], machine_kind()
    exact = all(made.get(k) == v for k, v in here.items())
    same = (lambda a, b: a == b) if exact else close
    where = (
        f"(golden made with {', '.join(f'{k} {made.get(k)}' for k in here)}; this is "
        f"{', '.join(f'{k} {v}' for k, v in here.items())}: compared {'exactly' if exact else 'to 1e-5'})"
    )
    want = {(s["step"]): s for s in golden["steps"]}
    got = {(s["step"]): s for s in obs["steps"]}
    assert sorted(got) == sorted(want), f"logged steps differ: {sorted(got)} vs golden {sorted(want)}"
    moved = [
        (step, key, got[step][key], want[step][key])
        for step in sorted(want)
        for key in STEP_KEYS
        if not same(got[step][key], want[step][key])
    ]
    assert not moved, f"(step, key, now, golden) that moved {where}: {moved[:10]}"
    assert same(obs["val_losses"], golden["val_losses"]), where
    assert same(obs["test_loss"], golden["test_loss"]), where
    assert same(obs["result"], golden["result"]), where


@pytest.fixture(scope="module")
def golden(data_dir) -> dict:
    if REGENERATE:
        return {}
    g = load_golden()
    # A different config or dataset is not the trainer's doing: say so rather than report moved losses.
    assert g["config"] == resolved_config(data_dir), "the golden run's config changed (the tiny preset or a default)"
    assert g["dataset"] == dataset_identity(data_dir), "the synthetic dataset of conftest.py changed"
    return g


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory) -> Path:
    """The golden config run once, uninterrupted, on this machine."""
    run = tmp_path_factory.mktemp("golden") / "straight"
    ok(run_golden(run, data_dir))
    return run


def test_the_trainer_reproduces_the_golden_file(golden, data_dir, straight_run):
    run = straight_run
    if REGENERATE:
        write_golden(data_dir, observed(run))
        golden = load_golden()
    assert_matches_golden(run, golden)
    # The run's shape, so the file stays a test of what it says it tests.
    assert golden["result"]["grad_accum_steps"] == 2
    assert 0 < golden["result"]["clipped_fraction"] < 1  # some steps clip, some do not
    assert [v["step"] for v in golden["val_losses"]] == [20, 40]
    assert [p.name for p in checkpoint_paths(run)] == ["step_00000030.pt", "step_00000040.pt"]


def _interrupt(run: Path, data_dir: Path, how: str) -> int:
    """Start the golden run and interrupt it mid-way; return the step its newest checkpoint holds."""
    proc = start_golden(run, data_dir)
    try:
        if how == "stop":
            wait_for_step(run, proc, 13)
            (run / "STOP").write_text("")
            proc.communicate(timeout=120)
            assert proc.returncode == 75, proc.returncode
            assert read_result(run)["status"] == "preempted"
            (run / "STOP").unlink()
        else:
            wait_for_step(run, proc, 22)  # past the step-10 and step-20 checkpoints and the step-20 validation
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=120)
            assert not (run / "result.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    from trainer import checkpoint

    return checkpoint.load(checkpoint_paths(run)[-1])["step"]


@pytest.mark.skipif(REGENERATE, reason="regenerating the golden file")
@pytest.mark.parametrize("how", ["stop", "sigkill"])
def test_an_interrupted_and_resumed_run_reproduces_the_golden_file(golden, data_dir, straight_run, tmp_path, how):
    run = tmp_path / f"resumed-{how}"
    resumed_from = _interrupt(run, data_dir, how)
    assert 10 <= resumed_from < OVERRIDES["run.steps"]
    ok(run_golden(run, data_dir))
    assert any(e.get("event") == "resume" and e["step"] == resumed_from for e in read_metrics(run))
    assert read_result(run)["launches"] == 2
    assert observed(run) == observed(straight_run)  # bit-exact on any machine: resuming moves nothing
    assert_matches_golden(run, golden)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run: ORCH_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py -k reproduces_the_golden_file")

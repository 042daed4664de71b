"""End-to-end training in real subprocesses: the run directory, exact evaluation, resume after SIGKILL, STOP and
SIGTERM, divergence, 2-process gloo DDP, gradient accumulation, AMP, and refusing a mismatched config."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess

import pytest
import torch

from conftest import (
    FAST,
    PYTHON,
    REPO,
    TORCHRUN,
    ok,
    read_result,
    run_trainer,
    set_args,
    start_trainer,
    subprocess_env,
    tiny_config,
    train_losses,
    wait_for_step,
)
from trainer import checkpoint
from trainer.model import GPT
from trainer.presets import load
from trainer.rundir import checkpoint_paths, read_metrics

# The reference run: FAST with 16 steps (checkpoints at 4, 8, 12 and the end), the tiny preset's dropout 0.1,
# so that resuming must restore the RNG to reproduce the dropout masks.
BASE = {"run.steps": 16, "eval.interval": 8}
STEPS, G, T = 16, FAST["run.batch_size"], FAST["model.context_length"]


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("baseline") / "run"
    proc = ok(run_trainer(run, data_dir, BASE))
    return run, proc


def losses_and_norms(run_dir) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["grad_norm"]) for e in read_metrics(run_dir) if "loss" in e]


def raw_events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# The run directory


def test_run_directory_is_complete(baseline, data_dir):
    run, proc = baseline
    cfg = tiny_config(data_dir, **{k.replace(".", "__"): v for k, v in {**FAST, **BASE}.items()})
    # config.json: the resolved config, loadable as it is.
    assert json.loads((run / "config.json").read_text()) == cfg.model_dump(mode="json")
    assert load(str(run / "config.json")) == cfg
    assert cfg.model.dropout == 0.1

    lines = [e for e in read_metrics(run) if "loss" in e]
    assert [e["step"] for e in lines] == list(range(1, STEPS + 1))
    for e in lines:
        for key in ("step", "tokens", "loss", "lr", "grad_norm", "clipped", "tokens_per_s", "time"):
            assert key in e, (key, e)
        assert math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) and e["tokens_per_s"] > 0
        assert e["lr"] == 1e-3 and e["tokens"] == e["step"] * G * T
        assert e["clipped"] == 0.0 and e["loss_scale"] is None  # no clipping, fp32
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5  # it learns
    assert math.log(50257) - 0.1 < lines[0]["loss"] < math.log(50257) + 0.1

    assert [p.name for p in checkpoint_paths(run)] == ["step_00000012.pt", "step_00000016.pt"]  # keep 2
    mid_eval = [e for e in read_metrics(run) if "val_loss" in e and "test_loss" not in e]
    assert [e["step"] for e in mid_eval] == [8] and math.isfinite(mid_eval[0]["val_loss"])

    result = read_result(run)
    assert result["status"] == "succeeded"
    assert result["step"] == result["total_steps"] == STEPS
    assert result["tokens"] == STEPS * G * T
    assert math.isfinite(result["test_loss"]) and math.isfinite(result["val_loss"])
    assert result["test_loss"] < math.log(50257)
    assert result["train_loss"] == lines[-1]["loss"]
    assert result["params"] == GPT(cfg.model).num_params() == 6_533_632
    n_matmul = result["params"] - 50257 * 64 - T * 64  # every weight but the two embedding lookups
    assert result["flops_per_token"] == 6 * n_matmul + 12 * 2 * 64 * T
    assert result["mfu"] is None  # a CPU has no known peak
    assert result["micro_batch_size"] == G and result["grad_accum_steps"] == 1
    assert result["launches"] == 1 and result["diverged_step"] is None and result["clipped_fraction"] == 0.0
    assert result["tokens_per_s"] > 0 and result["wall_time_s"] > 0
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["world_size"] == 1 and env["python"]
    final = [e for e in read_metrics(run) if "test_loss" in e]
    assert len(final) == 1 and final[0]["test_loss"] == result["test_loss"] and final[0]["step"] == STEPS
    assert "succeeded: test loss" in proc.stdout


def _evaluate(*args) -> dict:
    proc = subprocess.run(
        [PYTHON, "-m", "trainer.evaluate", *map(str, args), "--json"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_evaluate_reproduces_the_test_loss_exactly(baseline):
    run, _ = baseline
    result = read_result(run)
    final = checkpoint_paths(run)[-1]
    out = _evaluate("--checkpoint", final)
    assert out["step"] == STEPS and out["split"] == "test" and out["sequences"] == FAST["eval.test_sequences"]
    assert out["loss"] == result["test_loss"]


def test_evaluate_missing_checkpoint_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "trainer.evaluate", "--checkpoint", str(tmp_path / "nope.pt")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Resuming


def test_kill_and_resume_is_bitwise_identical(baseline, data_dir, tmp_path):
    ref, _ = baseline
    run = tmp_path / "killed"
    proc = start_trainer(run, data_dir, BASE)
    try:
        wait_for_step(run, proc, 5)  # step 5 is logged after the step-4 checkpoint was written
    finally:
        proc.kill()  # SIGKILL: no handler, no last checkpoint
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "result.json").exists()
    newest = checkpoint_paths(run)[-1]
    resumed_from = checkpoint.load(newest)["step"]
    assert 4 <= resumed_from < STEPS

    ok(run_trainer(run, data_dir, BASE))
    assert {"event": "resume", "step": resumed_from} in [
        {"event": e.get("event"), "step": e.get("step")} for e in raw_events(run)
    ]
    assert losses_and_norms(run) == losses_and_norms(ref)  # bitwise: dropout masks restored
    result, want = read_result(run), read_result(ref)
    assert result["status"] == "succeeded" and result["launches"] == 2
    assert result["test_loss"] == want["test_loss"] and result["val_loss"] == want["val_loss"]


def test_a_line_cut_short_by_a_full_disk_does_not_swallow_the_resume(baseline, data_dir, tmp_path):
    """A launch that died mid-line (ENOSPC, a kill) leaves an unterminated metrics line; the next launch
    ends it, so its resume event stays readable and the lost attempt's steps are superseded."""
    ref, _ = baseline
    run = tmp_path / "torn"
    proc = start_trainer(run, data_dir, BASE)
    try:
        wait_for_step(run, proc, 5)
    finally:
        proc.kill()
        proc.communicate()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "tokens": 11')  # half a line, as a full disk leaves it
    ok(run_trainer(run, data_dir, BASE))
    assert losses_and_norms(run) == losses_and_norms(ref)  # every step once, as if never interrupted
    assert sum(e.get("event") == "resume" for e in read_metrics(run)) == 1


def _stop_midway(run, data_dir, how: str) -> subprocess.CompletedProcess:
    proc = start_trainer(run, data_dir, BASE)
    try:
        wait_for_step(run, proc, 2)
        if how == "file":
            (run / "STOP").write_text("")
        else:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("how", ["file", "sigterm"])
def test_preemption_checkpoints_and_relaunch_matches(baseline, data_dir, tmp_path, how):
    ref, _ = baseline
    run = tmp_path / f"preempted-{how}"
    ok(_stop_midway(run, data_dir, how), 75)
    result = read_result(run)
    assert result["status"] == "preempted"
    stopped = result["step"]
    assert 2 <= stopped < STEPS
    assert result["test_loss"] is None
    assert checkpoint.load(checkpoint_paths(run)[-1])["step"] == stopped

    (run / "STOP").unlink(missing_ok=True)
    ok(run_trainer(run, data_dir, BASE))
    result = read_result(run)
    assert result["status"] == "succeeded" and result["launches"] == 2
    assert losses_and_norms(run) == losses_and_norms(ref)
    assert result["test_loss"] == read_result(ref)["test_loss"]


def test_stop_file_saying_pruned(data_dir, tmp_path):
    run = tmp_path / "pruned"
    run.mkdir()
    (run / "STOP").write_text("pruned\n")
    proc = ok(run_trainer(run, data_dir, BASE), 76)
    result = read_result(run)
    assert result["status"] == "pruned" and result["step"] == 1  # the first sync point
    assert result["test_loss"] is None
    assert [p.name for p in checkpoint_paths(run)] == ["step_00000001.pt"]
    assert "pruned" in proc.stdout


def test_clipped_fraction_survives_a_resume(data_dir, tmp_path):
    """With max norm 1e-3 every step clips, so every metric line must say clipped == 1.0, resumed or not."""
    run = tmp_path / "clip-resume"
    run.mkdir()
    sets = {**BASE, "run.steps": 6, "optim.grad_clip": 1e-3}
    (run / "STOP").write_text("")
    ok(run_trainer(run, data_dir, sets), 75)
    (run / "STOP").unlink()
    ok(run_trainer(run, data_dir, sets))
    clipped = [(e["step"], e["clipped"]) for e in read_metrics(run) if "loss" in e]
    assert clipped == [(s, 1.0) for s in range(1, 7)]
    assert read_result(run)["clipped_fraction"] == 1.0


def test_relaunching_a_finished_run_keeps_its_result(baseline, tmp_path):
    """A worker that died after the trainer finished gets relaunched: the result must stay the same."""
    ref, _ = baseline
    run = tmp_path / "again"
    shutil.copytree(ref, run)
    proc = subprocess.run(
        [PYTHON, "-m", "trainer", "--config", str(run / "config.json"), "--run-dir", str(run)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    ok(proc)
    result, want = read_result(run), read_result(ref)
    assert result["status"] == "succeeded" and result["step"] == STEPS
    assert result["test_loss"] == want["test_loss"]
    assert result["launches"] == 2
    assert result["train_loss"] == want["train_loss"]


# ---------------------------------------------------------------------------------------------------------
# Endings that are not success


def test_divergence(data_dir, tmp_path):
    run = tmp_path / "diverged"
    proc = ok(run_trainer(run, data_dir, {**BASE, "optim.lr": 1e6, "precision.amp": "fp32"}), 65)
    result = read_result(run)
    assert result["status"] == "diverged"
    assert isinstance(result["diverged_step"], int) and 1 <= result["diverged_step"] <= result["step"] < STEPS
    assert result["test_loss"] is None
    assert all(math.isfinite(loss) for _, loss in train_losses(run))  # no NaN line was logged
    # Never checkpoint a model that went non-finite.
    assert all(checkpoint.load(p)["step"] < result["diverged_step"] for p in checkpoint_paths(run))
    assert "diverged" in proc.stdout


def test_config_mismatch_in_existing_run_dir_is_refused(data_dir, tmp_path):
    run = tmp_path / "mismatch"
    run.mkdir()
    cfg = tiny_config(data_dir, **{k.replace(".", "__"): v for k, v in FAST.items()})
    (run / "config.json").write_text(cfg.to_json())
    before = (run / "config.json").read_text()
    proc = run_trainer(run, data_dir, {"optim.lr": 2e-3})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert str(run / "config.json") in proc.stderr and "different config" in proc.stderr
    assert "--run-dir" in proc.stderr
    assert (run / "config.json").read_text() == before
    assert not (run / "metrics.jsonl").exists() and not checkpoint_paths(run)


def test_micro_batch_that_does_not_divide_is_refused(data_dir, tmp_path):
    proc = run_trainer(tmp_path / "r", data_dir, {"run.micro_batch_size": 3})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "run.micro_batch_size (3)" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Equivalences: DDP and gradient accumulation against one process at the same global batch (dropout off)

EQ = {"model.dropout": 0.0, "run.steps": 8, "run.checkpoint_interval": 0}


def run_torchrun(run_dir, data_dir, overrides: dict) -> subprocess.CompletedProcess:
    sets = {"data.path": str(data_dir), **FAST, **overrides}
    cmd = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "trainer",
        "--preset",
        "tiny",
        "--run-dir",
        str(run_dir),
        *set_args(sets),
    ]
    return subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def equivalence_runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    single = root / "single"
    ok(run_trainer(single, data_dir, EQ))
    accum = root / "accum"
    ok(run_trainer(accum, data_dir, {**EQ, "run.micro_batch_size": 2}))
    ddp = root / "ddp"
    ok(run_torchrun(ddp, data_dir, EQ))
    return single, accum, ddp


def _final_weights(run):
    return checkpoint.load(checkpoint_paths(run)[-1])["model"]


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_ddp_trains_the_same_model_as_one_process(equivalence_runs):
    single, _, ddp = equivalence_runs
    r1, r2 = read_result(single), read_result(ddp)
    assert r2["status"] == "succeeded" and r2["environment"]["world_size"] == 2
    assert r2["micro_batch_size"] == G // 2 and r2["grad_accum_steps"] == 1
    assert r1["micro_batch_size"] == G
    n1 = [(s, n) for s, _, n in losses_and_norms(single)]
    n2 = [(s, n) for s, _, n in losses_and_norms(ddp)]
    assert [s for s, _ in n1] == [s for s, _ in n2] == list(range(1, 9))
    for (_, a), (_, b) in zip(n1, n2):
        assert b == pytest.approx(a, rel=1e-5)
    assert r2["test_loss"] == pytest.approx(r1["test_loss"], abs=1e-5)
    assert r2["val_loss"] == pytest.approx(r1["val_loss"], abs=1e-5)
    # Weights: each step moves a weight by up to lr = 1e-3, and Adam's m/sqrt(v) turns float rounding in a
    # near-zero gradient into an O(lr) difference for the odd element (2e-5 seen), so the bound on single
    # elements is one step's size, and on the average difference much tighter.
    w1, w2 = _final_weights(single), _final_weights(ddp)
    assert w1.keys() == w2.keys()
    diffs = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    assert diffs.max().item() < 1e-3
    assert diffs.mean().item() < 1e-7


def test_ddp_logged_loss_equals_one_process(equivalence_runs):
    """The logged training loss is the loss of the global batch, whatever the number of processes."""
    single, _, ddp = equivalence_runs
    l1, l2 = train_losses(single), train_losses(ddp)
    assert [s for s, _ in l1] == [s for s, _ in l2]
    bad = [(s, a, b) for (s, a), (_, b) in zip(l1, l2) if abs(a - b) > 1e-5]
    assert not bad, f"(step, 1-process loss, 2-process loss) differing by > 1e-5: {bad}"


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_ddp_stop_checkpoints_every_rank_and_resumes(equivalence_runs, data_dir, tmp_path):
    _, _, ref = equivalence_runs
    run = tmp_path / "ddp-stop"
    run.mkdir()
    (run / "STOP").write_text("")
    proc = run_torchrun(run, data_dir, EQ)
    assert proc.returncode != 0, proc.stdout  # torchrun turns any non-zero rank exit into its own failure
    result = read_result(run)
    assert result["status"] == "preempted" and result["step"] == 1
    state = checkpoint.load(checkpoint_paths(run)[-1])
    assert state["step"] == 1 and len(state["rng"]) == 2  # both ranks' RNG states
    (run / "STOP").unlink()
    ok(run_torchrun(run, data_dir, EQ))
    result = read_result(run)
    assert result["status"] == "succeeded" and result["launches"] == 2
    assert losses_and_norms(run) == losses_and_norms(ref)
    assert result["test_loss"] == read_result(ref)["test_loss"]


def test_gradient_accumulation_equals_one_big_micro_batch(equivalence_runs):
    single, accum, _ = equivalence_runs
    r = read_result(accum)
    assert (r["micro_batch_size"], r["grad_accum_steps"]) == (2, 4)
    a, b = losses_and_norms(single), losses_and_norms(accum)
    assert [x[0] for x in a] == [x[0] for x in b] == list(range(1, 9))
    for (_, la, na), (_, lb, nb) in zip(a, b):
        assert abs(la - lb) <= 1e-5 and abs(na - nb) <= 1e-5 * max(1.0, na)
    assert r["test_loss"] == pytest.approx(read_result(single)["test_loss"], abs=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Mixed precision on the CPU


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_fp16_amp_records_the_loss_scale(data_dir, tmp_path):
    run = tmp_path / "fp16"
    ok(run_trainer(run, data_dir, {"precision.amp": "fp16", "run.steps": 4}))
    lines = [e for e in read_metrics(run) if "loss" in e]
    assert len(lines) == 4
    assert all(isinstance(e["loss_scale"], float) and e["loss_scale"] > 0 for e in lines)
    assert all(math.isfinite(e["loss"]) for e in lines)
    result = read_result(run)
    assert result["status"] == "succeeded" and math.isfinite(result["test_loss"])
    scaler = checkpoint.load(checkpoint_paths(run)[-1])["scaler"]
    assert scaler["scale"] == lines[-1]["loss_scale"]


@pytest.mark.slow  # minutes of end-to-end training on 2 cores: run by .ci/run's -m slow
def test_bf16_amp_runs(data_dir, tmp_path):
    run = tmp_path / "bf16"
    ok(run_trainer(run, data_dir, {"precision.amp": "bf16", "run.steps": 4, "run.peak_tflops": 0.001}))
    lines = [e for e in read_metrics(run) if "loss" in e]
    assert len(lines) == 4 and all(e["loss_scale"] is None and math.isfinite(e["loss"]) for e in lines)
    result = read_result(run)
    assert result["status"] == "succeeded" and math.isfinite(result["test_loss"])
    assert lines[-1]["loss"] < lines[0]["loss"]
    # With a peak given, MFU = tokens/s × FLOPs per token / peak FLOP/s.
    assert lines[-1]["mfu"] == pytest.approx(lines[-1]["tokens_per_s"] * result["flops_per_token"] / 1e9)
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 1e9)


def test_a_checkpoint_from_before_rounding_up_keeps_its_step_count(data_dir, tmp_path):
    """run.tokens that is not whole steps: orch once floored it, now rounds up (as the seed repo does). A run
    checkpointed under the old rule (no total_steps in its checkpoint) finishes at its old count; a new one at
    the count its checkpoint records."""
    sets = {"run.steps": None, "run.tokens": 1250, "run.checkpoint_interval": 4, "eval.interval": 0}
    full = tmp_path / "full"
    ok(run_trainer(full, data_dir, sets))  # 1,250 tokens at 8 × 16 a step: 9.77 steps, rounded up to 10
    assert read_result(full)["step"] == 10
    eight = next(p for p in checkpoint_paths(full) if p.name == "step_00000008.pt")
    for name, keep_count, steps in (("new", True, 10), ("old", False, 9)):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(full / "config.json", run / "config.json")
        ckpt = checkpoint.load(eight)
        assert ckpt["total_steps"] == 10
        if not keep_count:
            del ckpt["total_steps"]  # as orch wrote checkpoints before it rounded up
        torch.save(ckpt, run / "checkpoints" / eight.name)
        ok(run_trainer(run, data_dir, sets))
        assert read_result(run)["step"] == steps, name

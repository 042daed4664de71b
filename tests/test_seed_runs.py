"""Every run configuration of the blog series' training repo is an arm of an experiment file, exactly.

The seed repo (gpjt/ddp-base-model-from-scratch) describes each run by runs/<name>/model.json + train.json,
vendored in tests/golden/seed_runs/ (NOTICE: source commit, Apache-2.0). `seed_to_orch` below translates one
into dotted orch keys on the gpt2-small preset, by the rules of the seed's ddp_train.py and gpt.py; each test
resolves the arm named in COVERED through the code path of `orch submit FILE --dry-run` (api.submit) and
requires its config to equal that translation in every key except IGNORED. Where each run lives:

    seed run                                                     file                arm (repeat)
    8xa100m40-baseline, -baseline-2 … -8                         baseline.py         baseline (0 … 7)
    1xrtx3090-baseline                                           baseline.py         baseline (0)
    8xa100m40-gradient-clipping                                  gradient_clipping   clip-3.5
    8xa100m40-qkv-bias                                           qkv_bias            qkv-bias
    8xa100m40-remove-dropout                                     remove_dropout      no-dropout
    8xa100m40-weight-tying                                       weight_tying        tied
    8xa100m40-update-learning-rate                               lr_schedule         lr-1.4e-3
    8xa100m40-schedule-learning-rate                             lr_schedule         cosine-1.4e-3
    8xa100m40-weight-decay-gpt2, -cerebras                       weight_decay        wd-0.01, wd-0.33724
    8xa100m40-weight-decay-cerebras-scheduling-learning-rate     weight_decay        wd-0.33724-cosine-4e-4
    …-cerebras-scheduling-and-increasing-learning-rate           weight_decay        wd-0.33724-cosine-1.4e-3
    8xa100m40-stacked-interventions-1, -2, -3                    stacked             stacked, stacked-qkv-bias,
                                                                                     stacked-wd-0.1
    1xrtx3090-stacked-interventions, -poppy                      stacked             stacked
    8xa100m80-no-amp                                             amp                 fp32
    8xa100m40, 8xh100m80, 8xa100m80, 8xb200m160, original        batch_size          batch-104, -216, -224,
                                                                                     -512, batch-6
    1xgtx1660-stacked-interventions, 1xrtx3090-…-1xgtx1660-clone small_model         stacked
    1xrtx3090-moe-no-balancing, -moe-balancing-first-cut         moe.py (ELSEWHERE: its own engineer and tests)
    1xrtx3090-context-extension                                  context_extension.py (ELSEWHERE)
    test                                                         none: a scratch config (NOT_SHIPPED)

Runs with the same config are the same orch run (its id is its config): the single-GPU reruns of the baseline
and of the stack, with gradient accumulation on other hardware, resolve to the 8-GPU runs' configs; to train
one again is to add a repeat (experiments/baseline.py has the seed's eight).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from typer.testing import CliRunner

from orchestrator import api, runspec, specs
from orchestrator.cli import app
from tests.conftest import REPO
from trainer import config, presets
from trainer.config import ScheduleConfig
from trainer.data import DataError, Split, TrainOrder, check_dataset, open_split
from trainer.identity import LATER_KEYS
from trainer.optim import lr_at, warmup_steps

SEED_RUNS = REPO / "tests" / "golden" / "seed_runs"
EXPERIMENTS = REPO / "experiments"
SEED_COMMIT = "c894ed03715de27a801f92c41238eccb3e57dac9"


class Arm(NamedTuple):
    file: str
    arm: str
    repeat: int = 0


COVERED: dict[str, Arm] = {
    "8xa100m40-baseline": Arm("baseline.py", "baseline", 0),
    **{f"8xa100m40-baseline-{k}": Arm("baseline.py", "baseline", k - 1) for k in range(2, 9)},
    "1xrtx3090-baseline": Arm("baseline.py", "baseline", 0),
    "8xa100m40-gradient-clipping": Arm("gradient_clipping.py", "clip-3.5"),
    "8xa100m40-qkv-bias": Arm("qkv_bias.py", "qkv-bias"),
    "8xa100m40-remove-dropout": Arm("remove_dropout.py", "no-dropout"),
    "8xa100m40-weight-tying": Arm("weight_tying.py", "tied"),
    "8xa100m40-update-learning-rate": Arm("lr_schedule.py", "lr-1.4e-3"),
    "8xa100m40-schedule-learning-rate": Arm("lr_schedule.py", "cosine-1.4e-3"),
    "8xa100m40-weight-decay-gpt2": Arm("weight_decay.py", "wd-0.01"),
    "8xa100m40-weight-decay-cerebras": Arm("weight_decay.py", "wd-0.33724"),
    "8xa100m40-weight-decay-cerebras-scheduling-learning-rate": Arm("weight_decay.py", "wd-0.33724-cosine-4e-4"),
    "8xa100m40-weight-decay-cerebras-scheduling-and-increasing-learning-rate": Arm(
        "weight_decay.py", "wd-0.33724-cosine-1.4e-3"
    ),
    "8xa100m40-stacked-interventions-1": Arm("stacked.py", "stacked"),
    "8xa100m40-stacked-interventions-2": Arm("stacked.py", "stacked-qkv-bias"),
    "8xa100m40-stacked-interventions-3": Arm("stacked.py", "stacked-wd-0.1"),
    "1xrtx3090-stacked-interventions": Arm("stacked.py", "stacked"),
    "1xrtx3090-stacked-interventions-poppy": Arm("stacked.py", "stacked"),
    "8xa100m80-no-amp": Arm("amp.py", "fp32"),
    "8xa100m40": Arm("batch_size.py", "batch-104"),
    "8xh100m80": Arm("batch_size.py", "batch-216"),
    "8xa100m80": Arm("batch_size.py", "batch-224"),
    "8xb200m160": Arm("batch_size.py", "batch-512"),
    "original": Arm("batch_size.py", "batch-6"),
    "1xgtx1660-stacked-interventions": Arm("small_model.py", "stacked"),
    "1xrtx3090-stacked-interventions-1xgtx1660-clone": Arm("small_model.py", "stacked"),
}

# Being written by other engineers, with their own tests of the MoE and context-extension keys.
ELSEWHERE = {
    "1xrtx3090-moe-no-balancing": "moe.py",
    "1xrtx3090-moe-balancing-first-cut": "moe.py",
    "1xrtx3090-context-extension": "context_extension.py",
}

NOT_SHIPPED = {
    # Added in commit 0464f76 as "a test one for local sanity checks" and edited with each code change since:
    # 326,010 tokens (4 steps), checkpoints every 10 steps. A smoke test of the seed's code, not an experiment.
    "test": "the seed repo's scratch config for local sanity checks (4 steps), not an experiment",
}

# Keys in which an arm may differ from its seed run, each because it does not change the trained function.
IGNORED = {
    # How a device splits its share of a step into forward passes. The seed's micro-batches were what fitted its
    # GPU (6 × 16 accumulation steps on an RTX 3090, 12 on an A100); a step's gradient is the mean over the
    # same sequences either way (trainer/data.py: a step's sequences depend on the step and the global batch
    # only), so only the order of floating-point sums differs. Orch finds what fits ('auto').
    "run.micro_batch_size": "the forward passes a step is split into, not what it trains on",
}

# Seed keys that say nothing about what is trained: when to checkpoint, and (until commit 5175b84) how often
# and on how much of the validation split to measure the loss during training, in inference mode.
NOT_TRAINING = {"checkpoint_interval", "validation_interval", "validation_batches"}


def world_size(run: str) -> int:
    """GPUs the seed run trained on: its name says (8x…, 1x…); "original" was the first, non-DDP run."""
    return 1 if run == "original" else int(run.split("x", 1)[0])


def seed_to_orch(run: str, model: dict[str, Any], train: dict[str, Any]) -> dict[str, Any]:
    """The dotted orch keys (on the gpt2-small preset) that say what the seed's model.json and train.json say,
    by the seed's own defaults (ddp_train.py: learning_rate 4e-4, weight_decay 0.1, use_amp true, 1
    accumulation step, random_seed 42). A seed key this does not know fails, rather than go unmapped."""
    model, train = dict(model), dict(train)
    unknown = set(model) - {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate"}
    unknown -= {"qkv_bias", "tie_weights"}  # ("moe": the runs of experiments/moe.py, ELSEWHERE)
    assert not unknown, f"{run}: model.json keys with no mapping: {unknown}"
    micro, accum = train.pop("microbatch_size"), train.pop("gradient_accumulation_steps", 1)
    out = {
        "model.vocab_size": model["vocab_size"],
        "model.context_length": model["context_length"],
        "model.n_embd": model["emb_dim"],
        "model.n_head": model["n_heads"],
        "model.n_layer": model["n_layers"],
        "model.dropout": model["drop_rate"],
        "model.qkv_bias": model["qkv_bias"],
        "model.tie_weights": model.get("tie_weights", False),
        # One step is world × micro × accumulation sequences (ddp_train.py: one_full_batch_tokens).
        "run.batch_size": world_size(run) * micro * accum,
        "run.micro_batch_size": micro,
        "run.tokens": train.pop("min_train_tokens"),  # rounded up to whole steps by both
        # The seed repo seeded nothing before commit 6a7e586 (2026-02-02), so its runs from before (8xa100m40,
        # 8xa100m80, 8xh100m80, 8xb200m160, original) were unseeded draws: 42 is as faithful as any seed.
        "run.seed": train.pop("random_seed", 42),
        "data.dataset": train.pop("dataset"),
        "data.start_train_token": train.pop("start_train_token"),
        "data.start_val_token": train.pop("start_val_token", 0),
        "optim.lr": train.pop("learning_rate", 4e-4),
        "optim.weight_decay": train.pop("weight_decay", 0.1),
        "optim.grad_clip": train.pop("clipping_max_norm", None),
    }
    # TF32 only with AMP: set_float32_matmul_precision("high") sits under `if use_amp` (and before use_amp
    # existed, both were always on).
    amp = train.pop("use_amp", True)
    out.update({"precision.amp": "fp16" if amp else "fp32", "precision.tf32": amp})
    if train.pop("schedule_learning_rate", False):
        # LinearLR(start_factor=1e-5) over (steps × percent) // 100 steps, then CosineAnnealingLR to lr / 10.
        out.update(
            {
                "schedule.kind": "cosine",
                "schedule.warmup": train.pop("warmup_period_percent", 0) / 100,
                "schedule.min_lr_ratio": 0.1,
                "schedule.convention": "torch",
            }
        )
    unknown = set(train) - NOT_TRAINING
    assert not unknown, f"{run}: train.json keys with no mapping: {unknown}"
    return out


def seed_run(run: str) -> tuple[dict, dict]:
    return tuple(json.loads((SEED_RUNS / run / f).read_text()) for f in ("model.json", "train.json"))


def dotted(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture(scope="module")
def resolve(tmp_path_factory):
    """(file, data.dataset) -> {(arm, repeat): config}, through `orch submit FILE --dry-run`'s code path (with
    `--set data.dataset=…`, as a site names its data), against a database that does not exist."""
    db = f"sqlite:///{tmp_path_factory.mktemp('db') / 'absent.db'}"
    cache: dict = {}

    def arms(file: str, dataset: str) -> dict[tuple[str, int], config.TrainConfig]:
        if (file, dataset) not in cache:
            out = api.submit(
                EXPERIMENTS / file, dry_run=True, check_data_here=False, overrides={"data.dataset": dataset}, db=db
            )
            assert len(out.queued) == len(out.runs) and not out.reused
            cache[file, dataset] = {(r.arm, r.repeat): r.config for r in out.runs}
        return cache[file, dataset]

    return arms


def test_every_seed_run_is_accounted_for():
    runs = {p.name for p in SEED_RUNS.iterdir() if p.is_dir()}
    assert len(runs) == 36
    places = [set(COVERED), set(ELSEWHERE), set(NOT_SHIPPED)]
    assert set().union(*places) == runs and sum(map(len, places)) == len(runs)
    for run in runs:
        assert sorted(p.name for p in (SEED_RUNS / run).iterdir()) == ["model.json", "train.json"]
    notice = (SEED_RUNS / "NOTICE").read_text()
    assert SEED_COMMIT in notice and "Apache License, Version 2.0" in notice and "gpjt/ddp-base-model" in notice


@pytest.mark.parametrize("run", sorted(COVERED))
def test_seed_run_is_an_arm_of_an_experiment_file(run, resolve):
    model, train = seed_run(run)
    want = dotted(presets.load(preset_name="gpt2-small", overrides=seed_to_orch(run, model, train)).model_dump())
    where = COVERED[run]
    arms = resolve(where.file, train["dataset"])
    assert (where.arm, where.repeat) in arms, f"{where.file} has no arm {where.arm!r} repeat {where.repeat}"
    got = dotted(arms[where.arm, where.repeat].model_dump())
    differ = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert set(differ) <= set(IGNORED), f"{run} vs {where}: (arm, seed run) differ in {differ}"


@pytest.mark.parametrize("run", sorted(COVERED))
def test_the_step_count_is_the_seed_repos(run):
    """ddp_train.py's load_dataset: the budget if it is whole steps, else one step more than fit in it."""
    model, train = seed_run(run)
    batch_tokens = world_size(run) * train["microbatch_size"] * train.get("gradient_accumulation_steps", 1)
    batch_tokens *= model["context_length"]
    min_tokens = train["min_train_tokens"]
    seed_steps = min_tokens // batch_tokens + (min_tokens % batch_tokens != 0)
    cfg = presets.load(preset_name="gpt2-small", overrides=seed_to_orch(run, model, train))
    assert cfg.total_steps() == seed_steps
    if run == "8xa100m40-baseline":
        assert seed_steps == 33_165 and seed_steps * batch_tokens == 3_260_252_160


@pytest.mark.parametrize("run", sorted(ELSEWHERE))
def test_runs_shipped_by_other_files(run):
    path = EXPERIMENTS / ELSEWHERE[run]
    if not path.exists():
        pytest.skip(f"{path.name} (for {run}) is not written yet")
    assert run in path.read_text(), f"{path.name} should name the seed run it reproduces, {run}"
    assert runspec.expand(specs.load_experiment(path), source=str(path))


SUBMITTABLE = sorted(p for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("sweep"))  # sweeps: orch sweep


@pytest.mark.parametrize("path", SUBMITTABLE, ids=lambda p: p.stem)
def test_every_experiment_file_dry_runs(path, tmp_path):
    db = tmp_path / "results.db"
    out = CliRunner().invoke(app, ["submit", str(path), "--dry-run", "--no-check-data", "--db", f"sqlite:///{db}"])
    assert out.exit_code == 0, out.output
    runs = runspec.expand(specs.load_experiment(path), source=str(path))
    lines = out.stdout.splitlines()
    assert sum(line.startswith("would queue ") for line in lines) == len({r.id for r in runs})
    assert lines[-1].startswith(f"{runs[0].experiment}: would queue {len({r.id for r in runs})}, reuse ")
    assert not db.exists()  # a dry run creates no database


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_the_torch_convention_is_the_seed_repos_schedulers():
    """schedule.convention=torch against the seed's own scheduler objects, built as ddp_train.py builds them."""
    peak = 1.4e-3
    for steps, percent in ((200, 5), (1001, 5), (333, 10), (46_957 // 100, 5)):
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([param], lr=peak)
        warm = (steps * percent) // 100
        schedulers = [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.00001, end_factor=1.0, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warm, eta_min=peak / 10),
        ]
        seq = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=schedulers, milestones=[warm])
        cfg = ScheduleConfig(kind="cosine", warmup=percent / 100, min_lr_ratio=0.1, convention="torch")
        assert warmup_steps(cfg, steps) == warm
        for step in range(steps):
            assert math.isclose(lr_at(step, steps, peak, cfg), opt.param_groups[0]["lr"], rel_tol=1e-12)
            seq.step()  # (no optimizer step: the schedule does not depend on one)
    # The seed's GTX 1660 run: floor(5% of 46,957) = 2,347 warmup steps, where orch's convention rounds to 2,348.
    orch_style = ScheduleConfig(kind="cosine", warmup=0.05, min_lr_ratio=0.1)
    assert warmup_steps(cfg, 46_957) == 2_347 and warmup_steps(orch_style, 46_957) == 2_348
    with pytest.raises(ValueError, match="convention=torch"):
        ScheduleConfig(kind="wsd", convention="torch")


# ---------------------------------------------------------------------------------------------------------
# The seed's train.json data keys: data.dataset, data.start_train_token, data.start_val_token.


def test_new_data_keys_are_later_keys_at_their_defaults():
    defaults = config.DataConfig()
    for key in ("dataset", "start_train_token", "start_val_token"):
        assert LATER_KEYS[f"data.{key}"] == getattr(defaults, key)
    assert LATER_KEYS["schedule.convention"] == ScheduleConfig().convention == "orch"
    assert "dataset" not in config.TrainConfig().identity()["data"]  # so no stored run id moved


def test_start_tokens_skip_that_many_tokens_of_train_and_val_only(data_dir):
    whole = {s: Split(data_dir, s) for s in ("train", "val", "test")}
    skip = {"train": 1_000, "val": 77}
    cfg = presets.load(
        preset_name="tiny",
        overrides={"data.path": str(data_dir), "data.start_train_token": 1_000, "data.start_val_token": 77},
    )
    for split, n in (*skip.items(), ("test", 0)):
        opened = open_split(cfg.data, split)
        assert opened.n_tokens == whole[split].n_tokens - n
        assert (opened.tokens(0, 300) == whole[split].tokens(n, 300)).all()
    # The first training step reads sequence 0 from token 1,000 on: what the seed's dataset slice starts with.
    T = cfg.model.context_length
    order = TrainOrder(open_split(cfg.data, "train"), T, "sequential", 0)
    x, y = order.micro_batch(0, 4, 0, 1, 4, 0)
    assert x[0].tolist() == whole["train"].tokens(1_000, T).tolist()
    assert y[3].tolist() == whole["train"].tokens(1_000 + 3 * T + 1, T).tolist()


def test_a_start_token_past_the_end_is_refused_with_its_key(data_dir):
    n_val = Split(data_dir, "val").n_tokens
    with pytest.raises(DataError, match=r"data.start_val_token .* past the end of the val split"):
        check_dataset(data_dir, 64, 1, 1, start_val_token=n_val + 1)
    # Skipping leaves too few validation windows: named as the evaluation slice it cannot fill.
    with pytest.raises(DataError, match="eval.val_sequences"):
        check_dataset(data_dir, 64, 32, 1, start_val_token=n_val - 64 * 31)


def test_the_dataset_name_is_checked_against_meta_json(data_dir, tmp_path):
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    assert meta["dataset"] == meta["source"] == "synthetic"  # prepare() names what it wrote
    check_dataset(data_dir, dataset="synthetic")
    cfg = presets.load(preset_name="tiny", overrides={"data.path": str(data_dir), "data.dataset": "synthetic"})
    assert open_split(cfg.data, "train").n_tokens > 0
    for bad in ("gpjt/fineweb-gpt2-tokens", "Synthetic"):
        with pytest.raises(DataError, match=rf"data.dataset is '{bad}' but .* holds 'synthetic'"):
            open_split(cfg.data.model_copy(update={"dataset": bad}), "train")
    # Through submit: refused before anything is queued, named.
    out = CliRunner().invoke(
        app,
        ["submit", str(EXPERIMENTS / "quickstart.py"), "--db", f"sqlite:///{tmp_path / 'r.db'}"]
        + ["--set", f"data.path={data_dir}", "--set", "data.dataset=gpjt/fineweb-gpt2-tokens"],
    )
    assert out.exit_code == 2 and "data.dataset is 'gpjt/fineweb-gpt2-tokens'" in out.output
    assert not (tmp_path / "r.db").exists()


def test_fp32_is_strict_as_the_seeds_no_amp_run():
    runs = runspec.expand(specs.load_experiment(EXPERIMENTS / "amp.py"))
    fp32 = next(r.config for r in runs if r.arm == "fp32")
    assert fp32.precision.amp == "fp32" and fp32.precision.tf32 is False

"""Set-up: everything a launch does before its first step, and the Setup it hands to the loop (trainer/train.py).

What a launch builds once is a Setup: ranks, data, model, optimizer, and the module a step differentiates
(TrainingLoss, compiled and/or wrapped in DDP); what changes from step to step, and survives a relaunch, is the
TrainState (trainer/state.py), which a checkpoint saves and restores. set_up also writes the run directory's
config.json, or checks it against the config given (trainer/identity.py says when two are the same run), and
resumes from the newest checkpoint of the run directory, if there is one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import checkpoint, init_from
from trainer.config import ConfigError, TrainConfig
from trainer.data import Split, TrainOrder, fixed_slice, open_split
from trainer.distributed import Dist, StopRequest, all_gather
from trainer.evaluate import autocast
from trainer.identity import same_run
from trainer.model import GPT, cross_entropy
from trainer.moe import Balancer, penalty
from trainer.optim import build_optimizer
from trainer.perf import batch_layout, peak_flops
from trainer.rundir import CONFIG, METRICS, RESULT, Metrics, write_json
from trainer.state import TrainState


@dataclass
class Data:
    """The dataset as training reads it: the train split in its configured order, the held-out splits."""

    order: TrainOrder  # which training windows each step reads
    val: Split
    test: Split


@dataclass
class Setup:
    """What a launch builds before its first step, unchanged from then on (what changes is TrainState)."""

    cfg: TrainConfig
    run_dir: Path
    d: Dist
    data: Data
    model: GPT  # the weights; evaluation and checkpoints use it directly
    train_model: torch.nn.Module  # TrainingLoss over the same weights: compiled and/or wrapped in DDP
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    micro: int  # sequences per forward pass per rank
    accum: int  # micro-batches per optimizer step per rank
    metrics: Metrics
    stopper: StopRequest
    flops_per_token: int
    peak: float | None  # per-device peak FLOP/s, for MFU; None where unknown
    total_steps: int
    started: float  # time.time() at this launch's start
    moe: Balancer | None = None  # a mixture of experts' routing statistics and bias updates; None when dense
    first_step_s: float | None = None  # from this launch's start (spare.launch_began) to its first step's end

    def tokens(self, step: int) -> int:
        return step * self.cfg.run.batch_size * self.cfg.model.context_length

    def mfu(self, tokens_per_s: float | None) -> float | None:
        if not (self.peak and tokens_per_s):
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.d.world)


def set_up(cfg: TrainConfig, run_dir: Path, d: Dist) -> tuple[Setup, TrainState]:
    """Everything before the first step, in an order that matters: the seeds, then the draws they feed
    (initial weights, then dropout masks), then a checkpoint's RNG states over them, so that a fresh run and
    a resumed one draw the same numbers (tests/golden/tiny_run.json pins them)."""
    started = time.time()
    total_steps = cfg.total_steps()  # run.tokens rounded up to whole steps, as the seed repo does
    prepare_run_dir(cfg, run_dir, d)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32
    data = open_data(cfg)  # data first: a missing shard should fail in a second, not after building a model

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = GPT(cfg.model).to(d.device)
    opt = build_optimizer(model, cfg.optim, d.device)
    micro, accum = batch_layout(cfg, d, model, opt)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision.amp == "fp16")
    torch.manual_seed(cfg.run.seed + d.rank)  # dropout masks differ between ranks, as their data does

    state = TrainState(d.device)
    resumed = resume(cfg, run_dir, d, model, opt, scaler, state)  # may replace the RNG states just seeded
    if resumed is None and cfg.run.init_from is not None:  # weights only, and never over a checkpoint of this run
        init_from.initialise(cfg, run_dir, d, model)
    total_steps = resumed or total_steps  # a resumed run keeps the step count it started with (resume says why)
    state.launches += 1
    metrics = Metrics(run_dir / METRICS, d.master)
    if d.master and (run_dir / METRICS).stat().st_size > 0:
        metrics.log(event="resume", step=state.step, launch=os.environ.get("ORCH_LAUNCH_ID"), time=time.time())
    if d.master:
        active = f" ({model.num_params(active=True):,} active)" if cfg.model.moe.experts else ""
        print(
            f"{model.num_params():,} parameters{active} | {d.world} × {d.device.type} | micro-batch {micro} × {accum} "
            f"accumulation | steps {state.step}→{total_steps}",
            flush=True,
        )

    train_model = training_model(model, cfg, d)
    setup = Setup(
        cfg=cfg,
        run_dir=run_dir,
        d=d,
        data=data,
        model=model,
        train_model=train_model,
        opt=opt,
        scaler=scaler,
        micro=micro,
        accum=accum,
        metrics=metrics,
        stopper=StopRequest(run_dir, d.master),
        flops_per_token=model.flops_per_token(),
        peak=peak_flops(d.device, cfg.precision.amp, cfg.precision.tf32, cfg.run.peak_tflops),
        total_steps=total_steps,
        started=started,
        moe=Balancer.of(model, d.device),
    )
    return setup, state


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, d: Dist) -> None:
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(cfg, run_dir)
        (run_dir / RESULT).unlink(missing_ok=True)  # a result from an earlier attempt is stale now


def _write_or_check_config(cfg: TrainConfig, run_dir: Path) -> None:
    path = run_dir / CONFIG
    if path.exists():
        try:
            same = same_run(json.loads(path.read_text()), cfg)
        except json.JSONDecodeError:
            same = False
        if not same:
            raise ConfigError(
                f"{path} holds a different config than the one given; use a new --run-dir, "
                f"or relaunch with --config {path} to resume that run"
            )
    else:
        write_json(path, cfg.model_dump(mode="json"))


def open_data(cfg: TrainConfig) -> Data:
    T = cfg.model.context_length
    train_split = open_split(cfg.data, "train")  # data.dataset checked, data.start_*_token skipped
    val_split, test_split = open_split(cfg.data, "val"), open_split(cfg.data, "test")
    fixed_slice(val_split, T, cfg.eval.val_sequences, "eval.val_sequences")
    test_key = "eval.test_sequences" if cfg.eval.test_tokens is None else "eval.test_tokens"
    fixed_slice(test_split, T, cfg.test_windows(), test_key)
    return Data(TrainOrder(train_split, T, cfg.data.order, cfg.data.seed), val_split, test_split)


def resume(
    cfg: TrainConfig,
    run_dir: Path,
    d: Dist,
    model: GPT,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
) -> int | None:
    """Load the newest checkpoint of the run directory, if any, into model, optimizer, scaler and state, and
    return the run's step count as the checkpoint records it; None when there is none (a fresh run).

    The step count is the checkpoint's, not recomputed: orch before 2026-12-05 floored run.tokens to whole
    steps (33,164 for gpt2-small), now it rounds up as the seed repo does (33,165), and a run started under the
    old rule must finish under it, its LR schedule unchanged. A checkpoint without the count is from then.

    Rank 0 chooses it and every rank loads that file: a node whose view of a shared filesystem lags (NFS
    caches directory listings) must not resume from an older step than the others, which would train on
    silently wrong or hang in a collective. A node that cannot see the chosen file stops with that said."""
    path = all_gather(d, checkpoint.latest(run_dir))[0]
    if path is None:
        return None
    if not Path(path).exists():
        raise ConfigError(
            f"rank {d.rank} cannot see {path}, which rank 0 resumes from: put the run directory on "
            "a filesystem every node shares"
        )
    ckpt = checkpoint.load(path)
    if not same_run(ckpt["config"], cfg):
        raise ConfigError(f"{path} was written with a different config; use a new --run-dir")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt, d)
    if "total_steps" in ckpt:
        return int(ckpt["total_steps"])
    return cfg.run.steps or cfg.run.tokens // (cfg.run.batch_size * cfg.model.context_length)  # the old floor


class TrainingLoss(torch.nn.Module):
    """(tokens, targets) -> the mean next-token loss under the run's autocast: what train_step differentiates.
    With a mixture of experts, (that loss, that loss + the balancing terms): the second is differentiated.

    The model and its loss are one module so that torch.compile sees both: the float32 cross-entropy over the
    50,257 logits is then fused with the head instead of materialising a float32 copy of every logit (at 96 x
    1,024 tokens that copy alone is 20 GB). The autocast dtype is an attribute read inside forward, so a
    compiled graph is specialised to it (bench/trainer.py compiles several precisions in one process).
    """

    def __init__(self, model: GPT, amp: str):
        super().__init__()
        self.model, self.amp = model, amp

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        with autocast(x.device, self.amp):
            loss = cross_entropy(self.model(x), y)
        if not self.model.cfg.moe.experts:
            return loss
        # A mixture of experts: the loss to log, and the objective to differentiate, its balancing terms added.
        return loss, loss + penalty(self.model, self.model.cfg.moe)


def training_model(model: GPT, cfg: TrainConfig, d: Dist) -> torch.nn.Module:
    """The module train_step calls: TrainingLoss, compiled if the config says so, in DDP over several ranks."""
    train_model = TrainingLoss(model, cfg.precision.amp)
    if cfg.precision.compile:
        train_model = torch.compile(train_model)
    if d.world > 1:
        train_model = DDP(train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return train_model

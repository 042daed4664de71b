"""The training loop: one run, in one run directory, under torchrun or alone.

    python -m trainer --preset tiny --run-dir runs/demo --set optim.grad_clip=1.0
    torchrun --standalone --nproc_per_node 8 -m trainer --config runs/ID/config.json --run-dir runs/ID

`train()` reads top to bottom, one named function per stage:

    set_up            ranks, data, model, optimizer; the TrainState of the newest checkpoint, if there is one
    train_until_done  train_step after train_step; at sync points, sync_point (log_step, evaluate,
                      save_checkpoint, the stop decision), which may end the run early
    final_evaluation  validation and fixed-slice test loss (only for a run that reached its last step)
    write_run_samples samples.json: completions of sample.prompts (trainer/sample.py; rank 0, succeeded runs)
    save_checkpoint   the last checkpoint (never of a model that went non-finite)
    build_result      result.json, written by write_result

What a launch builds once is a Setup; what changes from step to step, and survives a relaunch, is the
TrainState (trainer/state.py), which a checkpoint saves and restores.

The loop only synchronises the device with the host at "sync points" (every log_interval steps and at
evaluations and checkpoints); between them the GPU runs ahead of Python. Divergence and stop requests are
noticed at sync points; the step at which the loss first went non-finite is tracked on the device.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import checkpoint, init_from
from trainer.config import ConfigError, TrainConfig, same_run
from trainer.data import Split, TrainOrder, fixed_slice, open_split
from trainer.distributed import Dist, StopRequest, all_gather, distributed
from trainer.evaluate import autocast, mean_loss
from trainer.model import GPT, cross_entropy
from trainer.moe import Balancer, penalty
from trainer.optim import build_optimizer, lr_at
from trainer.perf import batch_layout, environment, peak_flops  # bench/trainer.py takes Dist, batch_layout from here
from trainer.rundir import CONFIG, EXIT_CODES, METRICS, RESULT, Metrics, Status, write_json
from trainer.sample import write_run_samples
from trainer.spare import launch_began
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


@dataclass
class StepOut:
    """One optimizer step's numbers, still on the device."""

    loss_sum: torch.Tensor  # sum of the micro-batch losses (divide by accum for the mean)
    grad_norm: torch.Tensor  # the global gradient norm before clipping
    lr: float


@dataclass
class Window:
    """The steps since the last sync point: throughput and the clipped fraction are measured over them."""

    clipped_before: int  # clipped steps counted when the window opened
    start: float = field(default_factory=time.perf_counter)
    steps: int = 0


# ---------------------------------------------------------------------------------------------------------
# The driver


def train(cfg: TrainConfig, run_dir: str | Path) -> Status:
    with distributed() as d:
        s, state = set_up(cfg, Path(run_dir), d)
        status = train_until_done(s, state)
        test_loss = final_evaluation(s, state) if status is Status.SUCCEEDED else None
        state.wall_time += time.time() - s.started
        if status is not Status.DIVERGED:  # never checkpoint a model that went non-finite
            save_checkpoint(s, state)
        if status is Status.SUCCEEDED and d.master:  # after the checkpoint, before result.json (the launch's end)
            samples(s, cfg, state)
        write_result(s, build_result(s, state, status, test_loss))
        return status


def samples(s: Setup, cfg: TrainConfig, state: TrainState) -> None:
    """samples.json (trainer/sample.py). A smoke test, not a result: whatever breaks it (a tokenizer file, memory)
    is said in one line and costs the run nothing, its final checkpoint already written. A full disk is the
    exception: it goes to the launcher like any other write's, which relaunches once space is free."""
    try:
        write_run_samples(s.run_dir, s.model, cfg, state.step)
    except Exception as exc:  # noqa: BLE001 - see above
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"no samples: {type(exc).__name__}: {exc}", flush=True)


def train_until_done(s: Setup, state: TrainState) -> Status:
    """Optimizer steps until the last one (SUCCEEDED), or until a sync point ends the run earlier."""
    window = Window(state.clipped_steps())
    while state.step < s.total_steps:
        out = train_step(s, state)
        if s.first_step_s is None:  # start-up (imports, unless a warm spare did them), set-up, compile, one step
            if s.d.device.type == "cuda":
                torch.cuda.synchronize(s.d.device)
            s.first_step_s = time.time() - launch_began()[0]
        window.steps += 1
        due_eval = _due(s.cfg.eval.interval, state.step, s.total_steps)
        due_ckpt = _due(s.cfg.run.checkpoint_interval, state.step, s.total_steps)
        if not (state.step % s.cfg.run.log_interval == 0 or state.step == s.total_steps or due_eval or due_ckpt):
            continue
        status = sync_point(s, state, out, window, due_eval, due_ckpt)
        if status is not None:
            return status
        window = Window(state.clipped_steps())  # evaluation and checkpoint time is not training time
    return Status.SUCCEEDED


def _due(interval: int, step: int, total_steps: int) -> bool:
    """Every `interval` steps (0: never), but not at the last step: the end has its own evaluation and checkpoint."""
    return bool(interval) and step % interval == 0 and step < total_steps


# ---------------------------------------------------------------------------------------------------------
# Set-up


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


# ---------------------------------------------------------------------------------------------------------
# One optimizer step, and what happens at a sync point


def train_step(s: Setup, state: TrainState) -> StepOut:
    """One optimizer step over the global batch: micro-batches with gradient accumulation, (clipping,) the
    update. Queues device work only: nothing here waits for the device."""
    d, G = s.d, s.cfg.run.batch_size
    lr = lr_at(state.step, s.total_steps, s.cfg.optim.lr, s.cfg.schedule)
    for group in s.opt.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=d.device)
    for i in range(s.accum):
        x, y = s.data.order.micro_batch(state.step, G, d.rank, d.world, s.micro, i)
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        # DDP all-reduces gradients only on the last micro-batch of a step.
        sync = contextlib.nullcontext() if d.world == 1 or i == s.accum - 1 else s.train_model.no_sync()
        with sync:
            loss = objective = s.train_model(x, y)
            if s.moe is not None:
                loss, objective = loss
                s.moe.record()
            s.scaler.scale(objective / s.accum).backward()
        loss_sum += loss.detach()
    s.scaler.unscale_(s.opt)  # clipping and the logged norm see the true gradients, not the scaled ones
    max_norm = s.cfg.optim.grad_clip
    if max_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), max_norm)
        state.clipped += (norm > max_norm).long()
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in s.model.parameters() if p.grad is not None])
    s.scaler.step(s.opt)
    s.scaler.update()
    s.opt.zero_grad(set_to_none=True)
    if s.moe is not None:
        s.moe.after_step(d.world)  # the loads of the whole step, over all ranks; the loss-free bias update
    state.note_step(loss_sum)
    return StepOut(loss_sum, norm, lr)


def sync_point(
    s: Setup, state: TrainState, out: StepOut, window: Window, due_eval: bool, due_ckpt: bool
) -> Status | None:
    """Read the step's numbers on the host, log, evaluate and checkpoint if due, and take the stop decision.
    Returns the status that ends the run here, or None to go on."""
    d = s.d
    if d.world > 1:  # the global batch's loss, and divergence seen by any rank stops every rank
        dist.all_reduce(out.loss_sum)  # gloo has no AVG: sum, then divide
        out.loss_sum /= d.world
        dist.all_reduce(state.first_bad, op=dist.ReduceOp.MAX)
    state.train_loss = out.loss_sum.item() / s.accum
    elapsed = time.perf_counter() - window.start
    state.train_time += elapsed
    if state.diverged_step() is not None:
        return Status.DIVERGED
    log_step(s, state, out, window, elapsed)
    if due_eval:
        state.val_loss = evaluate(s, s.data.val, s.cfg.eval.val_sequences)
        s.metrics.log(step=state.step, tokens=s.tokens(state.step), val_loss=state.val_loss, time=time.time())
    if due_ckpt:
        save_checkpoint(s, state)
    return s.stopper.poll(d)


def log_step(s: Setup, state: TrainState, out: StepOut, window: Window, elapsed: float) -> None:
    """One metrics.jsonl line for the window that ends at this step (and one line on stdout)."""
    rate = window.steps * s.cfg.run.batch_size * s.cfg.model.context_length / elapsed
    state.rates.append(rate)
    clipped = (state.clipped_steps() - window.clipped_before) / window.steps if s.cfg.optim.grad_clip else 0.0
    s.metrics.log(
        step=state.step,
        tokens=s.tokens(state.step),
        loss=state.train_loss,
        lr=out.lr,
        grad_norm=float(out.grad_norm),
        clipped=clipped,
        tokens_per_s=rate,
        mfu=s.mfu(rate),
        loss_scale=s.scaler.get_scale() if s.scaler.is_enabled() else None,
        **(s.moe.window_metrics(s.d.world) if s.moe is not None else {}),  # moe/load_e0, ... (trainer/moe.py)
        time=time.time(),
    )
    if s.d.master:
        print(
            f"step {state.step:>6}/{s.total_steps} | loss {state.train_loss:.4f} | lr {out.lr:.3e} | "
            f"norm {float(out.grad_norm):.3f} | {rate:,.0f} tok/s",
            flush=True,
        )


def evaluate(s: Setup, split: Split, n_sequences: int) -> float:
    """The mean loss over a split's fixed slice (its first n_sequences windows), shared across ranks."""
    return mean_loss(
        s.model,
        split,
        s.cfg.model.context_length,
        n_sequences,
        s.cfg.eval.batch_size,
        s.d.device,
        s.cfg.eval.amp,
        s.d.rank,
        s.d.world,
    )


def final_evaluation(s: Setup, state: TrainState) -> float:
    """Validation and test loss of the finished model, logged together; returns the test loss."""
    state.val_loss = evaluate(s, s.data.val, s.cfg.eval.val_sequences)
    test_loss = evaluate(s, s.data.test, s.cfg.test_windows())
    s.metrics.log(
        step=state.step, tokens=s.tokens(state.step), val_loss=state.val_loss, test_loss=test_loss, time=time.time()
    )
    return test_loss


def save_checkpoint(s: Setup, state: TrainState) -> None:
    """Write checkpoints/step_N.pt: weights, optimizer, scaler, config, and the TrainState (every rank's RNG)."""
    train_state = state.state_dict(s.d)  # a collective: every rank takes part
    if s.d.master:
        ckpt = {
            "model": s.model.state_dict(),
            "optimizer": s.opt.state_dict(),
            "scaler": s.scaler.state_dict(),
            "config": s.cfg.model_dump(mode="json"),
            "total_steps": s.total_steps,  # kept by a resume, whatever rule computes it then
            **train_state,
        }
        checkpoint.save(s.run_dir, state.step, ckpt, s.cfg.run.keep_checkpoints)


# ---------------------------------------------------------------------------------------------------------
# The result


def build_result(s: Setup, state: TrainState, status: Status, test_loss: float | None) -> dict:
    """result.json: how the run ended and what it measured, over all its launches."""
    tokens_per_s = statistics.median(state.rates) if state.rates else None
    train_loss = state.train_loss
    return {
        "status": status.value,
        "step": state.step,
        "total_steps": s.total_steps,
        "tokens": s.tokens(state.step),
        "test_loss": test_loss,
        "val_loss": state.val_loss,
        "train_loss": train_loss if train_loss is not None and math.isfinite(train_loss) else None,
        "diverged_step": state.diverged_step() if status is Status.DIVERGED else None,
        "wall_time_s": state.wall_time,
        "train_time_s": state.train_time,
        "tokens_per_s": tokens_per_s,
        "mfu": s.mfu(tokens_per_s),
        "params": s.model.num_params(),
        "active_params": s.model.num_params(active=True),  # fewer with a mixture of experts (top_k of them)
        "flops_per_token": s.flops_per_token,
        "micro_batch_size": s.micro,
        "grad_accum_steps": s.accum,
        "clipped_fraction": state.clipped_steps() / state.step if state.step and s.cfg.optim.grad_clip else 0.0,
        "launches": state.launches,
        "config_sha256": config_hash(s.cfg),
        "init_from": init_from.recorded(s.run_dir),  # the source's checkpoint, sha256 and step; null from scratch
        "environment": environment(s.d.device, s.d.world),
        # Which launch wrote this, and how it exits: the launcher matches an ending to its own launch, and
        # records the trainer's code (75, 76, …) rather than torchrun's 1 for any non-zero exit.
        "launch_id": os.environ.get("ORCH_LAUNCH_ID"),
        "exit_code": EXIT_CODES[status],
        "time_to_first_step_s": s.first_step_s,  # this launch's; MLflow: the tag result.time_to_first_step_s
        "warm_start": launch_began()[1],  # whether a warm spare took this launch (orchestrator/launchers/spare.py)
    }


def write_result(s: Setup, result: dict) -> None:
    """result.json last, atomically: its presence says the run's launch is over and how it ended."""
    if s.d.master:
        write_json(s.run_dir / RESULT, result)
        test_loss = result["test_loss"]
        summary = f"test loss {test_loss:.6f}" if test_loss is not None else f"at step {result['step']}"
        print(f"{result['status']}: {summary} ({s.run_dir / RESULT})", flush=True)
    if s.d.world > 1:
        dist.barrier()  # ranks leave together, so torchrun sees no rank exit before result.json exists


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


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


def exit_code(status: Status) -> int:
    """The process's exit code: EXIT_CODES, except a pruned rank under torchrun's agent, which exits 0. Any
    non-zero rank makes the agent report a failure (a ChildFailedError traceback and a summary box in
    train.log) and exit 1 itself, so its code says nothing anyway; a prune is an orderly ending, and the
    launcher reads the trainer's own code (76) from result.json, written before any rank exits."""
    if status is Status.PRUNED and os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0
    return EXIT_CODES[status]


if __name__ == "__main__":  # pragma: no cover - use `python -m trainer`
    sys.exit("run `python -m trainer --help`")

"""The training loop: one run, in one run directory, under torchrun or alone.

    python -m trainer --preset tiny --run-dir runs/demo --set optim.grad_clip=1.0
    torchrun --standalone --nproc_per_node 8 -m trainer --config runs/ID/config.json --run-dir runs/ID

`train()` reads top to bottom, one named function per stage:

    set_up            ranks, data, model, optimizer; the TrainState of the newest checkpoint, if there is one
                      (trainer/setup.py)
    train_until_done  train_step after train_step; at sync points, sync_point (log_step, evaluate,
                      save_checkpoint, the stop decision), which may end the run early
    final_evaluation  validation and fixed-slice test loss (only for a run that reached its last step)
    write_run_samples samples.json: completions of sample.prompts (trainer/sample.py; rank 0, succeeded runs)
    save_checkpoint   the last checkpoint (never of a model that went non-finite)
    build_result      result.json, written by write_result (trainer/result.py)

What a launch builds once is a Setup (trainer/setup.py); what changes from step to step, and survives a
relaunch, is the TrainState (trainer/state.py), which a checkpoint saves and restores.

The loop only synchronises the device with the host at "sync points" (every log_interval steps and at
evaluations and checkpoints); between them the GPU runs ahead of Python. Divergence and stop requests are
noticed at sync points; the step at which the loss first went non-finite is tracked on the device.
"""

from __future__ import annotations

import contextlib
import errno
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import Split
from trainer.distributed import distributed
from trainer.evaluate import mean_loss
from trainer.optim import lr_at
from trainer.result import build_result, write_result
from trainer.rundir import Status
from trainer.sample import write_run_samples
from trainer.setup import Setup, set_up
from trainer.spare import launch_began
from trainer.state import TrainState


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


if __name__ == "__main__":  # pragma: no cover - use `python -m trainer`
    sys.exit("run `python -m trainer --help`")

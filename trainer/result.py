"""The result: result.json, how a launch ended and what the run measured over all its launches, and the
process's exit code.

result.json is written last, atomically, by rank 0: its presence says the launch is over and how it ended. The
launcher matches it to its own launch (launch_id) and records the trainer's own exit code from it.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics

import torch.distributed as dist

from trainer import init_from
from trainer.config import TrainConfig
from trainer.perf import environment
from trainer.rundir import EXIT_CODES, RESULT, Status, write_json
from trainer.setup import Setup
from trainer.spare import launch_began
from trainer.state import TrainState


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


def exit_code(status: Status) -> int:
    """The process's exit code: EXIT_CODES, except a pruned rank under torchrun's agent, which exits 0. Any
    non-zero rank makes the agent report a failure (a ChildFailedError traceback and a summary box in
    train.log) and exit 1 itself, so its code says nothing anyway; a prune is an orderly ending, and the
    launcher reads the trainer's own code (76) from result.json, written before any rank exits."""
    if status is Status.PRUNED and os.environ.get("TORCHELASTIC_RUN_ID"):
        return 0
    return EXIT_CODES[status]

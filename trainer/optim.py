"""AdamW with configurable weight-decay groups, and the learning-rate schedules."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from trainer.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into a decayed and an undecayed group according to the decay_* switches.

    Biases and LayerNorm weights are the 1-D tensors; embeddings are the nn.Embedding weights. A tied
    head/embedding tensor is one parameter and is classed as an embedding.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() yields a shared tensor once
        if id(p) in embeddings:
            wanted = cfg.decay_embeddings
        elif id(p) in norms:
            wanted = cfg.decay_norms
        elif name.endswith("bias"):
            wanted = cfg.decay_biases
        else:
            wanted = True  # matmul weights are always decayed
        (decay if wanted else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        [g for g in param_groups(model, cfg) if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused,
    )


# LinearLR's start_factor in the seed repo's warmup (ddp_train.py): the first step trains at 1e-5 of the peak.
TORCH_WARMUP_START = 1e-5


def warmup_steps(cfg: ScheduleConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    if cfg.convention == "torch":  # the seed repo: (steps * warmup_period_percent) // 100, exactly
        return math.floor(Fraction(repr(cfg.warmup)) * total_steps)
    return round(cfg.warmup * total_steps)


def lr_at(step: int, total_steps: int, peak: float, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup is linear from peak/warmup to peak over the first `warmup` steps (so step warmup-1 is at the
    peak, nanoGPT's convention). Then:
      constant  stays at the peak (the blog baseline);
      cosine    half-cosine from the peak down to min_lr_ratio·peak at the last step;
      linear    straight line from the peak down to min_lr_ratio·peak at the last step;
      wsd       warmup-stable-decay (Hu et al. 2024, MiniCPM): peak until the last `decay` fraction of
                steps, then linear down to min_lr_ratio·peak.
    schedule.convention=torch counts steps as the seed repo's PyTorch schedulers do instead (_torch_lr).
    """
    warm = warmup_steps(cfg, total_steps)
    if cfg.convention == "torch":
        return _torch_lr(step, total_steps, warm, peak, cfg)
    if step < warm:
        return peak * (step + 1) / warm
    floor = peak * cfg.min_lr_ratio
    if cfg.kind == "constant":
        return peak
    if cfg.kind == "wsd":
        decay_steps = max(1, round(cfg.decay * total_steps))
        start = total_steps - decay_steps
        if step < start:
            return peak
        progress = (step - start + 1) / decay_steps
        return peak - (peak - floor) * min(1.0, progress)
    span = max(1, total_steps - 1 - warm)
    progress = min(1.0, (step - warm) / span)
    if cfg.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress  # linear


def _torch_lr(step: int, total_steps: int, warm: int, peak: float, cfg: ScheduleConfig) -> float:
    """schedule.convention=torch: the closed forms of the seed repo's PyTorch schedulers. The LR of step s is
    the one set after s scheduler steps: LinearLR from TORCH_WARMUP_START·peak over `warm` steps, then (cosine)
    CosineAnnealingLR with T_max = total_steps - warm and eta_min = min_lr_ratio·peak, restarted at the peak
    by SequentialLR at step `warm`. tests/test_seed_runs.py checks it against torch's own schedulers."""
    if step < warm:
        return peak * (TORCH_WARMUP_START + (1 - TORCH_WARMUP_START) * step / warm)
    if cfg.kind == "constant":
        return peak
    floor = peak * cfg.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))

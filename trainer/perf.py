"""Throughput accounting: peak FLOP/s per device, MFU, the micro-batch layout (and its finder), and the
environment record."""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import ConfigError, TrainConfig
from trainer.distributed import Dist
from trainer.evaluate import autocast
from trainer.model import GPT, cross_entropy
from trainer.provenance import git_commit

# Dense peak FLOP/s per GPU from the vendors' datasheets (no sparsity): (16-bit tensor core, TF32, plain fp32).
# MFU (PaLM, Chowdhery et al. 2022) is measured against the peak of the precision the matmuls run in.
PEAKS: dict[str, tuple[float, float, float]] = {
    "H200": (989.4e12, 494.7e12, 66.9e12),
    "H100 SXM": (989.4e12, 494.7e12, 66.9e12),
    "H100 80GB HBM3": (989.4e12, 494.7e12, 66.9e12),
    "H100 PCIe": (756.0e12, 378.0e12, 51.2e12),
    "H100 NVL": (835.0e12, 417.5e12, 60.0e12),
    "H100": (989.4e12, 494.7e12, 66.9e12),
    "A100": (312.0e12, 156.0e12, 19.5e12),
    "A10G": (70.0e12, 35.0e12, 31.2e12),
    "L4": (121.0e12, 60.0e12, 30.3e12),
    "RTX 4090": (165.2e12, 82.6e12, 82.6e12),
    "RTX 3090": (71.0e12, 35.6e12, 35.6e12),
    "V100": (125.0e12, 15.7e12, 15.7e12),
}


def peak_flops(device: torch.device, amp: str, tf32: bool, override_tflops: float | None = None) -> float | None:
    """Per-device peak for this precision; None where unknown (CPUs, unlisted GPUs) unless overridden."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32_peak, fp32) in PEAKS.items():  # most specific names first
        if key in name:
            return half if amp in ("fp16", "bf16") else tf32_peak if tf32 else fp32
    return None


def find_micro_batch(per_rank_batch: int, fits: Callable[[int], None]) -> int:
    """Largest divisor of `per_rank_batch` for which `fits(m)` runs without CUDA running out of memory.

    Memory grows with the micro-batch, so fitting is monotone and a binary search over the divisors needs
    about log2(#divisors) trial steps. `fits` should run one full forward+backward at that size.
    """
    divisors = [m for m in range(1, per_rank_batch + 1) if per_rank_batch % m == 0]
    lo, hi, best = 0, len(divisors) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            fits(divisors[mid])
        except torch.OutOfMemoryError:
            hi = mid - 1
        else:
            best, lo = divisors[mid], mid + 1
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(
            "even one sequence per device runs out of memory: shorten model.context_length, shrink the model, "
            "or use precision.amp=bf16"
        )
    return best


def batch_layout(cfg: TrainConfig, d: Dist, model: GPT, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(micro-batch size, gradient-accumulation steps) per rank for the configured global batch."""
    G = cfg.run.batch_size
    if G % d.world:
        raise ConfigError(f"run.batch_size ({G}) must be divisible by the number of processes ({d.world})")
    per_rank = G // d.world
    micro = cfg.run.micro_batch_size
    if micro == "auto":
        if d.device.type == "cuda":
            micro = find_micro_batch(per_rank, lambda m: _probe(model, opt, cfg, d.device, m))
            if d.world > 1:  # every rank must take the same number of accumulation steps
                t = torch.tensor(micro, device=d.device)
                dist.all_reduce(t, op=dist.ReduceOp.MIN)
                micro = int(t.item())
        else:
            micro = per_rank  # a CPU has no out-of-memory error to search against
    if per_rank % micro:
        raise ConfigError(
            f"run.micro_batch_size ({micro}) must divide the per-process batch "
            f"{per_rank} (= run.batch_size {G} / {d.world} processes); try 'auto'"
        )
    return micro, per_rank // micro


def _probe(model: GPT, opt: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device, micro: int) -> None:
    """One forward+backward+optimizer step at this micro-batch size, leaving no trace in weights or RNG."""
    lrs = [g["lr"] for g in opt.param_groups]
    with torch.random.fork_rng(devices=[device]):
        try:
            x = torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.context_length), device=device)
            with autocast(device, cfg.precision.amp):
                loss = cross_entropy(model(x), x)
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = 0.0  # allocate Adam's moments at full size without moving any weight
            opt.step()
        finally:  # also when it ran out of memory half-way: no probe gradient may reach the first real step
            for g, lr in zip(opt.param_groups, lrs):
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            opt.state.clear()


def environment(device: torch.device, world_size: int) -> dict:
    """What ran this, for result.json: versions, git commit, devices."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
        "world_size": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
    }
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"

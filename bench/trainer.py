"""Trainer throughput: tokens/s, step time, MFU and peak memory of the trainer's own optimizer step.

    python bench/trainer.py --preset tiny --steps 20 --warmup 3 --repeats 5
    python bench/trainer.py --preset tiny --compare precision.compile=false,true
    python bench/trainer.py --preset tiny --compare model.moe.experts=0,6       # dense vs 6 experts, top-2
    python bench/trainer.py --preset gpt2-small --set precision.amp=bf16 --set precision.compile=true --device cuda
    python bench/trainer.py --preset gpt2-small --variant fp16:precision.amp=fp16 \
        --variant bf16+compile:precision.amp=bf16,precision.compile=true      # named variants, interleaved

Model, optimizer, micro-batch choice and step body are the trainer's (trainer.model, trainer.optim,
trainer.train.train_step itself), fed random tokens of the configured shape: no dataset is needed, and data
loading is not measured. Each variant runs --warmup steps (torch.compile happens there), then --repeats timed blocks of
--steps optimizer steps, synchronising the device at the end of each block as the trainer does at its
sync points. With --compare or --variant the variants' blocks are interleaved (A B A B ...) so the noise of a shared
machine hits every variant alike: quote the ratio of medians, not one variant's absolute number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable as a script, package not installed

import torch

from trainer import presets
from trainer.__main__ import (
    parse_sets,  # the same --set syntax and errors as `python -m trainer`
)
from trainer.config import ConfigError, TrainConfig
from trainer.distributed import Dist
from trainer.model import GPT
from trainer.moe import Balancer
from trainer.optim import build_optimizer
from trainer.perf import (
    batch_layout,  # find_micro_batch on CUDA with 'auto', exactly as training does
    environment,
    peak_flops,
)
from trainer.setup import Data, Setup, training_model
from trainer.state import TrainState
from trainer.train import train_step

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Variant:
    label: str
    cfg: TrainConfig  # as given; run_cfg has an 'auto' micro-batch resolved
    run_cfg: TrainConfig = None
    setup: Setup = None  # what the trainer's train_step reads: model, optimizer, scaler, layout, "data"
    state: TrainState = None
    resident: int = 0  # bytes it keeps on the GPU between blocks (weights, Adam moments)
    warmup_s: float = 0.0
    mfu_basis: str = ""
    repeats: list = field(default_factory=list)

    @property
    def model(self) -> GPT:
        return self.setup.model

    @property
    def micro(self) -> int:
        return self.setup.micro

    @property
    def accum(self) -> int:
        return self.setup.accum


class RandomTokens:
    """Stands in for the trainer's TrainOrder: four random micro-batches kept on the host and copied to the
    device per micro-batch, as the trainer's batches are; no dataset, and no data loading measured."""

    def __init__(self, cfg: TrainConfig, micro: int, accum: int):
        rows = [torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.context_length + 1)) for _ in range(4)]
        self.batches, self.accum = [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows], accum

    def micro_batch(self, step: int, global_batch: int, rank: int, world: int, micro: int, index: int):
        return self.batches[(step * self.accum + index) % len(self.batches)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # platform.processor() says only "x86_64" on Linux; the CPU model is in /proc/cpuinfo.
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor() or "cpu",
    )
    return f"{model} ({torch.get_num_threads()} threads)"


def set_globals(cfg: TrainConfig) -> None:
    # Process-wide switches are set again before every block, since interleaved variants may differ in them.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32


def build(cfg: TrainConfig, device: torch.device) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
    model = GPT(cfg.model).to(device)
    return model, build_optimizer(model, cfg.optim, device)


def resolve_micro(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """The config with an 'auto' micro-batch replaced by what the trainer would pick on this device."""
    if cfg.run.micro_batch_size != "auto" or device.type != "cuda":
        return cfg  # on CPU batch_layout itself takes the whole per-process batch
    set_globals(cfg)
    model, opt = build(cfg, device)
    micro, _ = batch_layout(cfg, Dist(device=device), model, opt)
    del model, opt
    torch.cuda.empty_cache()
    cfg = cfg.model_copy(deep=True)
    cfg.run.micro_batch_size = micro
    return cfg


def prepare(v: Variant, device: torch.device, warmup: int) -> None:
    cfg = v.run_cfg
    set_globals(cfg)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    d = Dist(device=device)
    model, opt = build(cfg, device)
    micro, accum = batch_layout(cfg, d, model, opt)
    v.setup = Setup(
        cfg=cfg,
        run_dir=None,
        d=d,
        data=Data(RandomTokens(cfg, micro, accum), None, None),
        model=model,
        train_model=training_model(model, cfg, d),
        opt=opt,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision.amp == "fp16"),
        micro=micro,
        accum=accum,
        metrics=None,
        stopper=None,
        flops_per_token=model.flops_per_token(),
        peak=None,
        total_steps=10**9,
        started=time.time(),
        moe=Balancer.of(model, device),  # a mixture of experts: its routing statistics and bias updates, as trained
    )  # a constant LR: no schedule's end
    v.state = TrainState(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        train_step(v.setup, v.state)
    sync(device)
    v.warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        v.resident = torch.cuda.memory_allocated(device) - before


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square torch.matmul or F.linear (nn.Linear's op; on CPU fp16 it is 20x faster than
    matmul's kernel): a practical ceiling where no datasheet peak is known."""
    best = 0.0
    for n in (1024, 2048) if device.type == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for op in (torch.matmul, torch.nn.functional.linear):
            op(a, b)  # warm up the BLAS / kernel selection
            sync(device)
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 0.25:
                op(a, b)
                sync(device)
                count += 1
            best = max(best, 2 * n**3 * count / (time.perf_counter() - t0))
    return best


def mfu_peak(cfg: TrainConfig, device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s for MFU: the datasheet's (trainer.perf) where known, else a matmul measured right now."""
    peak = peak_flops(device, cfg.precision.amp, cfg.precision.tf32, cfg.run.peak_tflops)
    if peak is not None:
        return peak, "vs datasheet peak"
    # CPUs and unlisted GPUs. Measured after every block: on a shared VM what a core delivers moves by 2x
    # within minutes, so each MFU is a ratio of two measurements taken under about the same load.
    return measured_matmul_peak(device, DTYPES[cfg.precision.amp]), f"vs measured {cfg.precision.amp} matmul peak"


def timed_block(v: Variant, device: torch.device, steps: int) -> dict:
    set_globals(v.run_cfg)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_alloc = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss_sum = train_step(v.setup, v.state).loss_sum
    sync(device)
    elapsed = time.perf_counter() - t0
    tokens = steps * v.micro * v.accum * v.run_cfg.model.context_length
    row = {
        "tokens_per_s": tokens / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "loss": loss_sum.item() / v.accum,
    }  # falls as the few random batches are memorised; NaN = broken step
    row["load_avg_1m"] = os.getloadavg()[0]  # on a shared machine, how busy it was is part of the result
    row["peak_flops"], v.mfu_basis = mfu_peak(v.run_cfg, device)
    row["mfu"] = row["tokens_per_s"] * v.model.flops_per_token() / row["peak_flops"]
    if device.type == "cuda":
        # Count the other variants' resident weights out, so the peak is what this variant needs alone.
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - start_alloc + v.resident) / 2**30
    return row


def median_of(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def best_of(rows: list[dict]) -> dict:
    # The least disturbed block: when neighbours' load comes and goes, the best is the most repeatable number.
    return max(rows, key=lambda r: r["tokens_per_s"])


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text columns: first left-aligned, the numbers right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header, ["-" * w for w in widths], *rows]
    )


def fmt_row(label: str, r: dict) -> list[str]:
    mem = f"{r['peak_mem_gib']:.2f}" if "peak_mem_gib" in r else "-"
    return [
        label,
        f"{r['tokens_per_s']:,.0f}",
        f"{r['step_ms']:.1f}",
        f"{100 * r['mfu']:.1f}%",
        f"{r['peak_flops'] / 1e12:.3g}",
        mem,
        f"{r['loss']:.3f}",
        f"{r['load_avg_1m']:.1f}",
    ]


def parse_variant(p: argparse.ArgumentParser, text: str) -> tuple[str, list[str]]:
    """'bf16+compile:precision.amp=bf16,precision.compile=true' -> ('bf16+compile', ['precision.amp=bf16', ...])."""
    label, sep, changes = text.partition(":")
    if not (label and sep):
        p.error(f"--variant {text!r}: expected LABEL:KEY=V[,KEY=V...], e.g. bf16:precision.amp=bf16")
    return label, [c for c in changes.split(",") if c]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed block")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compile happens here)")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per variant; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--compare", metavar="KEY=V1,V2", help="run each value of one config key, interleaved")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL:KEY=V[,KEY=V...]",
        help="a named variant of several keys (repeatable), interleaved like --compare",
    )
    p.add_argument("--json", type=Path, help="default: bench/results/trainer-<device>-<preset>[-<key>].json")
    args = p.parse_args(argv)
    key, sep, values = (args.compare or "").partition("=")
    if args.compare and not (sep and values):
        p.error("--compare expects KEY=V1,V2 (e.g. precision.compile=false,true)")
    if args.compare and args.variant:
        p.error("give either --compare or --variant, not both")
    if args.variant:
        key = "variants"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device here")
    if min(args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps and --repeats must be at least 1, --warmup at least 0")

    sets = parse_sets(args.set)  # every variant goes through the trainer's own config validation
    if args.variant:
        variants = [
            Variant(label, presets.load(preset_name=args.preset, overrides={**sets, **parse_sets(changes)}))
            for label, changes in (parse_variant(p, text) for text in args.variant)
        ]
    elif args.compare:
        variants = [
            Variant(
                f"{key}={text}",
                presets.load(preset_name=args.preset, overrides={**sets, key: presets.parse_value(text)}),
            )
            for text in values.split(",")
        ]
    else:
        variants = [Variant(args.preset, presets.load(preset_name=args.preset, overrides=sets))]
    device, load_start = torch.device(args.device), os.getloadavg()[0]
    for v in variants:  # all micro-batch probes first, so no variant resident on the GPU shrinks another's
        v.run_cfg = resolve_micro(v.cfg, device)
    for v in variants:
        print(f"preparing {v.label}: build, {args.warmup} warmup steps ...", flush=True)
        prepare(v, device, args.warmup)
    for _ in range(args.repeats):  # interleaved A B A B ..., so drift and neighbours' load hit every variant
        for v in variants:
            v.repeats.append(timed_block(v, device, args.steps))

    # ---- report --------------------------------------------------------------------------------------------
    name, load, base = device_name(device), (load_start, os.getloadavg()[0]), variants[0]
    print(
        f"\ndevice {name} | torch {torch.__version__} | preset {args.preset} | {args.steps} steps x "
        f"{args.repeats} repeats after {args.warmup} warmup | load avg {load[0]:.1f} -> {load[1]:.1f}"
    )
    for v in variants:
        print(
            f"{v.label}: {v.model.num_params():,} params ({v.model.num_params(active=True):,} active) | "
            f"{v.model.flops_per_token() / 1e6:,.1f} MFLOP/token | "
            f"micro-batch {v.micro} x {v.accum} accumulation x {v.run_cfg.model.context_length} tokens | "
            f"warmup {v.warmup_s:.1f} s | MFU {v.mfu_basis}"
        )
    rows = [fmt_row(f"{v.label} #{i + 1}", v.repeats[i]) for i in range(args.repeats) for v in variants]
    rows += [
        fmt_row(f"{v.label} {what}", f(v.repeats))
        for what, f in [("median", median_of), ("best", best_of)]
        for v in variants
    ]
    print(
        "\n"
        + table(["variant / repeat", "tokens/s", "step ms", "MFU", "peak TFLOP/s", "mem GiB", "loss", "load"], rows)
    )
    if any(v.mfu_basis != "vs datasheet peak" for v in variants):
        print("MFU here is against a matmul peak measured on this machine, NOT a datasheet peak.")
    ratios = {}
    for v in variants[1:]:
        ratio = median_of(v.repeats)["tokens_per_s"] / median_of(base.repeats)["tokens_per_s"]
        best = best_of(v.repeats)["tokens_per_s"] / best_of(base.repeats)["tokens_per_s"]
        paired = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(v.repeats, base.repeats)]
        ratios[f"{v.label} / {base.label}"] = {
            "tokens_per_s_ratio_of_medians": ratio,
            "ratio_of_best": best,
            "paired_ratio_min": min(paired),
            "paired_ratio_max": max(paired),
        }
        print(
            f"\n{v.label} vs {base.label}: tokens/s ratio of medians {ratio:.3f}x, of best blocks {best:.3f}x "
            f"(per-repeat paired ratios {min(paired):.3f} to {max(paired):.3f})"
        )

    out = args.json or RESULTS / f"trainer-{args.device}-{args.preset}{f'-{key}' if key else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "environment": environment(device, 1),
        "preset": args.preset,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "load_avg_1m": {"start": load[0], "end": load[1]},
        "compare": key or None,
        "ratios": ratios,
        "variants": [
            {
                "label": v.label,
                "config": v.cfg.model_dump(mode="json"),
                "params": v.model.num_params(),
                "active_params": v.model.num_params(active=True),
                "flops_per_token": v.model.flops_per_token(),
                "micro_batch_size": v.micro,
                "grad_accum_steps": v.accum,
                "tokens_per_step": v.micro * v.accum * v.cfg.model.context_length,
                "warmup_s": v.warmup_s,
                "mfu_basis": v.mfu_basis,
                "repeats": v.repeats,
                "median": median_of(v.repeats),
                "best": best_of(v.repeats),
            }
            for v in variants
        ],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as exc:  # a bad key or value, or a micro-batch that does not divide the batch
        sys.exit(f"error: {exc}")

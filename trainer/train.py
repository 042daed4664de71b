"""The training loop: one run, in one run directory, under torchrun or alone.

    python -m trainer --preset tiny --run-dir runs/demo --set optim.grad_clip=1.0
    torchrun --standalone --nproc_per_node 8 -m trainer --config runs/ID/config.json --run-dir runs/ID

Read top to bottom: set up ranks and devices, check the data, build model and optimizer, resume from the
newest checkpoint if there is one, train, evaluate on the fixed test slice, write result.json.
The loop only synchronises the device with the host at "sync points" (every log_interval steps and at
evaluations and checkpoints); between them the GPU runs ahead of Python. Divergence and stop requests are
noticed at sync points; the step at which the loss first went non-finite is tracked on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer import checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.data import Split, TrainOrder, fixed_slice
from trainer.evaluate import autocast, mean_loss
from trainer.model import GPT, cross_entropy
from trainer.optim import build_optimizer, lr_at
from trainer.perf import environment, find_micro_batch, peak_flops
from trainer.rundir import CONFIG, METRICS, RESULT, EXIT_CODES, Status, read_stop, write_json


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Read torchrun's environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Dist(rank, local_rank, world, device)


class StopRequest:
    """SIGTERM (a preemption, or torchrun forwarding one) or a STOP file ends the run at the next sync point.

    So does the death of the orch worker that launched us (its pid is in ORCH_WORKER_PID): an orphaned
    trainer would otherwise go on writing into a run directory that another worker is about to resume.
    """

    def __init__(self, run_dir: Path, master: bool):
        self.run_dir, self.master, self.signalled = run_dir, master, False
        self.worker_pid = int(os.environ.get("ORCH_WORKER_PID", "0"))
        signal.signal(signal.SIGTERM, self._on_signal)

    def _worker_gone(self) -> bool:
        if not self.worker_pid:
            return False
        try:
            os.kill(self.worker_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def poll(self, d: Dist) -> Status | None:
        """Agree across ranks: 0 none, 1 preempted, 2 pruned (pruned wins)."""
        code = 1 if self.signalled or self._worker_gone() else 0
        if self.master:
            code = max(code, {None: 0, Status.PREEMPTED: 1, Status.PRUNED: 2}[read_stop(self.run_dir)])
        if d.world > 1:
            t = torch.tensor(code, device=d.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return {0: None, 1: Status.PREEMPTED, 2: Status.PRUNED}[code]


class Metrics:
    """metrics.jsonl, appended and flushed one event at a time (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", buffering=1) if enabled else None
        if self.file and self.file.tell() > 0:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            if torn:  # an earlier attempt died mid-line (a full disk, a kill): end that line, keep ours whole
                self.file.write("\n")

    def log(self, **event) -> None:
        if self.file:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()


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


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


def train(cfg: TrainConfig, run_dir: str | Path) -> Status:
    run_dir = Path(run_dir)
    d = setup_distributed()
    try:
        return _train(cfg, run_dir, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, run_dir: Path, d: Dist) -> Status:
    started = time.time()
    T, G = cfg.model.context_length, cfg.run.batch_size
    total_steps = cfg.total_steps()
    if d.master:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(cfg, run_dir)
        (run_dir / RESULT).unlink(missing_ok=True)  # a result from an earlier attempt is stale now
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.precision.tf32

    # Data first: a missing shard should fail in a second, not after building a model.
    train_split = Split(cfg.data.path, "train")
    val_split, test_split = Split(cfg.data.path, "val"), Split(cfg.data.path, "test")
    fixed_slice(val_split, T, cfg.eval.val_sequences, "eval.val_sequences")
    fixed_slice(test_split, T, cfg.eval.test_sequences, "eval.test_sequences")
    order = TrainOrder(train_split, T, cfg.data.order, cfg.data.seed)

    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = GPT(cfg.model).to(d.device)
    opt = build_optimizer(model, cfg.optim, d.device)
    micro, accum = batch_layout(cfg, d, model, opt)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision.amp == "fp16")
    torch.manual_seed(cfg.run.seed + d.rank)  # dropout masks differ between ranks, as their data does
    # Running totals that outlive a relaunch (stored in every checkpoint).
    counters = {"train_time": 0.0, "wall_time": 0.0, "clipped_steps": 0, "launches": 0, "train_loss": None,
                "val_loss": None, "rates": []}

    start_step = 0
    ckpt_path = checkpoint.latest(run_dir)
    if ckpt_path is not None:
        state = checkpoint.load(ckpt_path)
        if state["config"] != cfg.model_dump(mode="json"):
            raise ConfigError(f"{ckpt_path} was written with a different config; use a new --run-dir")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        counters.update(state["counters"])
        start_step = state["step"]
        if len(state["rng"]) == d.world:
            checkpoint.set_rng_state(state["rng"][d.rank])
    counters["launches"] += 1

    metrics = Metrics(run_dir / METRICS, d.master)
    if d.master and (run_dir / METRICS).stat().st_size > 0:
        metrics.log(event="resume", step=start_step, launch=os.environ.get("ORCH_LAUNCH_ID"), time=time.time())
    flops_per_token = model.flops_per_token()
    peak = peak_flops(d.device, cfg.precision.amp, cfg.precision.tf32, cfg.run.peak_tflops)
    if d.master:
        print(f"{model.num_params():,} parameters | {d.world} × {d.device.type} | micro-batch {micro} × {accum} "
              f"accumulation | steps {start_step}→{total_steps}", flush=True)

    train_model = torch.compile(model) if cfg.precision.compile else model
    if d.world > 1:
        train_model = DDP(train_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    stopper = StopRequest(run_dir, d.master)
    max_norm = cfg.optim.grad_clip
    first_bad = torch.tensor(-1, device=d.device)  # first step with a non-finite loss, tracked without syncing
    clipped = torch.zeros((), dtype=torch.long, device=d.device)
    status, step = Status.SUCCEEDED, start_step
    last_loss, val_loss, rates = counters["train_loss"], counters["val_loss"], counters["rates"]
    window_start, window_steps, window_clipped = time.perf_counter(), 0, counters["clipped_steps"]

    def save_checkpoint() -> None:
        rng = [checkpoint.rng_state()]
        if d.world > 1:
            rng = [None] * d.world
            dist.all_gather_object(rng, checkpoint.rng_state())
        if d.master:
            counters.update(clipped_steps=int(clipped.item()), train_loss=last_loss, val_loss=val_loss,
                            rates=rates[-100:])
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                     "config": cfg.model_dump(mode="json"), "counters": counters, "rng": rng}
            checkpoint.save(run_dir, step, state, cfg.run.keep_checkpoints)

    clipped += counters["clipped_steps"]
    while step < total_steps:
        lr = lr_at(step, total_steps, cfg.optim.lr, cfg.schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for i in range(accum):
            x, y = order.micro_batch(step, G, d.rank, d.world, micro, i)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            # DDP all-reduces gradients only on the last micro-batch of a step.
            sync = contextlib.nullcontext() if d.world == 1 or i == accum - 1 else train_model.no_sync()
            with sync:
                with autocast(d.device, cfg.precision.amp):
                    loss = cross_entropy(train_model(x), y)
                scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        scaler.unscale_(opt)
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            clipped += (norm > max_norm).long()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss_sum), step, first_bad)
        window_steps += 1

        do_eval = cfg.eval.interval and step % cfg.eval.interval == 0 and step < total_steps
        do_ckpt = cfg.run.checkpoint_interval and step % cfg.run.checkpoint_interval == 0 and step < total_steps
        if not (step % cfg.run.log_interval == 0 or step == total_steps or do_eval or do_ckpt):
            continue
        # ---- sync point -------------------------------------------------------------------------------
        if d.world > 1:  # the global batch's loss, and divergence seen by any rank stops every rank
            dist.all_reduce(loss_sum)  # gloo has no AVG: sum, then divide
            loss_sum /= d.world
            dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
        last_loss = loss_sum.item() / accum
        elapsed = time.perf_counter() - window_start
        counters["train_time"] += elapsed
        if int(first_bad.item()) >= 0:
            status = Status.DIVERGED
            break
        rate = window_steps * G * T / elapsed
        rates.append(rate)
        n_clipped = int(clipped.item())
        metrics.log(step=step, tokens=step * G * T, loss=last_loss, lr=lr, grad_norm=float(norm),
                    clipped=(n_clipped - window_clipped) / window_steps if max_norm else 0.0,
                    tokens_per_s=rate, mfu=rate * flops_per_token / (peak * d.world) if peak else None,
                    loss_scale=scaler.get_scale() if scaler.is_enabled() else None, time=time.time())
        if d.master:
            print(f"step {step:>6}/{total_steps} | loss {last_loss:.4f} | lr {lr:.3e} | norm {float(norm):.3f} | "
                  f"{rate:,.0f} tok/s", flush=True)
        window_clipped = n_clipped
        if do_eval:
            val_loss = mean_loss(model, val_split, T, cfg.eval.val_sequences, cfg.eval.batch_size, d.device,
                                 cfg.eval.amp, d.rank, d.world)
            metrics.log(step=step, tokens=step * G * T, val_loss=val_loss, time=time.time())
        if do_ckpt:
            save_checkpoint()
        status = stopper.poll(d) or Status.SUCCEEDED
        if status is not Status.SUCCEEDED:
            break
        window_start, window_steps = time.perf_counter(), 0

    test_loss = None
    if status is Status.SUCCEEDED:
        val_loss = mean_loss(model, val_split, T, cfg.eval.val_sequences, cfg.eval.batch_size, d.device,
                             cfg.eval.amp, d.rank, d.world)
        test_loss = mean_loss(model, test_split, T, cfg.eval.test_sequences, cfg.eval.batch_size, d.device,
                              cfg.eval.amp, d.rank, d.world)
        metrics.log(step=step, tokens=step * G * T, val_loss=val_loss, test_loss=test_loss, time=time.time())
    counters["wall_time"] += time.time() - started
    if status is not Status.DIVERGED:  # never checkpoint a model that went non-finite
        save_checkpoint()
    tokens = step * G * T
    tokens_per_s = statistics.median(rates) if rates else None
    result = {
        "status": status.value,
        "step": step,
        "total_steps": total_steps,
        "tokens": tokens,
        "test_loss": test_loss,
        "val_loss": val_loss,
        "train_loss": last_loss if last_loss is not None and math.isfinite(last_loss) else None,
        "diverged_step": int(first_bad.item()) if status is Status.DIVERGED else None,
        "wall_time_s": counters["wall_time"],
        "train_time_s": counters["train_time"],
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / (peak * d.world) if peak and tokens_per_s else None,
        "params": model.num_params(),
        "flops_per_token": flops_per_token,
        "micro_batch_size": micro,
        "grad_accum_steps": accum,
        "clipped_fraction": int(clipped.item()) / step if step and max_norm else 0.0,
        "launches": counters["launches"],
        "config_sha256": config_hash(cfg),
        "environment": environment(d.device, d.world),
        # Which launch wrote this, and how it exits: the launcher matches an ending to its own launch, and
        # records the trainer's code (75, 76, …) rather than torchrun's 1 for any non-zero exit.
        "launch_id": os.environ.get("ORCH_LAUNCH_ID"),
        "exit_code": EXIT_CODES[status],
    }
    if d.master:
        write_json(run_dir / RESULT, result)
        summary = f"test loss {test_loss:.6f}" if test_loss is not None else f"at step {step}"
        print(f"{status.value}: {summary} ({run_dir / RESULT})", flush=True)
    if d.world > 1:
        dist.barrier()  # ranks leave together, so torchrun sees no rank exit before result.json exists
    return status


def _write_or_check_config(cfg: TrainConfig, run_dir: Path) -> None:
    path = run_dir / CONFIG
    if path.exists():
        try:
            same = json.loads(path.read_text()) == cfg.model_dump(mode="json")
        except json.JSONDecodeError:
            same = False
        if not same:
            raise ConfigError(f"{path} holds a different config than the one given; use a new --run-dir, "
                              f"or relaunch with --config {path} to resume that run")
    else:
        write_json(path, cfg.model_dump(mode="json"))


def exit_code(status: Status) -> int:
    return EXIT_CODES[status]


if __name__ == "__main__":  # pragma: no cover - use `python -m trainer`
    sys.exit("run `python -m trainer --help`")

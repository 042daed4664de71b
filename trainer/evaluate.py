"""The fixed, deterministic test-set loss — in training and on any checkpoint afterwards.

    python -m trainer.evaluate --checkpoint runs/ID/checkpoints/step_00033165.pt [--data DIR] [--json]

The test slice is always the first eval.test_sequences windows of the test split (the blog series: 3,200
batches × 6 sequences × 1,024 tokens), evaluated in eval.amp precision with TF32 off for fp32, dropout off,
and summed in float64: the number depends on the weights alone, never on the training loss, the batch size
or the order in which ranks finish. (One of the series' published numbers was first computed from the
training loss by mistake; this is the only function that produces a test loss.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data import DataError, Split, fixed_slice, open_split


def autocast(device: torch.device, amp: str):
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


@contextlib.contextmanager
def exact_fp32():
    """Disable TF32 for the duration, so an fp32 evaluation is fp32."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


# eval.batch_size was sized for GPT-2's context: 16 × 1,024 × 50,257 fp32 logits are 3.3 GB (and the cross-
# entropy's log-softmax as much again). A longer sequence counts as seq_len/1,024 of them, so a 3,072-token
# context evaluates 5 sequences per pass, not 16, and the logits stay within what the batch size was chosen for.
REFERENCE_CONTEXT = 1024


def sequences_per_pass(batch_size: int, seq_len: int) -> int:
    """eval.batch_size sequences per forward pass, scaled down past REFERENCE_CONTEXT tokens (at least one)."""
    if seq_len <= REFERENCE_CONTEXT:
        return batch_size
    return max(1, batch_size * REFERENCE_CONTEXT // seq_len)


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module,
    split: Split,
    seq_len: int,
    n_sequences: int,
    batch_size: int,
    device: torch.device,
    amp: str = "fp32",
    rank: int = 0,
    world: int = 1,
) -> float:
    """Mean next-token cross-entropy over the first n_sequences windows of `split`, shared across ranks."""
    was_training = model.training
    model.eval()
    per_rank = -(-n_sequences // world)
    mine = range(rank * per_rank, min(n_sequences, (rank + 1) * per_rank))
    total = torch.zeros((), dtype=torch.float64, device=device)
    with exact_fp32() if amp == "fp32" else contextlib.nullcontext():
        per_pass = sequences_per_pass(batch_size, seq_len)
        for start in range(mine.start, mine.stop, per_pass):
            x, y = split.sequences(range(start, min(mine.stop, start + per_pass)), seq_len)
            x, y = x.to(device), y.to(device)
            with autocast(device, amp):
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
    if world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / (n_sequences * seq_len)


def main(argv: list[str] | None = None) -> None:
    from trainer import checkpoint
    from trainer.config import ConfigError, TrainConfig
    from trainer.model import GPT

    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoints/step_*.pt file")
    parser.add_argument("--data", help="dataset directory (default: the one the run trained on)")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--sequences", type=int, help="windows to evaluate (default: eval.*_sequences)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        state = checkpoint.load(args.checkpoint)
    except FileNotFoundError:
        sys.exit(f"error: checkpoint {args.checkpoint} does not exist (look in RUN_DIR/checkpoints/)")
    try:
        cfg = TrainConfig.model_validate(state["config"])
    except (KeyError, ValueError) as exc:
        sys.exit(f"error: {args.checkpoint} holds no valid config ({exc}); is it a trainer checkpoint?")
    device = torch.device(args.device)
    model = GPT(cfg.model).to(device)
    model.load_state_dict(state["model"])
    n = args.sequences or (cfg.test_windows() if args.split == "test" else cfg.eval.val_sequences)
    try:
        split = open_split(cfg.data, args.split, args.data)  # data.start_val_token skipped, as in training
        fixed_slice(split, cfg.model.context_length, n, f"eval.{args.split}_sequences")
    except (DataError, ConfigError) as exc:
        sys.exit(f"error: {exc}")
    loss = mean_loss(model, split, cfg.model.context_length, n, cfg.eval.batch_size, device, cfg.eval.amp)
    out = {"checkpoint": str(args.checkpoint), "step": state["step"], "split": args.split, "sequences": n, "loss": loss}
    print(json.dumps(out) if args.json else f"{args.split} loss {loss:.6f} over {n} sequences (step {state['step']})")


if __name__ == "__main__":
    main()

"""Position rules for a longer context (run.init_positions): interpolate vs tile vs from scratch, on tiny.

    .venv/bin/python bench/context_extension.py      # data/embedded, 64 -> 256 tokens; bench/results/*.json
    .venv/bin/python bench/context_extension.py --source-steps 300 --extend-steps 50 --short 64 --long 256

A source model trains at the short context; then for each rule its weights start a run at the long context
(trainer/init_from.py), and a third run starts from scratch. Every test loss here is over the same test
tokens (eval.test_tokens, a multiple of both contexts): the source's at the short context, each extended
model's before any training (step 0: what the rule alone gives) and after --extend-steps steps at the long
context. The numbers are losses, not timings; a tiny model trained for minutes is weak evidence about
GPT-2 small, so read it as which rule starts closer, not by how much at scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]


def snapshot(dest: Path) -> None:
    """A private copy of the trainer: the checkout is shared and edited while this runs for minutes."""
    shutil.copytree(REPO / "trainer", dest / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(dest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / "data/embedded"))
    ap.add_argument("--short", type=int, default=64, help="the source's context (tiny's)")
    ap.add_argument("--long", type=int, default=256, help="the extended context")
    ap.add_argument("--source-steps", type=int, default=300)
    ap.add_argument("--extend-steps", type=int, default=50)
    ap.add_argument("--extend-lr", type=float, default=3e-4, help="peak LR of the extended runs (20%% warmup, cosine)")
    ap.add_argument("--test-tokens", type=int, default=48 * 1024, help="a multiple of both contexts")
    ap.add_argument("--json", default=str(REPO / "bench/results/context_extension.json"))
    ap.add_argument("--source", help="a finished source run directory to reuse (trained at --short)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ctx-bench-"))
    snapshot(work / "code")

    import torch

    torch.set_num_threads(1)
    from trainer import config, init_from, presets
    from trainer.data import Split
    from trainer.distributed import Dist
    from trainer.evaluate import mean_loss
    from trainer.model import GPT
    from trainer.train import train

    common = {
        "data.path": args.data,
        "eval.test_tokens": args.test_tokens,
        "eval.val_sequences": 4,
        "run.log_interval": 10,
        "run.checkpoint_interval": 0,
    }
    if "sample" in config.TrainConfig.model_fields:
        common["sample.prompts"] = []
    source_sets = {**common, "model.context_length": args.short, "run.steps": args.source_steps}
    source = presets.load(preset_name="tiny", overrides=source_sets)
    source_dir = Path(args.source) if args.source else work / "source"
    if not args.source:
        train(source, source_dir)
    rows = [("source", args.short, None, _result(source_dir)["test_loss"])]
    test = Split(args.data, "test")
    long_sets = {
        **common,
        "model.context_length": args.long,
        "run.steps": args.extend_steps,
        "run.batch_size": 4,
        "optim.lr": args.extend_lr,
        # A fresh AdamW moves every weight by ~lr from its first step (its moments are empty): without a warmup
        # the extended runs first lose what the source learnt. The experiment file warms up for 5% as well.
        "schedule.kind": "cosine",
        "schedule.warmup": 0.2,
        "schedule.min_lr_ratio": 0.1,
        # The tokens after those the source read: a second pass over them would be a second epoch, not context.
        "data.start_train_token": source.total_steps() * source.run.batch_size * args.short,
    }
    arms = {
        "interpolate": {"run.init_from": str(source_dir), "run.init_positions": "interpolate"},
        "tile": {"run.init_from": str(source_dir), "run.init_positions": "tile"},
        "scratch": {},
    }
    configs = {}
    for name, sets in arms.items():
        cfg = configs[name] = presets.load(preset_name="tiny", overrides={**long_sets, **sets})
        torch.manual_seed(cfg.run.seed)
        model = GPT(cfg.model)
        if cfg.run.init_from is not None:
            (work / f"step0-{name}").mkdir()
            init_from.initialise(cfg, work / f"step0-{name}", Dist(), model)
        start = mean_loss(model, test, args.long, cfg.test_windows(), cfg.eval.batch_size, torch.device("cpu"))
        train(cfg, work / name)
        rows.append((name, args.long, start, _result(work / name)["test_loss"]))
    print(
        f"\ntest loss over the same {args.test_tokens:,} tokens; {args.extend_steps} steps of 4 × {args.long} "
        f"tokens at lr {args.extend_lr:g}"
    )
    print(f"{'run':<12} {'context':>7} {'step 0':>9} {'trained':>9}")
    for name, ctx, start, end in rows:
        print(f"{name:<12} {ctx:>7} {'' if start is None else f'{start:.4f}':>9} {end:>9.4f}")
    out = {
        "command": " ".join(sys.argv),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "rows": [dict(run=n, context=c, step0_test_loss=s, test_loss=e) for n, c, s, e in rows],
        "configs": {
            "source": source.model_dump(mode="json"),
            **{k: v.model_dump(mode="json") for k, v in configs.items()},
        },
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    shutil.rmtree(work, ignore_errors=True)


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


if __name__ == "__main__":
    main()

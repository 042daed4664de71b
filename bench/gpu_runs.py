"""Training runs on a GPU through the real worker: time to first step cold and warm, the GPU-idle gap between
runs, and the loss curve of the gpt2-small shape on the embedded corpus.

    python bench/gpu_runs.py --data data/embedded --runs 3 --steps 200 --json bench/results/gpu-runs.json

`--runs` seeds of one config (gpt2-small, bf16 + compile unless --set says otherwise) run one after another
on one worker slot (orchestrator.worker.Worker, no MLflow), with the compile caches (inductor's FX-graph and
Triton caches) in a fresh directory: the first run compiles cold, the later ones find the first run's
kernels. Gaps are measured as bench/orchestrator.py measures them on the CPU (worker_gaps there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import specs  # noqa: E402
from trainer.__main__ import parse_sets  # noqa: E402


def bench_orchestrator():
    """bench/orchestrator.py as a module (its name would shadow the orchestrator package on sys.path)."""
    spec = importlib.util.spec_from_file_location("bench_orchestrator", REPO / "bench" / "orchestrator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fmt(value, spec: str) -> str:
    """A number in `spec`, or '-' as wide where the run did not record it."""
    return "-".rjust(len(format(0, spec))) if value is None else format(value, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "data" / "embedded")
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (run.batch_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpu", type=int, help="the GPU to train on (default: the CPU)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "gpu-runs.json")
    args = p.parse_args()

    base = {
        "data.path": str(args.data.resolve()),
        "precision.amp": "bf16",
        "precision.compile": True,
        "run.batch_size": args.batch_size,
        "run.steps": args.steps,
        "run.log_interval": 1,
        "run.checkpoint_interval": 0,
        "eval.val_sequences": 16,
        "eval.test_sequences": 48,
        **parse_sets(args.set),
    }
    exp = specs.Experiment(name="gpu-runs", preset=args.preset, base=base, seeds=args.runs)
    root = Path(tempfile.mkdtemp(prefix="orch-gpu-runs-"))
    # Fresh compile caches, inherited by every trainer the worker starts: the first run is cold.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor-cache")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton-cache")
    gaps, runs = bench_orchestrator().worker_gaps(
        root, exp, tracker=None, gpus=None if args.gpu is None else [str(args.gpu)]
    )

    print(f"\n{args.runs} runs of {args.preset} {json.dumps(base)}")
    print(
        f"{'run':<18} {'popen->step 1 done':>19} {'step ms':>8} {'tokens/s':>11} {'MFU':>6} {'micro':>5} "
        f"{'test loss':>9}"
    )
    for i, r in enumerate(runs):
        label = f"{r['run'][:8]} ({'cold' if i == 0 else 'warm'})"
        print(
            f"{label:<18} {fmt(r['popen -> first step done (start-up, compile)'], '17.2f')} s "
            f"{fmt(1000 * r['one training step, median'], '8.1f')} {fmt(r['tokens_per_s'], '11,.0f')} "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '5.1f')}% {fmt(r['micro_batch_size'], '5')} "
            f"{fmt(r['test_loss'], '9.4f')}"
        )
    for g in gaps:
        print(
            f"gap {g['prev'][:8]} -> {g['next'][:8]}: "
            + ", ".join(f"{k.strip()} {v:.3f} s" for k, v in g.items() if isinstance(v, float))
        )
    losses = runs[0]["losses"]
    marks = sorted({1, *range(25, args.steps + 1, 25)})
    print("loss of run 1: " + ", ".join(f"step {s} {loss:.3f}" for s, loss in losses if s in marks))

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "preset": args.preset,
                "config": base,
                "time_to_first_step_s": {
                    "cold": runs[0]["popen -> first step done (start-up, compile)"],
                    "warm": statistics.median(r["popen -> first step done (start-up, compile)"] for r in runs[1:])
                    if len(runs) > 1
                    else None,
                },
                "idle_gap_s": statistics.median(g["GPU-idle gap: trainer exit -> next first step"] for g in gaps)
                if gaps
                else None,
                "idle_gap_at_most_s": statistics.median(
                    g["GPU-idle gap, at most: trainer exit -> next first step done"] for g in gaps
                )
                if gaps
                else None,
                "runs": runs,
                "gaps": gaps,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

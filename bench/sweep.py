"""Sweep strategies: TPE + median pruning against a plain grid, over the same λ × η ranges on the tiny preset.

    .venv/bin/python bench/sweep.py                 # 9 trials each, 40 steps per trial; bench/results/sweep.json
    .venv/bin/python bench/sweep.py --trials 9 --steps 40 --in-flight 2 --json PATH

Each strategy is a complete, real sweep: its own SQLite database and runs folder, an `orch worker` and an
`orch sweep FILE` as subprocesses (as tests/test_sweep.py runs them). The cost axis is training tokens, not
wall time: the box is shared, and tokens are what pruning saves. A trial's tokens are the steps its run
actually trained (result.json "step", smaller for a pruned run; 0 for one cancelled before it started) ×
batch × context, read back from the runs table. Both strategies share one synthetic dataset, one space
and one sampler seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench/orchestrator.py and bench/trainer.py would shadow the packages: drop the script's folder from the path.
# The packages themselves are imported from a snapshot (see snapshot()), so nothing is imported up here.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

ORCH = [sys.executable, "-m", "orchestrator.cli"]
SPACE = '{"optim.lr": LogUniform(low=3e-4, high=1e-2), "optim.weight_decay": LogUniform(low=1e-3, high=1.0)}'
STRATEGIES = {"grid": dict(sampler="grid", pruner="none"), "tpe": dict(sampler="tpe", pruner="median")}
CONTEXT, BATCH = 32, 8
WITHIN = 0.01  # "reached the optimum": best-so-far val loss within this of the best either strategy found


def snapshot(dest: Path) -> Path:
    """A private copy of the code the benchmark runs. The checkout is shared and edited while a run takes
    minutes; a worker started before an edit and a reader after it disagree (a new migration made one
    run die with SchemaError). Every process here — this one included — imports this copy."""
    for pkg in ("orchestrator", "trainer", "tests"):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(dest))
    return dest


def make_dataset(out: Path) -> Path:
    """The tests' synthetic corpus, prepared into real shards (the same data for both strategies)."""
    from tests.conftest import TEST_FRACTION, VAL_FRACTION, synthetic_documents
    from trainer.prepare import prepare

    prepare(
        synthetic_documents(),
        out,
        source="synthetic",
        command="bench/sweep.py",
        val_fraction=VAL_FRACTION,
        test_fraction=TEST_FRACTION,
        shard_tokens=20_000,
        progress=False,
    )
    return out


def sweep_file(path: Path, name: str, data: Path, args, sampler: str, pruner: str) -> Path:
    # log_interval 1: the trainer polls its STOP file at every sync point, so a pruned run stops at the next
    # step rather than the next eval. Cosine schedule as in experiments/sweep_lr_wd.py. Checkpoints only at
    # the end (nothing here is preempted).
    base = {
        "data.path": str(data),
        "model.context_length": CONTEXT,
        "run.batch_size": BATCH,
        "run.steps": args.steps,
        "eval.interval": args.eval_interval,
        "run.log_interval": 1,
        "run.checkpoint_interval": 0,
        "schedule.kind": "cosine",
        "schedule.warmup": 0.05,
        "schedule.min_lr_ratio": 0.1,
    }
    # grid_points**2 == trials for the default 9 (3 × 3); the driver caps a grid sweep at the grid's size.
    grid_points = max(2, round(args.trials**0.5))
    path.write_text(
        "from orchestrator.specs import LogUniform, Sweep\n"
        f"sweep = Sweep(name={name!r}, preset='tiny', base={base!r}, space={SPACE},\n"
        f"    sampler={sampler!r}, pruner={pruner!r}, trials={args.trials}, in_flight={args.in_flight},\n"
        f"    grid_points={grid_points}, sampler_seed=0)\n"
    )
    return path


def run_strategy(label: str, work: Path, data: Path, args, env: dict) -> dict:
    import optuna

    from orchestrator import queries
    from orchestrator import sweep as sw
    from orchestrator.db import connect

    db = f"sqlite:///{work / 'results.db'}"
    spec = sweep_file(work / f"{label}.py", label, data, args, **STRATEGIES[label])
    # One worker with one CPU slot per trial in flight (the worker gives each slot cores / slots threads).
    # Short heartbeats: the driver sees a run's val curve, and the worker sees a prune request, only at a beat.
    worker = subprocess.Popen(
        [
            *ORCH,
            "worker",
            "--db",
            db,
            "--runs-dir",
            str(work / "runs"),
            "--no-mlflow",
            "--gpus",
            "",
            "--parallel",
            str(args.in_flight),
            "--heartbeat",
            "0.5",
        ],
        cwd=work,
        env=env,
        stdout=open(work / "worker.log", "w"),
        stderr=subprocess.STDOUT,
    )
    loads, attempts, out = [os.getloadavg()[0]], [], ""
    t0 = time.time()
    try:
        # A driver that exits non-zero is restarted, as a user would: the sweep resumes from the database.
        for attempt in range(3):
            log = work / f"driver-{attempt}.log"  # a file, not a pipe: a long sweep must not fill a pipe buffer
            with open(log, "w") as f:
                drv = subprocess.Popen(
                    [*ORCH, "sweep", str(spec), "--db", db, "--poll", "0.3", "--no-mlflow"],
                    cwd=work,
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
                while drv.poll() is None:
                    time.sleep(2)
                    loads.append(os.getloadavg()[0])
            text = log.read_text()
            out += text
            attempts.append({"exit": drv.returncode, "tail": text.strip().splitlines()[-3:]})
            if drv.returncode == 0:
                break
    finally:
        worker.terminate()
        worker.wait(120)
    wall = time.time() - t0

    engine = connect(db)
    runs = {r.id: r for _, _, r in queries.runs_of(engine, [label])}
    study = optuna.load_study(study_name=label, storage=sw.storage(engine))
    decided = {int(n): int(s) for n, s in re.findall(r"trial (\d+): pruned at step (\d+)", out)}
    trials = []
    for t in study.get_trials(deepcopy=False):
        rs = [runs[i] for i in t.user_attrs.get(sw.RUNS_ATTR, []) if i in runs]
        steps = sum((r.result or {}).get("step", 0) for r in rs)
        tests = [r.test_loss for r in rs if r.test_loss is not None]
        # Optuna gives a pruned trial its last reported value: an early, not a final, val loss.
        trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "val_loss": t.value,
                "test_loss": statistics.mean(tests) if tests and t.value is not None else None,
                "steps": steps,
                "tokens": steps * BATCH * CONTEXT,
                "pruned_decided_at": decided.get(t.number),
                "run_states": [r.state for r in rs],
                "tokens_per_s": rs[0].tokens_per_s if rs else None,
                "stop_latency_s": stop_latency(work / "runs", rs, decided.get(t.number)),
                "finished_at": max((r.finished_at or 0 for r in rs), default=0),
            }
        )
    trials.sort(key=lambda t: t["finished_at"])  # completion order: the order a user sees results arrive
    for t in trials:
        t["finished_at"] = round(t["finished_at"] - t0, 1)  # seconds since the strategy started
    return {
        "wall_s": round(wall, 1),
        "driver_attempts": attempts,
        "trials": trials,
        "load_avg_1m": {
            "start": loads[0],
            "median": statistics.median(loads),
            "max": max(loads),
            "end": os.getloadavg()[0],
        },
    }


def stop_latency(runs_dir: Path, runs: list, decided: int | None) -> float | None:
    """Seconds from the eval the pruner acted on to the run's last trained step (the trainer's own clock):
    the time the prune request takes through worker forwarding, heartbeat, driver and STOP file."""
    if decided is None or len(runs) != 1:
        return None
    try:
        lines = (runs_dir / runs[0].id / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    events = [json.loads(line) for line in lines if line.strip()]
    at_eval = [e["time"] for e in events if "val_loss" in e and e["step"] == decided]
    trained = [e["time"] for e in events if "loss" in e]
    return round(trained[-1] - at_eval[0], 2) if at_eval and trained else None


def summarise(res: dict, target: float, full_tokens: int) -> dict:
    """The best-so-far curve over cumulative tokens, and what the table prints."""
    spent, best, curve, reached = 0, None, [], None
    for t in res["trials"]:
        spent += t["tokens"]
        if t["state"] == "complete" and (best is None or t["val_loss"] < best["val_loss"]):
            best = t
        curve.append(
            {
                "tokens": spent,
                "trial": t["number"],
                "best_val": best and best["val_loss"],
                "best_test": best and best["test_loss"],
            }
        )
        if reached is None and best is not None and best["val_loss"] <= target:
            reached = spent
    pruned = [t for t in res["trials"] if t["state"] == "pruned"]
    return {
        "tokens_total": spent,
        "best_trial": best and best["number"],
        "best_params": best and best["params"],
        "best_val": best and best["val_loss"],
        "best_test": best and best["test_loss"],
        "tokens_to_target": reached,
        "trials_to_target": next(
            (i + 1 for i, c in enumerate(curve) if c["best_val"] is not None and c["best_val"] <= target), None
        ),
        "pruned": len(pruned),
        "complete": sum(t["state"] == "complete" for t in res["trials"]),
        "tokens_saved_by_pruning": sum(full_tokens - t["tokens"] for t in pruned),
        "median_stop_latency_s": statistics.median(lat)
        if (lat := [t["stop_latency_s"] for t in pruned if t["stop_latency_s"] is not None])
        else None,
        "curve": curve,
    }


def fmt(v, spec=",.0f"):
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=9, help="trials per strategy (the grid is √trials per key)")
    ap.add_argument("--steps", type=int, default=40, help="run.steps of a trial that is not pruned")
    ap.add_argument("--eval-interval", type=int, default=4, help="eval.interval: the pruner's resolution")
    ap.add_argument("--in-flight", type=int, default=2, help="trials at once (= the worker's CPU slots)")
    ap.add_argument("--strategies", default="grid,tpe")
    ap.add_argument("--json", default=str(REPO / "bench/results/sweep.json"))
    args = ap.parse_args()

    full_tokens = args.steps * BATCH * CONTEXT
    results, started = {}, datetime.now(timezone.utc).isoformat(timespec="seconds")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout  # noqa: E731
    commit, modified = git("rev-parse", "HEAD").strip(), git("status", "--porcelain", "orchestrator", "trainer")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        code = snapshot(Path(tmp) / "code")
        import optuna

        env = dict(
            os.environ,
            PYTHONPATH=str(code) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            ORCH_GIT_COMMIT=commit + ("+modified" if modified else ""),
        )
        env.pop("OMP_NUM_THREADS", None)  # let the worker split the cores between its slots
        data = make_dataset(Path(tmp) / "data")
        for label in args.strategies.split(","):
            (Path(tmp) / label).mkdir()
            print(f"--- {label}: {args.trials} trials × {args.steps} steps", flush=True)
            results[label] = run_strategy(label, Path(tmp) / label, data, args, env)
            r = results[label]
            print(
                f"    {r['wall_s']:.0f} s, driver exits {[a['exit'] for a in r['driver_attempts']]}, "
                f"load {r['load_avg_1m']['median']:.1f}",
                flush=True,
            )

    bests = [t["val_loss"] for r in results.values() for t in r["trials"] if t["state"] == "complete"]
    target = min(bests) + WITHIN
    for r in results.values():
        r["summary"] = summarise(r, target, full_tokens)

    print(
        f"\nper trial: {args.steps} steps × {BATCH} × {CONTEXT} = {full_tokens:,} tokens unless pruned; "
        f"target = best val of both + {WITHIN} = {target:.4f}\n"
    )
    print(
        "| strategy | tokens spent | best val | its test | best η / λ | tokens to target (trials) "
        "| complete / pruned | tokens saved by pruning | wall s | load (median) | driver exits |"
    )
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---|")
    for label, r in results.items():
        s = r["summary"]
        p = s["best_params"] or {}
        print(
            f"| {label} | {s['tokens_total']:,} | {fmt(s['best_val'], '.4f')} | {fmt(s['best_test'], '.4f')} | "
            f"{fmt(p.get('optim.lr'), '.2e')} / {fmt(p.get('optim.weight_decay'), '.2e')} | "
            f"{fmt(s['tokens_to_target'])} ({fmt(s['trials_to_target'], 'd')}) | {s['complete']} / {s['pruned']} | "
            f"{s['tokens_saved_by_pruning']:,} | {r['wall_s']:.0f} | {r['load_avg_1m']['median']:.1f} | "
            f"{[a['exit'] for a in r['driver_attempts']]} |"
        )
    for label, r in results.items():
        print(
            f"\n{label}, in completion order:\n| trial | state | η | λ | steps | cum. tokens "
            "| val (pruned: last eval) | test | best val so far | prune decided at step | stop latency s |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for t, c in zip(r["trials"], r["summary"]["curve"]):
            print(
                f"| {t['number']} | {t['state']} | {t['params'].get('optim.lr', 0):.2e} | "
                f"{t['params'].get('optim.weight_decay', 0):.2e} | {t['steps']} | {c['tokens']:,} | "
                f"{fmt(t['val_loss'], '.4f')} | {fmt(t['test_loss'], '.4f')} | {fmt(c['best_val'], '.4f')} | "
                f"{fmt(t['pruned_decided_at'], 'd')} | {fmt(t['stop_latency_s'], '.1f')} |"
            )

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "timestamp": started,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "optuna": optuna.__version__,
                    "platform": platform.platform(),
                },
                "git_commit": commit,
                "modified_at_start": modified.split()[1::2],
                "settings": {
                    **vars(args),
                    "context": CONTEXT,
                    "batch": BATCH,
                    "tokens_per_full_trial": full_tokens,
                    "space": SPACE,
                    "sampler_seed": 0,
                    "within": WITHIN,
                    "target_val": target,
                    "strategies": STRATEGIES,
                },
                "strategies": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

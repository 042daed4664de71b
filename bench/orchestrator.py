"""Orchestrator overheads: submit, concurrent claims, `orch table`, the GPU-idle gap between runs (cold starts
against warm spares), and MLflow metric forwarding — on SQLite and a private PostgreSQL cluster.

    .venv/bin/python bench/orchestrator.py                        # everything, 10,000 runs, 3 repeats
    .venv/bin/python bench/orchestrator.py --runs 1000 --repeats 1 --skip-postgres --skip-gpu-gap
    .venv/bin/python bench/orchestrator.py --gap-only             # the idle gap alone: warm spares on vs off

Every number is the real code path (orchestrator.submission, .queue, .table, .worker, .tracking); only the
set-up that is not being measured is shortcut (runs are marked finished with one bulk UPDATE). Results are medians over
--repeats; each repeat uses a fresh database so no repeat sees another's rows. The per-repeat values and the
machine go to bench/results/orchestrator.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import select
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# First on the path: run as a script, bench/ comes first and its orchestrator.py and trainer.py (these
# benchmarks) would shadow the packages of the same names. tests.servers is imported from the checkout.
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from orchestrator import queries, queue, runspec, specs, submission, table_render  # noqa: E402
from orchestrator import table as tbl  # noqa: E402
from orchestrator.db import Run, connect  # noqa: E402
from orchestrator.states import RunState  # noqa: E402
from tests.servers import MlflowServer, Postgres, pg_bin  # noqa: E402

SAMPLES: dict[tuple[str, str, str], list[float]] = {}  # (measure, backend, unit) -> one value per repeat
EXTRA: dict[str, object] = {}  # numbers measured once (start-up components), and raw gap records


def rec(measure: str, backend: str, unit: str, value: float) -> None:
    SAMPLES.setdefault((measure, backend, unit), []).append(value)


def clock(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


# ---------------------------------------------------------------------------------------------------------
# 1–3. Submit, claim, table: one fresh database per backend per repeat, the phases chained in it.


def big_experiment(n: int) -> specs.Experiment:
    """1 baseline + 99 interventions × 100 seeds for n=10,000 (arms × seeds = n for any n divisible by 100)."""
    seeds = 100 if n >= 100 else n
    arms = max(1, n // seeds)
    return specs.Experiment(
        name="bench",
        preset="tiny",
        seeds=seeds,
        interventions=[
            specs.Intervention(name=f"lr-{i}", set={"optim.lr": 1e-3 * (1 + i / 1000)}) for i in range(1, arms)
        ],
    )


def _claimer(url: str, name: str, ready, go, out) -> None:
    """One claiming process: its own engine, then claim(…, 1) in a loop as a worker with one slot does."""
    engine = connect(url)
    ready.put(name)
    go.wait()
    got, lat = [], []
    while True:
        t = time.perf_counter()
        runs = queue.claim(engine, name, 1)
        lat.append(time.perf_counter() - t)
        if not runs:
            break
        got.append(runs[0].id)
    out.put((name, got, lat[:-1], time.time()))


def claim_all(engine, url: str, n_procs: int, expected: set[str]) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claimer, args=(url, f"claimer-{i}", ready, go, out)) for i in range(n_procs)]
    for p in procs:
        p.start()
    for _ in procs:  # imports and connects are not what is timed: start them all at once, ready
        ready.get(timeout=300)
    t0 = time.time()
    go.set()
    results = [out.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    elapsed = max(r[3] for r in results) - t0
    claimed = [rid for r in results for rid in r[1]]
    # Exactly once: no id twice across claimers, none missing, and the database agrees on who has each.
    assert len(claimed) == len(set(claimed)) == len(expected) and set(claimed) == expected, "claim not exactly-once"
    owner = {rid: name for name, got, _, _ in results for rid in got}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Run.id, Run.worker, Run.state)).all()
    assert all(s == RunState.RUNNING and owner[i] == w for i, w, s in rows), "database disagrees with the claimers"
    return elapsed, [x for r in results for x in r[2]]


def finish_all_bulk(engine, rng: random.Random) -> None:
    """Set-up only: every run succeeded with a synthetic loss and a result.json-sized result."""
    t = Run.__table__
    stmt = (
        sa.update(t)
        .where(t.c.id == sa.bindparam("rid"))
        .values(
            state=RunState.SUCCEEDED,
            worker=None,
            test_loss=sa.bindparam("loss"),
            finished_at=time.time(),
            result=sa.bindparam("res", type_=t.c.result.type),
        )
    )
    with engine.begin() as conn:
        ids = conn.execute(sa.select(t.c.id)).scalars().all()
        rows = []
        for rid in ids:
            loss = 3.3 + rng.gauss(0, 0.02)
            rows.append(
                dict(
                    rid=rid,
                    loss=loss,
                    res={
                        "status": "succeeded",
                        "step": 6,
                        "total_steps": 6,
                        "tokens": 768,
                        "test_loss": loss,
                        "val_loss": loss + 0.01,
                        "train_loss": loss - 0.05,
                        "tokens_per_s": 1500.0,
                        "params": 6_600_000,
                        "environment": {"torch": "2.x", "device": "cpu", "world": 1, "hostname": "bench"},
                    },
                )
            )
        conn.execute(stmt, rows)


def queue_benchmarks(args, backends: dict[str, callable]) -> None:
    exp = big_experiment(args.runs)
    for r in range(args.repeats):
        dt, runs = clock(runspec.expand, exp)
        n = len(runs)
        rec(f"expand {n:,} runs (runspec.expand)", "-", "s", dt)
        for backend, fresh_url in backends.items():
            url = fresh_url(r)
            engine = connect(url)
            rec(
                f"submit {n:,} new runs (submission.submit)",
                backend,
                "s",
                clock(submission.submit, engine, exp, runs)[0],
            )
            rec(f"resubmit {n:,} runs, all reused", backend, "s", clock(submission.submit, engine, exp, runs)[0])
            elapsed, lat = claim_all(engine, url, args.claimers, {x.id for x in runs})
            rec(f"claim {n:,} runs, {args.claimers} processes", backend, "s", elapsed)
            rec("  claims per second", backend, "claims/s", n / elapsed)
            rec("  one claim() call, median", backend, "ms", 1000 * statistics.median(lat))
            rec("  one claim() call, p99", backend, "ms", 1000 * statistics.quantiles(lat, n=100)[98])
            finish_all_bulk(engine, random.Random(r))
            t_rows, rows = clock(queries.runs_of, engine)
            t_build, boards = clock(tbl.build, rows)
            t_render, md = clock(table_render.render, boards, fmt="markdown")
            assert all(f"| {i.name}" in md for i in exp.interventions[-1:]) and "| baseline" in md, "table lacks rows"
            rec(f"table over {n:,} runs: runs_of", backend, "s", t_rows)
            rec("  table.build", backend, "s", t_build)
            rec("  table.render(markdown)", backend, "s", t_render)
            rec("  runs_of+build+render", backend, "s", t_rows + t_build + t_render)
            cli = [sys.executable, "-m", "orchestrator.cli", "table", "--format", "markdown", "--db", url]
            dt, out = clock(subprocess.run, cli, cwd=REPO, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            rec("  `orch table --format markdown` (process)", backend, "s", dt)
            engine.dispose()
            print(f"repeat {r + 1}/{args.repeats} {backend}: done", file=sys.stderr)
    # The import floor of any `orch` command, to read the CLI number against.
    rec(
        "`orch --help` (process: imports only)",
        "-",
        "s",
        clock(subprocess.run, [sys.executable, "-m", "orchestrator.cli", "--help"], capture_output=True)[0],
    )


# ---------------------------------------------------------------------------------------------------------
# 4. The GPU-idle gap: a real Worker, real trainers (one process each, started cold or by a warm spare), a
# tiny dataset. The variants alternate within each repeat, so drift on a shared machine hits them alike.

VARIANTS = {  # label: (the worker's warm_spares setting, MLflow tracking)
    "cold start, no tracker": ("off", False),
    "warm spare, no tracker": ("on", False),
    "cold start, MLflow sqlite": ("off", True),
    "warm spare, MLflow sqlite": ("on", True),
}
GAP = "GPU-idle gap: trainer exit -> next first step"
# The estimate above puts B's first step one median step before its logged end. With a spare warming beside
# B (a CPU slot's spare shares its cores), B's median step is slower than its first step (the spare starts
# after that step), and the estimate can go below zero. This bound counts B's whole first step as idle.
GAP_BOUND = "GPU-idle gap, at most: trainer exit -> next first step done"


def synthetic_documents(n_docs: int = 420, seed: int = 1234) -> list[str]:
    """tests/conftest.py's generator, shortened: deterministic English-ish documents (~150 tokens each)."""
    rng = random.Random(seed)
    words = [
        ["the farmer", "a small dog", "the old sailor", "my sister", "the teacher", "the baker"],
        ["sees", "finds", "carries", "paints", "follows", "builds"],
        ["a red apple", "the long river", "a wooden boat", "the quiet town", "an old letter"],
        ["in the morning", "after the rain", "near the market", "before dinner", "every summer"],
    ]
    return [
        f"Story {d}. "
        + " ".join(" ".join(rng.choice(w) for w in words).capitalize() + "." for _ in range(rng.randint(8, 16)))
        for d in range(n_docs)
    ]


class ExitWatcher(threading.Thread):
    """When each trainer process exits, seen through a pidfd: it does not reap, so the Worker's poll is untouched."""

    def __init__(self, worker):
        super().__init__(daemon=True)
        self.worker, self.exits, self.done = worker, {}, False

    def run(self) -> None:
        fds: dict[int, str] = {}
        while not self.done:
            for rid, launch in list(self.worker.active.items()):
                if launch.handle is not None and rid not in self.exits and rid not in fds.values():
                    fds[os.pidfd_open(launch.handle.pid)] = rid
            ready = select.select(list(fds), [], [], 0.002)[0] if fds else time.sleep(0.002) or []
            for fd in ready:
                self.exits[fds.pop(fd)] = time.time()
                os.close(fd)


def gap_benchmark(args, tmp: Path, data_dir: Path, label: str, r: int) -> None:
    """The gaps between consecutive tiny CPU runs on one worker slot, in one of VARIANTS."""
    from orchestrator.tracking import Tracker

    spares, tracked = VARIANTS[label]
    base = {
        "data.path": str(data_dir),
        "model.context_length": 16,
        "run.batch_size": 8,
        "run.steps": args.gap_steps,
        "run.log_interval": 1,
        "run.checkpoint_interval": 0,
        "eval.val_sequences": 8,
        "eval.test_sequences": 32,
        "sample.prompts": [],  # the closing samples lengthen each run by seconds here, and change no gap
    }
    exp = specs.Experiment(name="gap", preset="tiny", base=base, seeds=args.gap_runs)
    root = tmp / f"gap-{label.replace(' ', '-').replace(',', '')}-{r}"
    tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}") if tracked else None
    gaps, runs = worker_gaps(root, exp, tracker, warm_spares=spares)
    for parts in gaps:
        for k, v in parts.items():
            if isinstance(v, float):
                rec(k, label, "s", v)
        EXTRA.setdefault("gap_records", []).append({"variant": label, "repeat": r, **parts})
    for run in runs:
        rec("run: launch -> trainer exit (its own wall time)", label, "s", run["launch -> exit"])
        rec("run: time_to_first_step_s (result.json)", label, "s", run["time_to_first_step_s"])
        EXTRA.setdefault("gap_runs", []).append(
            {"variant": label, "repeat": r, **{k: v for k, v in run.items() if k != "losses"}}
        )
    print(f"gap repeat {r + 1} ({label}): done", file=sys.stderr)


def gap_summary() -> dict:
    """Cold against warm, per tracker: the median gap over every repeat's gaps, and the median bound with
    their ratio (the bound's: the estimate of a warm gap can be near zero or below)."""
    out = {}
    for tracker in ("no tracker", "MLflow sqlite"):
        cold, warm, cold_b, warm_b = (
            SAMPLES.get((measure, f"{start} {tracker}", "s"))
            for measure in (GAP, GAP_BOUND)
            for start in ("cold start,", "warm spare,")
        )
        if cold and warm and cold_b and warm_b:
            c, w = statistics.median(cold_b), statistics.median(warm_b)
            out[tracker] = {
                "cold_median_s": statistics.median(cold),
                "warm_median_s": statistics.median(warm),
                "cold_bound_median_s": c,
                "warm_bound_median_s": w,
                "cold_over_warm_bound": c / w,
                "gaps": len(cold),
            }
    return out


def worker_gaps(
    root: Path, exp: specs.Experiment, tracker=None, gpus: list[int] | None = None, warm_spares: str | None = None
) -> tuple[list[dict], list[dict]]:
    """Run every run of `exp` one after another on one worker slot (a real Worker and real trainers) and
    time, between consecutive runs A -> B: A's result.json mtime, A's process exit (pidfd), the worker's echo
    of A's finish and of B's launch (its Popen, or its handoff to a warm spare), and B's first step start (its
    first metrics event minus one median step). `warm_spares`: the Worker's setting (None: ORCH_WARM_SPARE,
    else GPU slots only). Returns those gaps, and per run the time from its launch to the end of its first
    step (start-up, compile) and to its exit."""
    from orchestrator.node import plan_slots
    from orchestrator.worker import Worker

    engine = connect(f"sqlite:///{root / 'results.db'}")
    submission.submit(engine, exp, runspec.expand(exp))
    log: list[tuple[float, str]] = []
    w = Worker(
        engine,
        runs_dir=root / "runs",
        slots=plan_slots(gpus, 1, 1),
        tracker=tracker,
        warm_spares=warm_spares,
        echo=lambda msg: log.append((time.time(), msg)),
    )  # CLI defaults: poll 0.2 s, heartbeat 5 s
    watcher = ExitWatcher(w)
    watcher.start()
    n_runs = len(runspec.expand(exp))
    done = w.run(until_empty=True)
    assert done == n_runs, f"{done} of {n_runs} runs finished; the worker said:\n" + "\n".join(m for _, m in log)
    watcher.done = True
    engine.dispose()
    started = [(t, m.split()[1]) for t, m in log if m.startswith("started ")]
    warm = {m.split()[1] for _, m in log if m.startswith("started ") and m.endswith("(warm spare)")}
    finished = {m.split()[0]: t for t, m in log if "(exit " in m}
    first_steps, runs = {}, []
    for popen, rid in started:
        metrics = [json.loads(line) for line in (root / "runs" / rid / "metrics.jsonl").read_text().splitlines()]
        steps = [e["time"] for e in metrics if "loss" in e]
        per_step = statistics.median(b - a for a, b in zip(steps, steps[1:]))
        first_steps[rid] = (steps[0] - per_step, per_step, steps[0])  # step 1 began, one step, it ended
        result = json.loads((root / "runs" / rid / "result.json").read_text())
        runs.append(
            {
                "run": rid,
                "popen -> first step done (start-up, compile)": steps[0] - popen,
                "launch -> exit": watcher.exits[rid] - popen,
                "warm": rid in warm,
                "time_to_first_step_s": result.get("time_to_first_step_s"),
                "one training step, median": per_step,
                "micro_batch_size": result["micro_batch_size"],
                "tokens_per_s": result["tokens_per_s"],
                "mfu": result["mfu"],
                "test_loss": result["test_loss"],
                "losses": [(e["step"], e["loss"]) for e in metrics if "loss" in e],
            }
        )
    gaps = []
    for (_, prev), (popen, nxt) in zip(started, started[1:]):
        first_step, per_step, first_done = first_steps[nxt]
        result_mtime = (root / "runs" / prev / "result.json").stat().st_mtime
        exit_t = watcher.exits[prev]
        gaps.append(
            {
                "prev": prev,
                "next": nxt,
                "next started warm": nxt in warm,
                GAP: first_step - exit_t,
                GAP_BOUND: first_done - exit_t,
                "  teardown: result.json written -> trainer exit": exit_t - result_mtime,
                "  reaction: trainer exit -> next Popen": popen - exit_t,
                "    exit -> finish recorded (poll, finish)": finished[prev] - exit_t,
                "    finish recorded -> next Popen (claim, start)": popen - finished[prev],
                "  start-up: Popen -> first training step": first_step - popen,
                "  (one training step, median)": per_step,
                "idle incl. teardown: result.json -> first step": first_step - result_mtime,
            }
        )
    return gaps, runs


def startup_components(data_dir: Path) -> dict[str, float]:
    """Where a trainer's start-up goes, each measured once: fresh interpreters, then in-process steps."""
    py = sys.executable
    out = {
        name: clock(subprocess.run, cmd, capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))[0]
        for name, cmd in {
            "python -c pass": [py, "-c", "pass"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "python -m torch.distributed.run --help": [py, "-m", "torch.distributed.run", "--help"],
            "python -c 'import trainer.train'": [py, "-c", "import trainer.train"],
            "... and build an AdamW (imports torch._dynamo)": [
                py,
                "-c",
                "import trainer.train, torch; torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])",
            ],
        }.items()
    }
    from orchestrator.launchers.spare import Spare

    t0, spare = time.perf_counter(), Spare(dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1"))
    while not spare.ready() and spare.broken() is None:
        time.sleep(0.01)
    out["warm spare: start -> ready (python -m trainer.spare)"] = time.perf_counter() - t0
    assert spare.ready(), spare.state
    spare.kill()
    import torch

    from trainer import presets
    from trainer.data import Split
    from trainer.model import GPT

    cfg = presets.load(preset_name="tiny", overrides={"data.path": str(data_dir), "model.context_length": 16})
    out["dataset open (3 splits, in-process)"] = clock(
        lambda: [Split(cfg.data.path, s) for s in ("train", "val", "test")]
    )[0]
    torch.manual_seed(0)
    out["GPT(tiny) build (in-process)"] = clock(GPT, cfg.model)[0]
    return out


# ---------------------------------------------------------------------------------------------------------
# 5. Metric forwarding: Tracker.log_events (batched) against one log_metric call per point.


def mlflow_benchmark(args, label: str, uri: str) -> None:
    from orchestrator.tracking import Tracker
    from trainer import presets

    tracker = Tracker(uri)
    cfg = presets.preset("tiny")
    keys = ["tokens", "loss", "lr", "grad_norm", "clipped", "tokens_per_s", "mfu", "loss_scale"]
    for r in range(args.repeats):
        ids = [
            tracker.start_run(
                experiment="forward",
                all_experiments=["forward"],
                arm="baseline",
                run_id=f"{label}{r}{i}",
                config=cfg,
                seed=42,
                data_seed=0,
                repeat=0,
                git_commit=None,
            )
            for i in range(2)
        ]
        t0 = time.time()
        events = [{"step": s, "time": t0 + s, **{k: random.random() for k in keys}} for s in range(1, 126)]
        batch, n = clock(tracker.log_events, ids[0], events, {})
        assert n == 1000
        points = [(k, e[k], int(1000 * e["time"]), e["step"]) for e in events for k in keys][:100]

        def log_one_by_one(run_id: str, points: list) -> None:
            for k, v, ts, s in points:
                tracker.client.log_metric(run_id, k, v, timestamp=ts, step=s)

        one_by_one = 10 * clock(log_one_by_one, ids[1], points)[0]
        rec("log_events: 1,000 points (125 events x 8 keys)", label, "ms", 1000 * batch)
        rec("log_metric one by one: 100 points, x10", label, "ms", 1000 * one_by_one)
        rec("  batching speed-up (one-by-one / log_events)", label, "x", one_by_one / batch)


# ---------------------------------------------------------------------------------------------------------


def code_state() -> dict:
    """orchestrator/ and trainer/ change under a shared checkout: say which code was measured."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "commit": git("rev-parse", "HEAD"),
        "modified": git("status", "--porcelain", "orchestrator", "trainer").splitlines(),
    }


def machine() -> dict:
    import mlflow
    import torch

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    pg = pg_bin()  # not Postgres().bin: its constructor makes a temporary folder
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sqlalchemy": sa.__version__,
        "mlflow": mlflow.__version__,
        "sqlite": __import__("sqlite3").sqlite_version,
        "postgresql": subprocess.run([str(pg / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
        if pg
        else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", type=int, default=10_000, help="runs to submit, claim and tabulate")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (medians are reported)")
    p.add_argument("--claimers", type=int, default=8, help="concurrent claiming processes")
    p.add_argument("--gap-runs", type=int, default=4, help="runs per worker in the GPU-idle gap benchmark")
    p.add_argument("--gap-steps", type=int, default=6, help="training steps of each run in the gap benchmark")
    p.add_argument("--gap-only", action="store_true", help="only the GPU-idle gap (and its start-up components)")
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--skip-gpu-gap", action="store_true")
    p.add_argument("--skip-mlflow-server", action="store_true")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "orchestrator.json")
    args = p.parse_args()
    # The machine and the checkout are shared: record how busy the one was and which code the other held.
    started, load_before, code = time.time(), os.getloadavg(), code_state()
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    pg = None if args.skip_postgres or args.gap_only else Postgres().start()
    try:
        backends = {"sqlite": lambda r: f"sqlite:///{tmp / f'queue-{r}.db'}"}
        if pg:
            backends["postgresql"] = lambda r: pg.create_db(f"bench_{r}")
        if not args.gap_only:
            queue_benchmarks(args, backends)
        if not args.skip_gpu_gap:
            from trainer.prepare import prepare

            data_dir = tmp / "data"
            prepare(
                synthetic_documents(),
                data_dir,
                source="synthetic",
                command="bench",
                val_fraction=0.12,
                test_fraction=0.22,
                shard_tokens=20_000,
                progress=False,
            )
            for r in range(args.repeats):  # interleaved, so drift on a shared machine hits them alike
                for label in VARIANTS:
                    gap_benchmark(args, tmp, data_dir, label, r)
            EXTRA["gap_summary"] = gap_summary()
            EXTRA["startup_components_s"] = startup_components(data_dir)
        if not args.gap_only:
            mlflow_benchmark(args, "MLflow sqlite", f"sqlite:///{tmp / 'forward.db'}")
        if not (args.skip_mlflow_server or args.gap_only):
            dt, server = clock(MlflowServer(f"sqlite:///{tmp / 'server.db'}", tmp / "server-artifacts").start)
            EXTRA["mlflow_server_start_s"] = dt
            try:
                mlflow_benchmark(args, "MLflow server", server.url)
            finally:
                server.stop()
    finally:
        if pg:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [(m, b, statistics.median(v), u, v) for (m, b, u), v in SAMPLES.items()]
    widths = [max(len(x) for x in col) for col in zip(*[(m, b) for m, b, *_ in rows], ("measure", "backend"))]
    print(f"\n{'measure':<{widths[0]}}  {'backend':<{widths[1]}}  {'median':>10}  unit      all repeats")
    for m, b, med, u, v in rows:
        print(f"{m:<{widths[0]}}  {b:<{widths[1]}}  {med:>10.3f}  {u:<8}  {' '.join(f'{x:.3f}' for x in v)}")
    for k, v in EXTRA.get("startup_components_s", {}).items():
        print(f"start-up component, measured once: {k:<44} {v:.3f} s")
    if EXTRA.get("gap_summary"):
        print("\nGPU-idle gap, median over every repeat's gaps: cold start against warm spare (estimate; at most)")
        for tracker, g in EXTRA["gap_summary"].items():
            print(
                f"  {tracker:<14} cold {g['cold_median_s']:.3f} s; {g['cold_bound_median_s']:.3f} s   "
                f"warm {g['warm_median_s']:.3f} s; {g['warm_bound_median_s']:.3f} s   "
                f"cold/warm (at most) {g['cold_over_warm_bound']:.2f}x   ({g['gaps']} gaps each)"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": shlex.join([sys.executable, *sys.argv]),
                "date": datetime.now(timezone.utc).isoformat(),
                "duration_s": time.time() - started,
                "args": {k: str(v) for k, v in vars(args).items()},
                "machine": machine(),
                "code_at_start": code,
                "code_at_end": code_state(),
                "loadavg_1_5_15min": {"start": load_before, "end": os.getloadavg()},
                "results": [
                    {"measure": m.strip(), "backend": b, "unit": u, "median": med, "values": v}
                    for m, b, med, u, v in rows
                ],
                **EXTRA,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

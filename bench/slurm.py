"""Slurm pilots: how long from `orch slurm workers` to the first training step, and how long the GPU (here:
the CPU slot) waits between two runs inside one pilot — on a throwaway one-node Slurm cluster on localhost
(tests/slurm_cluster.py; needs Debian's slurm-wlm and munge).

    .venv/bin/python bench/slurm.py --repeats 3 --runs 3

Each repeat submits `--runs` tiny runs to a fresh SQLite database and one CPU pilot (`orch slurm workers
--no-mlflow`), waits for it, and reads the times back from the run directories:

- pilot start-up: the `orch slurm workers` call → the end of the first run's first step, minus one median
  step (when step 1 began), split into the sbatch call itself and what follows (Slurm scheduling the job,
  the batch script, the worker's start, the trainer's start-up);
- idle gap in the pilot: run A's result.json written → run B's first step begun (teardown, the worker's
  reaction, the claim, the trainer's start-up), as bench/orchestrator.py measures it outside Slurm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.slurm_cluster import SlurmCluster, install, slurm_version  # noqa: E402
from trainer.rundir import read_metrics  # noqa: E402

ORCH = [sys.executable, "-m", "orchestrator.cli"]


def synthetic_data(root: Path) -> Path:
    from tests.conftest import synthetic_documents
    from trainer.prepare import prepare

    out = root / "data"
    prepare(
        synthetic_documents(),
        out,
        source="synthetic",
        command="bench",
        val_fraction=0.12,
        test_fraction=0.22,
        shard_tokens=20_000,
        progress=False,
    )
    return out


def first_step_start(run_dir: Path) -> float:
    times = [e["time"] for e in read_metrics(run_dir) if "loss" in e]
    return times[0] - statistics.median(b - a for a, b in zip(times, times[1:]))


def one_pilot(cluster: SlurmCluster, root: Path, data: Path, n_runs: int, env: dict) -> dict:
    base = {
        "data.path": str(data),
        "model.context_length": 16,
        "run.batch_size": 8,
        "run.steps": 8,
        "run.log_interval": 1,
        "run.checkpoint_interval": 0,
        "eval.val_sequences": 8,
        "eval.test_sequences": 32,
    }
    (root / "exp.py").write_text(
        "from orchestrator.specs import Experiment\n"
        f"experiment = Experiment(name='pilot', preset='tiny', base={base!r}, "
        f"seeds={n_runs})\n"
    )
    env = {**env, "ORCH_DB": f"sqlite:///{root / 'results.db'}"}
    subprocess.run([*ORCH, "submit", str(root / "exp.py")], cwd=root, env=env, check=True, capture_output=True)
    t0 = time.time()
    out = subprocess.run(
        [
            *ORCH,
            "slurm",
            "workers",
            "--no-mlflow",
            "--time",
            "10",
            "--cpus-per-node",
            "1",
            "--runs-dir",
            str(root / "runs"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    t_sbatch = time.time()
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(": ", 1)[1].split(" (")[0]
    deadline = time.monotonic() + 600
    while cluster.squeue_state(job) not in (None, "COMPLETED"):
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.2)
    runs = sorted((p for p in (root / "runs").iterdir() if (p / "result.json").exists()), key=first_step_start)
    assert len(runs) == n_runs, [p.name for p in (root / "runs").iterdir()]
    first = first_step_start(runs[0])
    gaps = [first_step_start(b) - (a / "result.json").stat().st_mtime for a, b in zip(runs, runs[1:])]
    return {
        "job": job,
        "submit -> first step": first - t0,
        "sbatch call": t_sbatch - t0,
        "sbatch returned -> first step": first - t_sbatch,
        "gaps": gaps,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="runs per pilot (gaps: runs - 1 per pilot)")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "slurm.json")
    args = p.parse_args()
    ok, reason = install()
    if not ok:
        sys.exit(f"error: no Slurm here: {reason}")
    from tests.conftest import subprocess_env

    root = Path(tempfile.mkdtemp(prefix="orch-bench-slurm-"))
    data = synthetic_data(root)
    with SlurmCluster(nodes=1) as cluster:
        env = {**subprocess_env(), **cluster.env}
        pilots = []
        for r in range(args.repeats):
            (root / f"r{r}").mkdir()
            pilots.append(one_pilot(cluster, root / f"r{r}", data, args.runs, env))
            print(f"pilot {r + 1}/{args.repeats}: job {pilots[-1]['job']} done", file=sys.stderr)
        startup_s = cluster.startup_s
    rows = {k: [p[k] for p in pilots] for k in ("submit -> first step", "sbatch call", "sbatch returned -> first step")}
    rows["idle gap between runs in a pilot"] = [g for p in pilots for g in p["gaps"]]
    print(
        f"\nSlurm {slurm_version()} (one node on localhost, started in {startup_s:.2f} s); "
        f"{args.repeats} pilots x {args.runs} tiny CPU runs"
    )
    print(f"{'measure':<36} {'median s':>9}  all")
    for k, v in rows.items():
        print(f"{k:<36} {statistics.median(v):>9.2f}  {' '.join(f'{x:.2f}' for x in v)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "slurm": slurm_version(),
                "cluster_startup_s": startup_s,
                "pilots": pilots,
                "medians_s": {k: statistics.median(v) for k, v in rows.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

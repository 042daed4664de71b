"""Fault injection against the real system: `orch worker`s, `orch sweep`, trainers, torchrun agents, the
queue's database and the MLflow tracking server, each killed, stopped or starved on a seeded schedule, then
the queue drained and everything that must survive checked (bench/README.md, "Chaos campaign").

    .venv/bin/python bench/chaos.py --short --db both --seed 1          # CI size; writes bench/results/chaos.json
    .venv/bin/python bench/chaos.py --db postgres --faults 4 --seed 7   # longer, one database

Per database (each in its own temporary folder, with its own MLflow server):

1. main phase: 2 workers (--parallel 2, one trainer process per run, so `python -m trainer` directly), a
   sweep driver, and a queue of tiny runs topped up while the fault window lasts. Faults fire at times drawn
   from the seed: SIGKILL / SIGTERM of a worker (a new one is started after), SIGKILL of a trainer (at most
   one per run: a crash costs an attempt), SIGKILL of the sweep driver (restarted), PostgreSQL restarted or
   stopped for longer than --grace, the MLflow server down --mlflow-down seconds, the runs directory (a
   tmpfs) full for a while, and N processes claiming from a queue of dummy runs at once.
2. torchrun phase: workers with --nproc-per-node 2 train a few more runs while their torchrun agents are
   SIGKILLed (the trainers underneath live on).
3. the queue drains with no faults; `orch sync`; then the runs table, every run directory and the MLflow
   store are read back, and each run is compared bitwise with an uninterrupted reference run of its config.

Exit status 1 when a figure that must be zero is not (2 when the harness itself could not run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# bench/orchestrator.py would shadow the orchestrator package: drop the script's folder from the path. The
# packages are imported from a snapshot of the checkout (see snapshot()), so nothing of ours is imported here.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
PY = sys.executable

MAIN_KINDS = (
    "worker_kill",
    "worker_term",
    "trainer_kill",
    "sweep_kill",
    "pg_restart",
    "pg_stop",
    "mlflow_down",
    "disk_full",
    "claimers",
)
DDP_KINDS = ("agent_kill",)
KINDS = MAIN_KINDS + DDP_KINDS
PG_KINDS = ("pg_restart", "pg_stop")
LONG_KINDS = ("pg_stop", "mlflow_down", "disk_full")  # outages with a duration: one per kind in --short
# trainer_kill and agent_kill are crashes of the run itself, and a crash costs an attempt: at most this many
# per run, below max_attempts (3), so that the campaign alone never fails a run legitimately.
CRASHES_PER_RUN = 1

# Figures that must be zero (the exit status and tests/test_chaos.py check these).
ZERO_FIGURES = (
    "runs_lost",
    "healthy_runs_failed",
    "metrics_steps_duplicated",
    "metrics_steps_missing",
    "metrics_overlaps",
    "mlflow_steps_duplicated",
    "mlflow_steps_missing",
    "mlflow_runs_not_finished",
    "final_metrics_missing",
    "metric_points_lost",
    "metric_points_wrong",
    "resume_mismatches",
    "runs_without_reference",
    "double_claims",
    "claims_missing",
    "sweep_trials_not_complete",
)
# Keys whose values are a function of the run's config alone (tokens_per_s, mfu and time are not).
DETERMINISTIC_KEYS = ("loss", "lr", "grad_norm", "tokens", "clipped", "val_loss", "test_loss")
CHECKPOINT_MB = 80  # one tiny-preset checkpoint (weights + Adam moments: ~78 MB), for sizing the tmpfs


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# The code under test, the machine, the data.


def snapshot(dest: Path, rev: str | None = None) -> Path:
    """A private copy of the code the campaign runs: the checkout is shared and edited while a campaign
    takes minutes, and every process of one campaign (this one included) must run the same code. With
    `rev`, the packages as committed at that revision (`--rev HEAD`: the last commit, without local edits)."""
    if rev:
        dest.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", rev, "orchestrator", "trainer", "tests"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for pkg in ("orchestrator", "trainer", "tests"):
            shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    sys.path.insert(0, str(dest))
    return dest


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict:
    modified = git("status", "--porcelain", "orchestrator", "trainer", "tests", "bench")
    return {
        "nproc": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_modified": modified.splitlines(),
        "git_diff_sha256": hashlib.sha256(git("diff", "HEAD").encode()).hexdigest()[:16] if modified else None,
        "root": os.geteuid() == 0,
    }


def make_dataset(out: Path) -> Path:
    """The tests' synthetic corpus (tests/conftest.py), prepared into real shards."""
    from tests.conftest import TEST_FRACTION, VAL_FRACTION, synthetic_documents
    from trainer.prepare import prepare

    prepare(
        synthetic_documents(),
        out,
        source="synthetic",
        command="bench/chaos.py",
        val_fraction=VAL_FRACTION,
        test_fraction=TEST_FRACTION,
        shard_tokens=20_000,
        progress=False,
    )
    return out


def base_config(data: Path, steps: int) -> dict:
    """tests/conftest.py's FAST config at `steps` steps: a metric line every step, a checkpoint every 4."""
    from tests.conftest import FAST

    return {**FAST, "data.path": str(data), "run.steps": steps, "run.keep_checkpoints": 1}


def loads(text: str) -> dict | None:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def read_json(path: Path) -> dict | None:
    try:
        return loads(path.read_text())
    except OSError:
        return None


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------------
# Processes, found through /proc (psutil is not a dependency).


@dataclass
class Proc:
    pid: int
    ppid: int
    args: list[str]
    start: float = 0.0  # seconds since boot

    def age(self) -> float:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - self.start

    def has(self, a: str, b: str) -> bool:
        return any(x == a and y == b for x, y in zip(self.args, self.args[1:]))

    def opt(self, name: str) -> str | None:
        for x, y in zip(self.args, self.args[1:]):
            if x == name:
                return y
            if x.startswith(name + "="):
                return x.split("=", 1)[1]
        return None


CLK_TCK = os.sysconf("SC_CLK_TCK")


def processes() -> list[Proc]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                raw = f.read()
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if not raw or not fields or fields[0] == "Z":
            continue
        out.append(
            Proc(
                int(d),
                int(fields[1]),
                [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")],
                int(fields[19]) / CLK_TCK,
            )
        )
    return out


def trainer_procs(runs_dir: Path, procs: list[Proc] | None = None) -> tuple[list[Proc], list[Proc]]:
    """(trainers, torchrun agents) whose --run-dir lies in runs_dir. A trainer is `python [-u] -m trainer`,
    started by a worker directly or by a torchrun agent; an agent is `python -m torch.distributed.run`."""
    trainers, agents = [], []
    for p in procs if procs is not None else processes():
        if not p.has("-m", "trainer"):
            continue
        rd = p.opt("--run-dir")
        if rd is None or Path(rd).parent != runs_dir:
            continue
        (agents if p.has("-m", "torch.distributed.run") else trainers).append(p)
    return trainers, agents


def run_of(p: Proc) -> str:
    return Path(p.opt("--run-dir") or "").name


@contextlib.contextmanager
def boosted():
    """Servers (PostgreSQL, MLflow) started from here run at nice -10: in production they have machines of
    their own, and here a restart must not queue behind four trainers for the CPU (an MLflow server took
    68 s to answer again on a loaded 2-core VM). Linux nice values are per thread and inherited by fork."""
    if os.geteuid() != 0:
        yield
        return
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, -10)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, old)


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------------------------------------------------
# Reading a run back.


def analyse_metrics(path: Path) -> dict:
    """metrics.jsonl with a relaunch's supersession applied: after {"event": "resume", "step": N}, events of
    steps > N written before it belong to a lost attempt. An overlap is a training step that does not move
    forward without a resume between: two trainers appending to one file."""
    events: list[dict] = []
    damaged = overlaps = resumes = 0
    last = None
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        lines = []
    for raw in lines:
        if not raw.strip():
            continue
        e = loads(raw.decode(errors="replace"))
        if not isinstance(e, dict):
            damaged += 1
            continue
        if e.get("event") == "resume":
            resumes += 1
            n = e.get("step", 0)
            events = [x for x in events if x.get("event") or x.get("step", 0) <= n]
            last = n
        elif "event" not in e and "loss" in e:
            if last is not None and e["step"] <= last:
                overlaps += 1
            last = e["step"]
        events.append(e)
    train = [e for e in events if "event" not in e and "loss" in e]
    return {
        "events": events,
        "losses": [(e["step"], e["loss"]) for e in train],
        "damaged_lines": damaged,
        "overlaps": overlaps,
        "resumes": resumes,
        "lines": len(lines),
        "test_loss": next((e["test_loss"] for e in reversed(events) if "test_loss" in e), None),
    }


def step_errors(steps: list[int], total: int) -> tuple[int, int]:
    """(duplicated, missing) against exactly 1..total, once each."""
    c = collections.Counter(steps)
    return sum(n - 1 for n in c.values() if n > 1), len(set(range(1, total + 1)) - set(c))


def points_of(events: list[dict]) -> dict[tuple[str, int], float]:
    """The (key, step) → value points the worker forwards to MLflow (orchestrator/tracking.py)."""
    out = {}
    for e in events:
        if "event" in e:
            continue
        step = int(e.get("step", 0))
        for k, v in e.items():
            if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            out[(k, step)] = float(v)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reference runs: each config trained once, uninterrupted, by `python -m trainer` (torchrun for 2 processes).


def child_env(code: Path, commit: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "MLFLOW_"))}
    env.update(
        PYTHONPATH=str(code),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        ORCH_GIT_COMMIT=commit or "chaos",
    )
    return env


class References:
    """Reference runs. While a campaign goes on, one reference at a time trains at nice 19 on whatever CPU
    the campaign leaves idle (its configs are known as soon as they are queued); the rest train at the end,
    two at a time. CPU training is deterministic at one thread, so niceness changes no number."""

    def __init__(self, root: Path, env: dict, timeout: float = 900):
        self.root, self.env, self.timeout = root, env, timeout
        self.root.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        self.pending: dict[str, tuple[dict, int]] = {}
        self.lock = threading.Lock()
        self.current: tuple[str, subprocess.Popen] | None = None
        self.stopping = False
        self.background_done = 0
        self.thread = threading.Thread(target=self._background, name="references", daemon=True)
        self.thread.start()

    @staticmethod
    def key(config: dict, world: int) -> str:
        return hashlib.sha256((json.dumps(config, sort_keys=True) + f"|{world}").encode()).hexdigest()[:16]

    def want(self, config: dict, world: int) -> None:
        k = self.key(config, world)
        with self.lock:
            if k not in self.done and k not in self.pending and not (self.current and self.current[0] == k):
                self.pending[k] = (config, world)

    def _launch(self, k: str, config: dict, world: int, nice: bool) -> subprocess.Popen:
        d = self.root / k
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        head = (
            [PY, "-m", "trainer"]
            if world == 1
            else [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "trainer"]
        )
        cmd = [
            *(["nice", "-n", "19"] if nice and shutil.which("nice") else []),
            *head,
            "--config",
            str(d / "config.json"),
            "--run-dir",
            str(d / "run"),
        ]
        with open(d / "train.log", "wb") as logf:
            return subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, cwd=d, start_new_session=True
            )

    def _record(self, k: str, proc: subprocess.Popen) -> None:
        d = self.root / k
        result = read_json(d / "run" / "result.json")
        m = analyse_metrics(d / "run" / "metrics.jsonl")
        with self.lock:
            self.done[k] = {
                "exit": proc.returncode,
                "status": (result or {}).get("status"),
                "test_loss": (result or {}).get("test_loss"),
                "losses": m["losses"],
                "log_tail": None if proc.returncode == 0 else tail(d / "train.log"),
            }
        shutil.rmtree(d / "run" / "checkpoints", ignore_errors=True)  # 78 MB each; not needed again

    def _wait(self, proc: subprocess.Popen, started: float) -> None:
        while proc.poll() is None and time.time() - started < self.timeout:
            time.sleep(0.3)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def _background(self) -> None:
        while not self.stopping:
            with self.lock:
                item = next(iter(self.pending.items()), None)
                if item:
                    k, (config, world) = item
                    del self.pending[k]
            if item is None:
                time.sleep(0.5)
                continue
            proc = self._launch(k, config, world, nice=True)
            self.current = (k, proc)
            self._wait(proc, time.time())
            self._record(k, proc)
            self.current = None
            self.background_done += 1

    def finish(self, wanted: dict[str, tuple[dict, int]], parallel: int = 2) -> None:
        """Train every wanted reference not trained yet (the background one is let finish, at full priority)."""
        self.stopping = True
        cur = self.current
        if cur is not None and os.geteuid() == 0:  # renice it (and a torchrun's ranks) back to 0
            for p in processes():
                if (
                    p.pid == cur[1].pid
                    or p.ppid == cur[1].pid
                    or (p.opt("--run-dir") or "").startswith(str(self.root / cur[0]))
                ):
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, p.pid, 0)
        self.thread.join()
        todo = [(k, c, w) for k, (c, w) in sorted(wanted.items()) if k not in self.done]
        log(f"reference runs: {len(todo)} to train now ({self.background_done} trained in the background)")
        running: list[tuple[str, subprocess.Popen, float, int]] = []
        while todo or running:
            cpus = sum(w for *_, w in running)
            while todo and (not running or cpus + todo[0][2] <= parallel):
                k, config, world = todo.pop(0)
                running.append((k, self._launch(k, config, world, nice=False), time.time(), world))
                cpus += world
            time.sleep(0.2)
            for item in list(running):
                k, proc, started, world = item
                if proc.poll() is None and time.time() - started < self.timeout:
                    continue
                self._wait(proc, started)
                running.remove(item)
                self._record(k, proc)

    def stop(self) -> None:
        self.stopping = True
        if self.current is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.current[1].pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------
# One campaign: one database, its own folder, MLflow server, workers and faults.


@dataclass
class Child:
    role: str
    proc: subprocess.Popen
    log: Path
    started: float
    expected: str | None = None  # why we ended it (then its exit is no surprise)


@dataclass
class Slot:
    role: str  # "worker" or "sweep"
    child: Child | None = None
    restart_at: float | None = 0.0  # None: restart once the current child has exited (after a SIGTERM)
    restart_delay: float = 0.0
    done: bool = False  # the sweep driver finished its budget


@dataclass
class Event:
    kind: str
    at: float  # seconds after the phase began
    duration: float = 0.0
    record: dict = field(default_factory=dict)
    state: str = "pending"  # pending → running (a thread) → done | skipped


class Campaign:
    def __init__(self, kind: str, args, root: Path, code: Path, data: Path, env: dict, seed: int, refs: References):
        self.kind, self.args, self.root, self.code, self.data, self.env = kind, args, root, code, data, env
        self.refs = refs
        self.fed: set[str] = set()
        self.ddp_ids: set[str] = set()
        self.sched_rng = random.Random(f"{seed}:{kind}:schedule")
        self.rng = random.Random(f"{seed}:{kind}:targets")
        self.runs_dir = root / "runs"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.notes: list[str] = []
        self.unexpected: list[dict] = []
        self.events: list[Event] = []
        self.crashes: collections.Counter = collections.Counter()  # run id → crash faults inflicted on it
        self.touched: dict[str, list[str]] = collections.defaultdict(list)  # run id → faults that hit it
        self.submitted: set[str] = set()
        self.submits: list[dict] = []
        self.timeline: list[dict] = []
        self.concurrent_seen: dict[str, int] = {}  # run id → most trainer launches seen alive at once
        self.slots: list[Slot] = []
        self.pg = self.mlflow = None
        self.engine = None
        self.tmpfs = False
        self.worker_args: list[str] = []
        self.topups = 0
        self.sweep_name = "chaos-sweep"
        self.phase_t0 = time.monotonic()
        self.phase = "setup"
        self.next_sample = 0.0

    # -- set-up and tear-down -----------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        expected_runs = self.expected_runs()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and not a.no_tmpfs:
            size = a.tmpfs_mb or (expected_runs + 8) * CHECKPOINT_MB + 200
            out = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}m,mode=0755", "tmpfs", str(self.runs_dir)],
                capture_output=True,
                text=True,
            )
            self.tmpfs = out.returncode == 0
            if self.tmpfs:
                self.tmpfs_mb = size
            else:
                self.notes.append(f"disk_full skipped: mount -t tmpfs failed: {out.stderr.strip()}")
        else:
            self.notes.append(
                "disk_full skipped: mounting a tmpfs needs root" if os.geteuid() else "disk_full skipped: --no-tmpfs"
            )
        from tests.servers import MlflowServer, Postgres

        if self.kind == "postgres":
            with boosted():
                self.pg = Postgres().start()
            self.db = self.pg.create_db("chaos")
            self.claims_db = self.pg.create_db("claims")
        else:
            self.db = f"sqlite:///{self.root / 'results.db'}"
            self.claims_db = f"sqlite:///{self.root / 'claims.db'}"
        self.mlflow_store = f"sqlite:///{self.root / 'mlflow.db'}"
        self.mlflow = MlflowServer(self.mlflow_store, self.root / "mlartifacts")
        with boosted():
            self.mlflow.start(timeout=120)
        log(
            f"{self.kind}: database {self.db}, MLflow {self.mlflow.url}, runs in {self.runs_dir}"
            + (f" (tmpfs {self.tmpfs_mb} MB)" if self.tmpfs else "")
        )
        self.write_files(expected_runs)
        self.submit(self.root / "chaos.py")
        from orchestrator.db import connect

        self.engine = connect(self.db, create=False)

    def expected_runs(self) -> int:
        a = self.args
        # What 2 cores train in the window (a run ≈ steps × 0.3 s of CPU plus ~3 s start-up), plus the drain.
        per_run = a.steps * 0.3 + 3.0
        return max(6, int(a.window_s * (os.cpu_count() or 2) / per_run * 0.8))

    def write_files(self, expected_runs: int) -> None:
        a = self.args
        base = base_config(self.data, a.steps)
        self.initial_seeds = max(2, math.ceil(expected_runs / 2 / 2))
        self.exp_file(self.root / "chaos.py", "chaos", base, seeds=self.initial_seeds, first_seed=0)
        (self.root / "sweep.py").write_text(
            "from orchestrator.specs import LogUniform, Sweep\n"
            f"sweep = Sweep(name={self.sweep_name!r}, preset='tiny', base={base!r},\n"
            "    space={'optim.lr': LogUniform(low=5e-4, high=3e-3)}, sampler='random', pruner='none',\n"
            f"    trials={a.sweep_trials}, in_flight=2, seeds=1, sampler_seed={a.seed})\n"
        )

    def exp_file(self, path: Path, name: str, base: dict, seeds: int, first_seed: int) -> Path:
        base = {**base, "run.seed": 1000 + first_seed}
        path.write_text(
            "from orchestrator.specs import Experiment, Intervention\n"
            f"experiment = Experiment(name={name!r}, preset='tiny', base={base!r}, seeds={seeds},\n"
            "    interventions=[Intervention(name='no-dropout', set={'model.dropout': 0.0})])\n"
        )
        return path

    def orch(self, *args: str) -> list[str]:
        return [PY, "-m", "orchestrator.cli", *args]

    def submit(self, file: Path, world: int = 1) -> bool:
        out = subprocess.run(
            self.orch("submit", str(file), "--db", self.db, "--preset", "tiny"),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root,
            timeout=120,
        )
        ids = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("queued ")]
        self.submitted.update(ids)
        if world > 1:
            self.ddp_ids.update(ids)
        self.submits.append(
            {
                "file": file.name,
                "exit": out.returncode,
                "queued": len(ids),
                "phase": self.phase,
                "t": round(time.monotonic() - self.phase_t0, 1),
                **({"stderr": out.stderr[-2000:]} if out.returncode else {}),
            }
        )
        if out.returncode:
            log(f"{self.kind}: orch submit {file.name} exited {out.returncode}: {out.stderr.strip()[-300:]}")
        return out.returncode == 0

    def cleanup(self) -> None:
        for slot in self.slots:
            if slot.child and slot.child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(slot.child.proc.pid, signal.SIGKILL)
        self.kill_strays("cleanup")
        if self.mlflow:
            with contextlib.suppress(Exception):
                self.mlflow.stop()
        if self.engine is not None:
            self.engine.dispose()
        if self.pg:
            with contextlib.suppress(Exception):
                self.pg.stop()
        if self.tmpfs:
            for _ in range(3):
                if subprocess.run(["umount", str(self.runs_dir)], capture_output=True).returncode == 0:
                    break
                time.sleep(1)
            else:
                subprocess.run(["umount", "-l", str(self.runs_dir)], capture_output=True)

    def kill_strays(self, when: str) -> list[dict]:
        """Trainers and agents still alive in our runs directory (none should be, once workers are gone)."""
        found = []
        for p in sum(trainer_procs(self.runs_dir), []):
            found.append({"pid": p.pid, "run": run_of(p), "agent": p.has("-m", "torch.distributed.run")})
            kill(p.pid)
        if found and when != "cleanup":
            log(f"{self.kind}: {len(found)} trainer process(es) still alive {when}: killed")
        return found

    # -- children -----------------------------------------------------------------------------------------

    def start_child(self, slot: Slot) -> None:
        n = sum(1 for _ in self.logs.glob(f"{slot.role}-*.log"))
        path = self.logs / f"{slot.role}-{n}.log"
        if slot.role == "worker":
            cmd = self.orch(
                "worker",
                "--db",
                self.db,
                "--mlflow",
                self.mlflow.url,
                "--runs-dir",
                str(self.runs_dir),
                "--heartbeat",
                str(self.args.heartbeat),
                "--grace",
                str(self.args.grace),
                *self.worker_args,
            )
        else:
            cmd = self.orch(
                "sweep",
                str(self.root / "sweep.py"),
                "--db",
                self.db,
                "--mlflow",
                self.mlflow.url,
                "--grace",
                str(self.args.grace),
                "--poll",
                "1",
            )
        with open(path, "wb") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
            )
        slot.child, slot.restart_at = Child(slot.role, proc, path, time.monotonic()), None

    def supervise(self, now: float) -> None:
        for slot in self.slots:
            c = slot.child
            if c is not None and c.proc.poll() is not None:
                slot.child = None
                if c.expected:
                    slot.restart_at = now + slot.restart_delay if slot.restart_at is None else slot.restart_at
                elif slot.role == "sweep" and c.proc.returncode == 0:
                    slot.done = True
                else:
                    self.unexpected.append(
                        {
                            "role": c.role,
                            "pid": c.proc.pid,
                            "exit": c.proc.returncode,
                            "phase": self.phase,
                            "t": round(now - self.phase_t0, 1),
                            "log_tail": tail(c.log),
                        }
                    )
                    log(f"{self.kind}: {c.role} {c.proc.pid} exited by itself ({c.proc.returncode}); restarting it")
                    slot.restart_at = now + 1.0
            if slot.child is None and not slot.done and slot.restart_at is not None and now >= slot.restart_at:
                self.start_child(slot)
        if now >= self.next_sample:
            self.next_sample = now + 0.5
            self.sample(now)

    def sample(self, now: float) -> None:
        """Trainer launches alive per run: a launch is a set of trainer processes with one parent (a worker,
        an agent, or init once orphaned). Two at once on one run: two trainers sharing a run directory, or a
        new one waiting for the old one's trainer.lock."""
        trainers, _ = trainer_procs(self.runs_dir)
        by_run: dict[str, set[int]] = collections.defaultdict(set)
        for p in trainers:
            by_run[run_of(p)].add(p.ppid)
        for run, parents in by_run.items():
            self.concurrent_seen[run] = max(self.concurrent_seen.get(run, 0), len(parents))

    def room_for_runs(self, n: int) -> bool:
        """Whether the runs tmpfs can take n more runs' checkpoints (a top-up must not fill it by itself)."""
        if not self.tmpfs:
            return True
        st = os.statvfs(self.runs_dir)
        return st.f_bavail * st.f_frsize > n * CHECKPOINT_MB * 2**20

    def feed_refs(self) -> None:
        """Hand the configs of runs queued since the last look (sweep trials too) to the reference trainer."""
        import sqlalchemy as sa

        from orchestrator.db import Run

        try:
            with self.engine.connect() as conn:
                new = [i for i in conn.execute(sa.select(Run.id)).scalars() if i not in self.fed]
                rows = conn.execute(sa.select(Run.id, Run.config).where(Run.id.in_(new))).all() if new else []
        except Exception:  # noqa: BLE001 - the database is down: next time
            return
        for run_id, config in rows:
            self.fed.add(run_id)
            self.refs.want(config, 2 if run_id in self.ddp_ids else 1)

    def counts(self) -> dict | None:
        from orchestrator import queries

        try:
            return queries.counts(self.engine)
        except Exception:  # noqa: BLE001 - the database is down: that is one of the faults
            return None

    def stop_children(self, role: str = "worker", timeout: float = 150) -> None:
        """SIGTERM (trainers checkpoint and hand their runs back), SIGKILL after `timeout`."""
        slots = [s for s in self.slots if s.role == role]
        for s in slots:
            s.done = True
            if s.child and s.child.proc.poll() is None:
                s.child.expected = "end of phase"
                s.child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for s in slots:
            if s.child is None:
                continue
            try:
                s.child.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.notes.append(f"{role} {s.child.proc.pid} ignored SIGTERM for {timeout:.0f} s: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(s.child.proc.pid, signal.SIGKILL)
                s.child.proc.wait()
        self.slots = [s for s in self.slots if s.role != role]

    # -- the schedule -------------------------------------------------------------------------------------

    def plan(self, kinds: tuple[str, ...], window: float, start: float = 3.0) -> list[Event]:
        """Seeded times: instantaneous faults uniform in the window; outages of one resource (the database,
        MLflow, the disk) one after another, in random order with random gaps, never two at once."""
        a, rng = self.args, self.sched_rng
        chains: dict[str, list[Event]] = collections.defaultdict(list)
        events = []
        for kind in kinds:
            if kind not in a.kinds:
                continue
            if kind in PG_KINDS and self.kind != "postgres":
                continue
            n = min(a.faults, 1) if a.short and kind in LONG_KINDS else a.faults
            if kind == "claimers":
                n = 1
            for _ in range(n):
                ev = Event(
                    kind,
                    0.0,
                    duration={
                        "pg_stop": a.grace + 10 + 3,
                        "pg_restart": 3,
                        "mlflow_down": a.mlflow_down + 10,
                        "disk_full": a.disk_full,
                    }.get(kind, 0),
                )
                resource = {"pg_restart": "pg", "pg_stop": "pg", "mlflow_down": "mlflow", "disk_full": "disk"}.get(kind)
                if resource:
                    chains[resource].append(ev)
                else:
                    ev.at = rng.uniform(start, max(start + 1, window - 5))
                events.append(ev)
        for chain in chains.values():
            rng.shuffle(chain)
            gap = 2.0
            slack = max(0.0, window - start - sum(e.duration for e in chain) - gap * len(chain))
            offsets = sorted(rng.uniform(0, slack) for _ in chain)
            t = start
            for off, ev in zip(offsets, chain):
                ev.at = t + off
                t += ev.duration + gap
        return sorted(events, key=lambda e: e.at)

    def window_for(self, kinds: tuple[str, ...]) -> float:
        a = self.args
        if a.window:
            return a.window
        n_long = 1 if a.short else a.faults
        chains = {
            "mlflow": n_long * (a.mlflow_down + 12) if "mlflow_down" in a.kinds else 0,
            "disk": n_long * (a.disk_full + 2) if "disk_full" in a.kinds and self.tmpfs else 0,
            "pg": (n_long * (a.grace + 15) if "pg_stop" in a.kinds else 0)
            + (a.faults * 5 if "pg_restart" in a.kinds else 0)
            if self.kind == "postgres"
            else 0,
        }
        return max(a.min_window, max(chains.values()) + 10)

    # -- the phases ---------------------------------------------------------------------------------------

    def run_phase(
        self,
        name: str,
        kinds: tuple[str, ...],
        window: float,
        workers: int,
        worker_args: list[str],
        sweep: bool,
        topup: bool,
    ) -> dict:
        a = self.args
        self.phase_t0 = t0 = time.monotonic()
        self.phase = name
        self.worker_args = worker_args
        self.slots = [Slot("worker") for _ in range(workers)] + ([Slot("sweep")] if sweep else [])
        events = self.plan(kinds, window)
        self.events += events
        log(
            f"{self.kind}/{name}: {workers} workers {' '.join(worker_args)}, window {window:.0f} s, faults: "
            + ", ".join(f"{e.kind}@{e.at:.0f}s" for e in events)
        )
        threads: list[threading.Thread] = []
        next_count = 0.0
        while True:
            now = time.monotonic()
            t = now - t0
            self.supervise(now)
            for ev in events:
                if ev.state == "pending" and t >= ev.at:
                    self.fire(ev, t, threads)
            if now >= next_count:
                next_count = now + 2.0
                counts = self.counts()
                if counts is not None:
                    self.feed_refs()
                    self.timeline.append({"phase": name, "t": round(t, 1), **counts})
                    if (
                        topup
                        and t < window - 20
                        and not counts.get("queued")
                        and self.topups < a.max_topups
                        and self.room_for_runs(4)
                    ):
                        self.topups += 1
                        f = self.exp_file(
                            self.root / f"chaos-{self.topups}.py",
                            f"chaos-{self.topups}",
                            base_config(self.data, a.steps),
                            seeds=1,
                            first_seed=self.initial_seeds + self.topups - 1,
                        )
                        self.submit(f)
            if t >= window and all(e.state in ("done", "skipped") for e in events):
                break
            if t > window + a.drain_s:
                self.notes.append(f"{name}: faults still pending {a.drain_s:.0f} s after the window")
                break
            time.sleep(0.1)
        for th in threads:  # outages end by themselves; a stuck one is reported, not waited for forever
            th.join(max(1.0, t0 + window + a.drain_s + 60 - time.monotonic()))
            if th.is_alive():
                self.notes.append(f"{name}: a fault thread ({th.name}) was still running at the end of the phase")
        # Drain: no more faults; the queue empties (and the sweep finishes its budget).
        drain_start = time.monotonic()
        stable = 0
        while time.monotonic() - drain_start < a.drain_s:
            self.supervise(time.monotonic())
            counts = self.counts()
            sweep_done = all(s.done for s in self.slots if s.role == "sweep")
            if counts is not None and not counts.get("queued") and not counts.get("running") and sweep_done:
                stable += 1
                if stable >= 3:
                    break
            else:
                stable = 0
            if counts is not None:
                self.feed_refs()
                self.timeline.append({"phase": name + "-drain", "t": round(time.monotonic() - t0, 1), **counts})
            time.sleep(1.0)
        else:
            self.notes.append(f"{name}: the queue did not drain within {a.drain_s:.0f} s: {self.counts()}")
        drained = round(time.monotonic() - drain_start, 1)
        self.stop_children("sweep", timeout=30)
        self.stop_children("worker")
        strays = self.kill_strays(f"after the {name} phase")
        return {
            "window_s": round(window, 1),
            "drain_s": drained,
            "wall_s": round(time.monotonic() - t0, 1),
            "strays": strays,
        }

    # -- faults -------------------------------------------------------------------------------------------

    def fire(self, ev: Event, t: float, threads: list) -> None:
        rec = ev.record
        rec.setdefault("kind", ev.kind)
        rec.setdefault("scheduled_s", round(ev.at, 1))
        handler = getattr(self, "f_" + ev.kind)
        if ev.kind in ("pg_restart", "pg_stop", "mlflow_down", "disk_full", "claimers"):
            ev.state = "running"
            rec["start_s"] = round(t, 1)
            rec["active_runs"] = sorted({run_of(p) for p in trainer_procs(self.runs_dir)[0]})
            for r in rec["active_runs"]:
                self.touched[r].append(ev.kind)

            def body():
                try:
                    handler(rec)
                except Exception as exc:  # noqa: BLE001 - recorded, the campaign goes on
                    rec["harness_error"] = f"{type(exc).__name__}: {exc}"
                    rec["traceback"] = traceback.format_exc()[-2000:]
                    log(f"{self.kind}: {ev.kind} harness error: {exc}")
                rec["end_s"] = round(time.monotonic() - self.phase_t0, 1)
                ev.state = "done"

            th = threading.Thread(target=body, name=f"{ev.kind}@{ev.at:.0f}s", daemon=True)
            th.start()
            threads.append(th)
            return
        done = handler(rec)
        if done:
            rec["start_s"] = round(t, 1)
            ev.state = "done"
            log(f"{self.kind}: {ev.kind} at {t:.1f}s: {rec.get('target')}")
        elif t - ev.at > self.args.target_wait:
            ev.state = "skipped"
            rec["note"] = f"no target within {self.args.target_wait:.0f} s"
            log(f"{self.kind}: {ev.kind} skipped: no target")

    def live(self, role: str) -> list[Slot]:
        return [
            s for s in self.slots if s.role == role and s.child and s.child.proc.poll() is None and not s.child.expected
        ]

    def held_by(self, pid: int) -> list[str]:
        trainers, agents = trainer_procs(self.runs_dir)
        return sorted({run_of(p) for p in trainers + agents if p.ppid == pid})

    def _signal_worker(self, rec: dict, sig: int, why: str) -> bool:
        slots = self.live("worker")
        if not slots:
            return False
        slot = self.rng.choice(slots)
        pid = slot.child.proc.pid
        runs = self.held_by(pid)
        slot.child.expected = why
        slot.restart_delay = self.rng.uniform(0.5, 3.0)
        slot.restart_at = None  # after it has exited
        kill(pid, sig)
        rec.update(target=f"worker {pid}", runs=runs)
        for r in runs:
            self.touched[r].append(rec["kind"])
        return True

    def f_worker_kill(self, rec: dict) -> bool:
        return self._signal_worker(rec, signal.SIGKILL, "SIGKILL")

    def f_worker_term(self, rec: dict) -> bool:
        return self._signal_worker(rec, signal.SIGTERM, "SIGTERM")

    def _kill_trainer(self, rec: dict, agent: bool) -> bool:
        trainers, agents = trainer_procs(self.runs_dir)
        pool = [p for p in (agents if agent else trainers) if self.crashes[run_of(p)] < CRASHES_PER_RUN]
        if agent and time.monotonic() - self.phase_t0 - rec["scheduled_s"] < self.args.target_wait - 5:
            # Preferably an agent whose trainers are training (a step logged since it started): the case
            # where they outlive it and go on writing matters most.
            pool = [p for p in pool if self._training_since(run_of(p), time.time() - p.age())]
        if not pool:
            return False
        p = self.rng.choice(sorted(pool, key=lambda p: p.pid))
        if not kill(p.pid):
            return False
        run = run_of(p)
        self.crashes[run] += 1
        self.touched[run].append(rec["kind"])
        steps = analyse_metrics(self.runs_dir / run / "metrics.jsonl")["losses"]
        rec.update(
            target=f"{'agent' if agent else 'trainer'} {p.pid}", runs=[run], at_step=steps[-1][0] if steps else 0
        )
        return True

    def _training_since(self, run: str, since: float) -> bool:
        losses = [e for e in analyse_metrics(self.runs_dir / run / "metrics.jsonl")["events"] if "loss" in e]
        return bool(losses) and losses[-1].get("time", 0) > since

    def f_trainer_kill(self, rec: dict) -> bool:
        return self._kill_trainer(rec, agent=False)

    def f_agent_kill(self, rec: dict) -> bool:
        return self._kill_trainer(rec, agent=True)

    def f_sweep_kill(self, rec: dict) -> bool:
        slots = self.live("sweep")
        if not slots:
            if all(s.done for s in self.slots if s.role == "sweep"):
                rec["note"] = "the sweep had finished"
            return False
        slot = slots[0]
        slot.child.expected = "SIGKILL"
        slot.restart_delay = self.rng.uniform(0.5, 3.0)
        slot.restart_at = None
        kill(slot.child.proc.pid)
        rec["target"] = f"sweep driver {slot.child.proc.pid}"
        return True

    def _pg_ctl(self, *args: str, timeout: float = 120) -> None:
        """pg_ctl as the server's user. Its output goes to a file, never a pipe: a server that `restart`
        starts keeps pg_ctl's stdout open, and a pipe would never reach EOF."""
        cmd = [str(self.pg.bin / "pg_ctl"), "-D", str(self.pg.data), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        with open(self.logs / "pg_ctl.log", "ab") as f:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode} (see {self.logs / 'pg_ctl.log'})")

    def _pg_start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.pg.port} -c unix_socket_directories={self.pg.root} "
            "-c fsync=off"
        )
        self._pg_ctl("-o", opts, "-l", str(self.pg.root / "log"), "-w", "start")

    def f_pg_restart(self, rec: dict) -> None:
        log(f"{self.kind}: pg_restart")
        with boosted():
            self._pg_ctl("-m", "fast", "-w", "restart")
        rec["target"] = "pg_ctl restart -m fast"

    def f_pg_stop(self, rec: dict) -> None:
        down = self.args.grace + 10
        log(f"{self.kind}: pg_stop for {down:.0f} s")
        self._pg_ctl("-m", "immediate", "-w", "stop")
        time.sleep(down)
        with boosted():
            self._pg_start()
        rec["target"] = f"pg_ctl stop -m immediate, {down:.0f} s, start"

    def f_mlflow_down(self, rec: dict) -> None:
        log(f"{self.kind}: MLflow server down for {self.args.mlflow_down:.0f} s")
        self.mlflow.stop()
        time.sleep(self.args.mlflow_down)
        t = time.monotonic()
        with boosted():
            self.mlflow.start(timeout=120)
        rec.update(target=f"mlflow server {self.mlflow.url}", restart_s=round(time.monotonic() - t, 1))

    def f_disk_full(self, rec: dict) -> None:
        if not self.tmpfs:
            rec["note"] = "skipped: the runs directory is not a tmpfs of our own"
            return
        junk = self.runs_dir / ".chaos-junk"
        free = os.statvfs(self.runs_dir).f_bavail * os.statvfs(self.runs_dir).f_frsize
        try:
            fd = os.open(junk, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                with contextlib.suppress(OSError):
                    os.posix_fallocate(fd, 0, max(free, 1))
                os.lseek(fd, 0, os.SEEK_END)
                for size in (1 << 20, 4096, 1):  # whatever fallocate left, down to the last byte
                    with contextlib.suppress(OSError):
                        while os.write(fd, b"\0" * size):
                            pass
            finally:
                os.close(fd)
            st = os.statvfs(self.runs_dir)
            rec["free_bytes_while_full"] = st.f_bavail * st.f_frsize
            log(f"{self.kind}: runs directory full ({free >> 20} MB of junk) for {self.args.disk_full:.0f} s")
            time.sleep(self.args.disk_full)
        finally:
            junk.unlink(missing_ok=True)
        rec.update(target=f"tmpfs {self.runs_dir}", junk_mb=free >> 20)

    def f_claimers(self, rec: dict) -> None:
        """N processes claim from a queue of M dummy runs (their own database) at once; each run must be
        claimed exactly once. Runs while the other faults go on (a database restart may hit it)."""
        from orchestrator import runspec, specs, submission
        from orchestrator.db import Run, connect

        n, m = self.args.claimers, self.args.claim_runs
        eng = connect(self.claims_db, create=True)
        exp = specs.Experiment(name="claims", seeds=m)
        submission.submit(eng, exp, runspec.expand(exp))
        start_at = time.time() + 4.0
        script = (
            "import json, sys, time\n"
            "from orchestrator import queue\nfrom orchestrator.db import connect\n"
            "url, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])\n"
            "eng, got, errors = None, [], []\n"
            "time.sleep(max(0.0, start - time.time()))\n"
            "deadline = time.time() + 120\n"
            "while time.time() < deadline:\n"
            "    try:\n"
            "        eng = eng or connect(url, create=False)\n"
            "        batch = queue.claim(eng, name, 1 + len(got) % 2)\n"
            "    except Exception as exc:\n"
            "        errors.append(type(exc).__name__)\n"
            "        time.sleep(0.3)\n"
            "        continue\n"
            "    if not batch:\n"
            "        break\n"
            "    got += [r.id for r in batch]\n"
            "print(json.dumps({'name': name, 'claimed': got, 'errors': errors}))\n"
        )
        # cwd: `python -c` puts it first on sys.path, and the checkout there is not the snapshot under test.
        procs = [
            subprocess.Popen(
                [PY, "-c", script, self.claims_db, f"claimer-{i}", str(start_at)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.env,
                cwd=self.root,
            )
            for i in range(n)
        ]
        outs = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs.append(loads(out.strip().splitlines()[-1] if out.strip() else "") or {"error": err[-500:]})
        claimed = collections.Counter(i for o in outs for i in o.get("claimed", []))
        by: dict[str, list[str]] = collections.defaultdict(list)
        for o in outs:
            for i in o.get("claimed", []):
                by[i].append(o["name"])
        import sqlalchemy as sa

        with eng.connect() as conn:
            rows = conn.execute(sa.select(Run.id, Run.state, Run.worker)).all()
        eng.dispose()
        states = collections.Counter(r.state for r in rows)
        disagree = sum(1 for r in rows if r.id in by and r.worker not in by[r.id])
        unreported = sum(1 for r in rows if r.state == "running" and r.id not in by)
        rec.update(
            target=f"{n} claimers × {m} runs",
            claimers=n,
            runs=m,
            double_claims=sum(c - 1 for c in claimed.values() if c > 1),
            claimed=len(claimed),
            unclaimed=m - len(claimed),
            owner_disagrees=disagree,
            claimed_not_reported=unreported,
            states=dict(states),
            errors=collections.Counter(e for o in outs for e in o.get("errors", [])),
            failed_claimers=[o.get("error") for o in outs if "error" in o],
        )
        log(f"{self.kind}: claimers: {len(claimed)} runs claimed, {rec['double_claims']} double")

    # -- after the faults ---------------------------------------------------------------------------------

    def sync(self) -> dict:
        out = subprocess.run(
            self.orch("sync", "--db", self.db, "--mlflow", self.mlflow.url),
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.root,
            timeout=300,
        )
        rec = {"exit": out.returncode, "output": (out.stdout + out.stderr)[-1500:]}
        if out.returncode:
            missing = "No such command" in out.stderr
            self.notes.append(
                "orch sync is not available (no such command)"
                if missing
                else f"orch sync exited {out.returncode}: {out.stderr.strip()[-300:]}"
            )
        return rec

    def collect(self) -> dict:
        """Every run: the runs table, its directory, MLflow."""
        import sqlalchemy as sa
        from mlflow.tracking import MlflowClient

        from orchestrator.db import Membership, Run
        from trainer.config import TrainConfig

        with self.engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.select(Run)).all()}
            members = collections.defaultdict(list)
            for m in conn.execute(sa.select(Membership.experiment, Membership.arm, Membership.run_id)).all():
                members[m.run_id].append(f"{m.experiment}/{m.arm}")
        client = MlflowClient(self.mlflow_store)
        by_tag: dict[str, list] = collections.defaultdict(list)
        exps = [e.experiment_id for e in client.search_experiments()]
        token = None
        while exps:
            page = client.search_runs(exps, max_results=1000, page_token=token)
            for r in page:
                if r.data.tags.get("orch.run_id"):
                    by_tag[r.data.tags["orch.run_id"]].append(r)
            token = page.token
            if not token:
                break
        runs = {}
        for run_id in sorted(set(rows) | self.submitted):
            row = rows.get(run_id)
            rec: dict = {
                "id": run_id,
                "in_db": row is not None,
                "faults": self.touched.get(run_id, []),
                "crash_faults": self.crashes.get(run_id, 0),
                "max_trainer_launches_alive": self.concurrent_seen.get(run_id, 0),
            }
            runs[run_id] = rec
            if row is None:
                continue
            cfg = TrainConfig.model_validate(row.config)
            d = self.runs_dir / run_id
            result = read_json(d / "result.json")
            m = analyse_metrics(d / "metrics.jsonl")
            world = ((result or {}).get("environment") or {}).get("world_size") or 1
            rec.update(
                state=row.state,
                attempts=row.attempts,
                max_attempts=row.max_attempts,
                experiments=members.get(run_id, []),
                total_steps=cfg.total_steps(),
                world=world,
                config=row.config,
                db_test_loss=row.test_loss,
                error=(row.error or "")[-600:] or None,
                result={
                    k: (result or {}).get(k)
                    for k in ("status", "test_loss", "step", "launches", "launch_id", "exit_code")
                }
                if result
                else None,
                losses=m["losses"],
                metrics_test_loss=m["test_loss"],
                damaged_lines=m["damaged_lines"],
                overlaps=m["overlaps"],
                resumes=m["resumes"],
                launches_in_log=sum(
                    1 for line in (tail(d / "train.log", 100000) or "").splitlines() if line.startswith("=== attempt")
                ),
            )
            expected_total = (
                cfg.total_steps() if row.state == "succeeded" else max([s for s, _ in m["losses"]], default=0)
            )
            rec["metrics_dup"], rec["metrics_missing"] = step_errors([s for s, _ in m["losses"]], expected_total)
            # MLflow: the run the database names, else the one tagged with this run's id.
            tagged = by_tag.get(run_id, [])
            rec["mlflow_runs"] = len(tagged)
            expected = points_of(m["events"])
            rec["points_expected"] = len(expected)
            mid = row.mlflow_run_id or (tagged[0].info.run_id if tagged else None)
            rec["mlflow_run_id"] = mid
            if mid is None:
                rec["mlflow_status"] = None
                continue
            try:
                info = client.get_run(mid)
            except Exception as exc:  # noqa: BLE001
                rec["mlflow_status"] = f"unreadable: {exc}"
                continue
            rec["mlflow_status"] = info.info.status
            rec["mlflow_final_metrics"] = sorted(k for k in info.data.metrics if k == "test_loss")
            history = {}
            for key in sorted({k for k, _ in expected} | set(info.data.metrics)):
                history[key] = [(p.step, p.value) for p in client.get_metric_history(mid, key)]
            loss_steps = [s for s, _ in history.get("loss", [])]
            rec["mlflow_dup"], rec["mlflow_missing"] = step_errors(loss_steps, expected_total)
            have = {(k, s): v for k, pts in history.items() for s, v in pts}
            rec["points_lost"] = sum(1 for p in expected if p not in have)
            wrong = [
                (k, s)
                for (k, s), v in expected.items()
                if k in DETERMINISTIC_KEYS and any(hs == s and hv != v for hs, hv in history.get(k, []))
            ]
            rec["points_wrong"] = len(wrong)
            if wrong:
                rec["points_wrong_examples"] = wrong[:5]
        sweep = None
        if "sweep_kill" in self.args.kinds or self.args.sweep_trials:
            try:
                from orchestrator import sweep_views

                sweep = sweep_views.status(self.engine, self.sweep_name)
                sweep = {
                    "counts": sweep.counts,
                    "trials": [{"number": t.number, "state": t.state, "runs": t.runs} for t in sweep.trials],
                }
            except Exception as exc:  # noqa: BLE001
                sweep = {"error": f"{type(exc).__name__}: {exc}"}
        return {"runs": runs, "sweep": sweep}


# ---------------------------------------------------------------------------------------------------------
# Figures.


def figures(c: Campaign, data: dict, refs: References, wall_s: float) -> dict:
    runs = data["runs"]
    db_runs = [r for r in runs.values() if r.get("in_db")]
    f: dict = {"runs_submitted": len(runs), "runs_succeeded": sum(r.get("state") == "succeeded" for r in db_runs)}
    failed = [r for r in db_runs if r.get("state") in ("failed", "diverged")]
    legit = [r for r in failed if r["crash_faults"] >= r["max_attempts"]]
    f["runs_lost"] = sum(
        1
        for r in runs.values()
        if not r.get("in_db") or r.get("state") not in ("succeeded", "pruned", "failed", "diverged")
    )
    f["healthy_runs_failed"] = len(failed) - len(legit)
    f["legitimately_failed"] = len(legit)
    ok = [r for r in db_runs if r.get("state") in ("succeeded", "pruned")]
    f["metrics_steps_duplicated"] = sum(r["metrics_dup"] for r in db_runs)
    f["metrics_steps_missing"] = sum(r["metrics_missing"] for r in db_runs)
    f["metrics_overlaps"] = sum(r["overlaps"] for r in db_runs)
    f["metrics_damaged_lines"] = sum(r["damaged_lines"] for r in db_runs)
    f["mlflow_steps_duplicated"] = sum(r.get("mlflow_dup", 0) for r in ok)
    f["mlflow_steps_missing"] = sum(r.get("mlflow_missing", r.get("total_steps", 0)) for r in ok)
    f["mlflow_runs_not_finished"] = sum(
        1 for r in ok if r.get("state") == "succeeded" and r.get("mlflow_status") != "FINISHED"
    )
    f["mlflow_runs_duplicated"] = sum(max(0, r.get("mlflow_runs", 0) - 1) for r in db_runs)
    f["final_metrics_missing"] = sum(
        1 for r in ok if r.get("state") == "succeeded" and "test_loss" not in r.get("mlflow_final_metrics", [])
    )
    f["metric_points_lost"] = sum(r.get("points_lost", r.get("points_expected", 0)) for r in ok)
    f["metric_points_wrong"] = sum(r.get("points_wrong", 0) for r in ok)
    mismatches, compared, missing_ref = 0, 0, 0
    for r in ok:
        ref = refs.done.get(References.key(r["config"], r["world"]))
        if not ref or ref["status"] != "succeeded":
            missing_ref += 1
            r["reference"] = "missing" if not ref else f"reference failed: exit {ref['exit']}"
            continue
        compared += 1
        # Step by step: every loss logged (after supersession) equals the reference's at that step, and so
        # does the test loss; steps missing or twice are the step figures' business, not this one's.
        ref_at = dict(ref["losses"])
        diff = next(((st, v) for st, v in r["losses"] if ref_at.get(st) != v), None)
        test = (r.get("result") or {}).get("test_loss")
        same_test = r["state"] == "pruned" or test == ref["test_loss"] == r.get("db_test_loss")
        r["reference"] = "equal" if diff is None and same_test else "different"
        if r["reference"] == "different":
            mismatches += 1
            r["reference_diff"] = {
                "first_step": diff[0] if diff else None,
                "loss": diff[1] if diff else None,
                "reference_loss": ref_at.get(diff[0]) if diff else None,
                "test_loss": test,
                "db_test_loss": r.get("db_test_loss"),
                "reference_test_loss": ref["test_loss"],
            }
    f["resume_compared"] = compared
    f["resume_mismatches"] = mismatches
    f["runs_without_reference"] = missing_ref
    claims = [e.record for e in c.events if e.kind == "claimers" and e.state == "done"]
    f["double_claims"] = sum(r.get("double_claims", 0) + r.get("owner_disagrees", 0) for r in claims)
    f["claims_missing"] = sum(r.get("unclaimed", r.get("runs", 0)) for r in claims)
    sweep = data.get("sweep") or {}
    if "counts" in sweep:
        complete = sweep["counts"].get("complete", 0) + sweep["counts"].get("pruned", 0)
        f["sweep_trials_not_complete"] = max(0, c.args.sweep_trials - complete)
    else:
        f["sweep_trials_not_complete"] = c.args.sweep_trials if c.args.sweep_trials else 0
    f["unexpected_exits"] = len(c.unexpected)
    f["runs_with_two_launches_alive"] = sum(1 for r in db_runs if r["max_trainer_launches_alive"] > 1)
    f["wall_s"] = round(wall_s, 1)
    return f


def fault_counts(c: Campaign) -> dict:
    out = {}
    for kind in KINDS:
        evs = [e for e in c.events if e.kind == kind]
        if not evs:
            continue
        out[kind] = {
            "scheduled": len(evs),
            "done": sum(
                e.state == "done" and "harness_error" not in e.record and "skipped" not in e.record.get("note", "")
                for e in evs
            ),
            "skipped": sum(e.state == "skipped" or "skipped" in e.record.get("note", "") for e in evs),
            "harness_errors": sum("harness_error" in e.record for e in evs),
        }
    return out


def render(results: dict) -> str:
    dbs = list(results["databases"])
    names = []
    for r in results["databases"].values():
        for k in r.get("figures", {}):
            if k not in names:
                names.append(k)
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"chaos campaign, seed {results['seed']}")
        t.add_column("figure")
        for db in dbs:
            t.add_column(db, justify="right")
        for k in names:
            cells = []
            for db in dbs:
                v = results["databases"][db].get("figures", {}).get(k, "—")
                bad = k in ZERO_FIGURES and v not in (0, "—")
                cells.append(f"[bold red]{v}[/]" if bad else str(v))
            t.add_row(k + (" (must be 0)" if k in ZERO_FIGURES else ""), *cells)
        u = Table(title="faults: done / scheduled (skipped)")
        u.add_column("kind")
        for db in dbs:
            u.add_column(db, justify="right")
        for kind in KINDS:
            cells = []
            for db in dbs:
                fc = results["databases"][db].get("faults", {}).get(kind)
                cells.append(
                    "n/a"
                    if fc is None
                    else f"{fc['done']} / {fc['scheduled']}"
                    + (f" ({fc['skipped']})" if fc["skipped"] else "")
                    + (f" [{fc['harness_errors']} harness err]" if fc["harness_errors"] else "")
                )
            u.add_row(kind, *cells)
        console = Console(width=110, record=True)
        console.print(t)
        console.print(u)
        return console.export_text()
    except ImportError:  # pragma: no cover - rich is a dependency
        lines = ["figure".ljust(40) + "".join(db.rjust(12) for db in dbs)]
        for k in names:
            lines.append(
                k.ljust(40)
                + "".join(str(results["databases"][db].get("figures", {}).get(k, "—")).rjust(12) for db in dbs)
            )
        text = "\n".join(lines)
        print(text)
        return text


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faults",
        type=int,
        default=None,
        help="faults per kind (default 3; --short: 2, and one of each outage: PostgreSQL stop, MLflow down, disk full)",
    )
    p.add_argument("--short", action="store_true", help="a CI-size campaign (< 8 minutes for --db both on 2 cores)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds (default: all)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "chaos.json"))
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 40; --short 30)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--parallel", type=int, default=2, help="runs per worker in the main phase")
    p.add_argument("--heartbeat", type=float, default=1.0)
    p.add_argument("--grace", type=float, default=6.0)
    p.add_argument("--mlflow-down", type=float, default=60.0, help="seconds the MLflow server stays down")
    p.add_argument(
        "--disk-full", type=float, default=None, help="seconds the runs directory stays full (10; --short 8)"
    )
    p.add_argument("--claimers", type=int, default=None, help="concurrent claimers (8; --short 4)")
    p.add_argument("--claim-runs", type=int, default=None, help="dummy runs they claim (200; --short 100)")
    p.add_argument("--sweep-trials", type=int, default=None, help="trials of the sweep (5; --short 3)")
    p.add_argument(
        "--ddp-runs",
        type=int,
        default=None,
        help="runs of the torchrun phase, rounded up to even (default: one per agent kill, at least 2)",
    )
    p.add_argument(
        "--window", type=float, default=None, help="main-phase fault window in s (default: what the outages need)"
    )
    p.add_argument("--min-window", type=float, default=None)
    p.add_argument("--drain-s", type=float, default=240.0, help="how long the queue may take to drain")
    p.add_argument("--target-wait", type=float, default=25.0, help="how long a kill waits for something to kill")
    p.add_argument("--max-topups", type=int, default=12)
    p.add_argument("--tmpfs-mb", type=int, default=None)
    p.add_argument("--no-tmpfs", action="store_true", help="runs directory on disk (no disk-full faults)")
    p.add_argument(
        "--rev",
        default=None,
        help="test the packages as committed at this git revision (default: the working tree as it is at the start)",
    )
    p.add_argument("--keep", action="store_true", help="keep the campaign folders (printed) for inspection")
    a = p.parse_args(argv)
    a.kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    unknown = set(a.kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    short = a.short
    a.faults = a.faults if a.faults is not None else (2 if short else 3)
    a.steps = a.steps or (30 if short else 40)
    a.disk_full = a.disk_full if a.disk_full is not None else (8.0 if short else 10.0)
    a.claimers = a.claimers or (4 if short else 8)
    a.claim_runs = a.claim_runs or (100 if short else 200)
    a.sweep_trials = a.sweep_trials if a.sweep_trials is not None else (3 if short else 5)
    a.ddp_runs = a.ddp_runs or (max(2, a.faults) if "agent_kill" in a.kinds else 0)
    a.min_window = a.min_window if a.min_window is not None else (30.0 if short else 60.0)
    a.window_s = a.window or max(a.min_window, a.mlflow_down + 20)  # for sizing the queue
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.time()
    info_start = machine_info()
    results: dict = {
        "command": [sys.executable, *sys.argv] if argv is None else ["bench/chaos.py", *argv],
        "seed": a.seed,
        "args": {k: v for k, v in vars(a).items()},
        "machine": info_start,
        "zero_figures": list(ZERO_FIGURES),
        "databases": {},
    }
    root = Path(tempfile.mkdtemp(prefix="orch-chaos-"))
    os.chmod(root, 0o755)
    log(f"campaign folder {root}; seed {a.seed}; faults per kind {a.faults}; kinds {','.join(a.kinds)}")
    status = 0
    refs_root, refs_tmpfs, refs = root / "refs", False, None
    try:
        code = snapshot(root / "code", a.rev)
        if a.rev:
            results["code"] = {"rev": a.rev, "commit": git("rev-parse", a.rev)}
            commit = results["code"]["commit"][:12]
        else:
            results["code"] = {"rev": None, "commit": info_start["git_commit"], "working_tree": True}
            commit = info_start["git_commit"][:12] + ("+modified" if info_start["git_modified"] else "")
        env = child_env(code, commit)
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        data = make_dataset(root / "data")
        refs_root.mkdir()
        if os.geteuid() == 0 and not a.no_tmpfs:
            refs_tmpfs = (
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={6 * CHECKPOINT_MB}m", "tmpfs", str(refs_root)],
                    capture_output=True,
                ).returncode
                == 0
            )
        refs = References(refs_root, env)
        dbs = ["sqlite", "postgres"] if a.db == "both" else [a.db]
        campaigns: list[tuple[Campaign, dict, float]] = []
        for kind in dbs:
            c = Campaign(kind, a, root / kind, code, data, env, a.seed, refs)
            t = time.monotonic()
            entry: dict = {"notes": c.notes}
            results["databases"][kind] = entry
            try:
                if kind == "postgres":
                    from tests.servers import pg_bin

                    if pg_bin() is None:
                        raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
                c.setup()
                entry["phases"] = {}
                main_kinds = tuple(k for k in MAIN_KINDS if k in a.kinds)
                entry["phases"]["main"] = c.run_phase(
                    "main",
                    main_kinds,
                    c.window_for(main_kinds),
                    a.workers,
                    ["--parallel", str(a.parallel)],
                    sweep=a.sweep_trials > 0,
                    topup=True,
                )
                if a.ddp_runs:
                    c.submit(
                        c.exp_file(
                            c.root / "chaos-ddp.py",
                            "chaos-ddp",
                            base_config(data, a.steps),
                            seeds=math.ceil(a.ddp_runs / 2),
                            first_seed=500,
                        ),
                        world=2,
                    )
                    window = a.window or max(20.0, 8.0 * a.faults)
                    entry["phases"]["torchrun"] = c.run_phase(
                        "torchrun",
                        DDP_KINDS,
                        window,
                        a.workers,
                        ["--parallel", "1", "--nproc-per-node", "2"],
                        sweep=False,
                        topup=False,
                    )
                entry["sync"] = c.sync()
                c.mlflow.stop()
                entry["collected"] = c.collect()
            except Exception as exc:  # noqa: BLE001 - report what broke; the other database still runs
                entry["harness_error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc()[-4000:]
                log(f"{kind}: harness error: {exc}")
                status = 2
            finally:
                c.cleanup()
            campaigns.append((c, entry, time.monotonic() - t))
        # References for every config any campaign trained (shared across databases: the same config is the
        # same run), then the figures.
        wanted = {}
        for _campaign, entry, _ in campaigns:
            for r in (entry.get("collected") or {}).get("runs", {}).values():
                if r.get("state") in ("succeeded", "pruned"):
                    wanted[References.key(r["config"], r["world"])] = (r["config"], r["world"])
        t = time.monotonic()
        refs.finish(wanted)
        results["reference_s"] = round(time.monotonic() - t, 1)
        failed_refs = {k: v for k, v in refs.done.items() if v["status"] != "succeeded"}
        if failed_refs:
            results["reference_failures"] = failed_refs
        for c, entry, wall in campaigns:
            collected = entry.pop("collected", None)
            if collected is None:
                continue
            entry["figures"] = figures(c, collected, refs, wall)
            entry["faults"] = fault_counts(c)
            entry["events"] = [e.record | {"state": e.state} for e in c.events]
            entry["unexpected_exits"] = c.unexpected
            entry["submits"] = c.submits
            entry["timeline"] = c.timeline
            entry["sweep"] = collected.get("sweep")
            for r in collected["runs"].values():
                r.pop("config", None)
                r["losses"] = len(r.get("losses", []))
            entry["runs"] = collected["runs"]
            if any(entry["figures"].get(k) for k in ZERO_FIGURES):
                status = max(status, 1)
    except Exception as exc:  # noqa: BLE001
        results["harness_error"] = f"{type(exc).__name__}: {exc}"
        results["traceback"] = traceback.format_exc()[-4000:]
        log(f"harness error: {exc}")
        status = 2
    finally:
        if refs is not None:
            refs.stop()
        if refs_tmpfs:
            subprocess.run(["umount", str(refs_root)], capture_output=True)
        results["wall_s"] = round(time.time() - started, 1)
        results["machine"]["load_avg_end"] = list(os.getloadavg())
        results["exit_status"] = status
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        results["table"] = render(results) if results["databases"] else ""
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        log(f"wrote {out} ({results['wall_s']:.0f} s, exit status {status})")
        if a.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

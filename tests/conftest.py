"""Shared fixtures: a small real dataset on disk, tiny configs, and helpers that run the real trainer.

Everything here uses the real code paths: `trainer.prepare.prepare()` writes real shards, training runs in
real `python -m trainer` / `torchrun` subprocesses, and results are read back from the run directory.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Two cores: one intra-op thread per process keeps runs deterministic (the same reduction order in every
# process, so bitwise comparisons between runs hold) and leaves a core for the other DDP rank.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from tests.servers import Postgres, pg_bin  # noqa: E402
from trainer import config, identity, presets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# Held-out shares big enough that the tiny preset's evaluation slices (32 val and 128 test windows of up to
# 64 tokens) fit: ~60K tokens × 0.2 ≈ 12K test tokens ≥ 128·64+1.
VAL_FRACTION = 0.12
TEST_FRACTION = 0.22

_SUBJECTS = [
    "the farmer",
    "a small dog",
    "the old sailor",
    "my sister",
    "the teacher",
    "a young bird",
    "the baker",
    "our neighbour",
    "the king",
    "a tired horse",
    "the children",
    "the doctor",
]
_VERBS = [
    "sees",
    "finds",
    "carries",
    "paints",
    "follows",
    "builds",
    "remembers",
    "loves",
    "visits",
    "watches",
    "cleans",
    "opens",
]
_OBJECTS = [
    "a red apple",
    "the long river",
    "a wooden boat",
    "the quiet town",
    "an old letter",
    "the green field",
    "a heavy stone",
    "the bright lamp",
    "a silver coin",
    "the narrow bridge",
    "a warm loaf of bread",
    "the tall tower",
]
_TAILS = [
    "in the morning",
    "after the rain",
    "near the market",
    "before dinner",
    "every summer",
    "with great care",
    "on a cold day",
    "without a word",
    "at the edge of the forest",
    "again and again",
]


def synthetic_documents(n_docs: int = 420, seed: int = 1234) -> list[str]:
    """Deterministic English-ish documents (~150 GPT-2 tokens each) from a seeded random generator."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        sentences = []
        for _ in range(rng.randint(8, 16)):
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            sentences.append(s[0].upper() + s[1:])
        docs.append(f"Story {d}. " + " ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset directory (train/val/test shards + meta.json), built once per session."""
    from trainer.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "synthetic"
    meta = prepare(
        synthetic_documents(),
        out,
        source="synthetic",
        command=f"make-synthetic --out {out}",
        val_fraction=VAL_FRACTION,
        test_fraction=TEST_FRACTION,
        shard_tokens=20_000,
        progress=False,
    )
    assert meta["tokens"]["test"] >= 128 * 64 + 1 and meta["tokens"]["val"] >= 32 * 64 + 1, meta
    return out


def tiny_config(data_dir, **overrides) -> config.TrainConfig:
    """The `tiny` preset reading `data_dir`; keyword overrides use '__' for '.' (optim__lr=1e-2)."""
    sets = {"data.path": str(data_dir)}
    sets.update({k.replace("__", "."): v for k, v in overrides.items()})
    return presets.load(preset_name="tiny", overrides=sets)


# A fast training config for end-to-end runs: 8 sequences × 16 tokens per step (the 50257-wide output layer
# dominates: ~1,500 tokens/s on one CPU thread), 12 steps, a metric line every step, a checkpoint every 4.
FAST = {
    "model.context_length": 16,
    "run.batch_size": 8,
    "run.steps": 12,
    "run.log_interval": 1,
    "run.checkpoint_interval": 4,
    "eval.val_sequences": 8,
    "eval.test_sequences": 32,
}


def before_later_keys(cfg: config.TrainConfig) -> dict:
    """`cfg` as a config.json or checkpoint written before any of trainer.identity.LATER_KEYS existed: each such
    key removed, and a section left empty by that (a section that came later) removed too."""
    old = cfg.model_dump(mode="json")
    for dotted in identity.LATER_KEYS:
        section, *rest = dotted.split(".")
        node = old[section]
        for part in rest[:-1]:
            node = node[part]
        del node[rest[-1]]
        if not old[section]:
            del old[section]
    return old


def set_args(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("ORCH_GIT_COMMIT", "test")  # skip the git subprocess per run
    env.pop("ORCH_WORKER_PID", None)  # a trainer started by a test answers to no orch worker
    return env


def trainer_cmd(run_dir, data_dir, overrides: dict | None = None, preset: str = "tiny") -> list[str]:
    sets = {"data.path": str(data_dir), **FAST, **(overrides or {})}
    return [PYTHON, "-m", "trainer", "--preset", preset, "--run-dir", str(run_dir), *set_args(sets)]


def run_trainer(run_dir, data_dir, overrides: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        trainer_cmd(run_dir, data_dir, overrides),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_trainer(run_dir, data_dir, overrides: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        trainer_cmd(run_dir, data_dir, overrides),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> int:
    """Block until metrics.jsonl has a training line at >= `step`; return the newest logged step."""
    from trainer.rundir import read_metrics

    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [e["step"] for e in read_metrics(run_dir) if "loss" in e]
        if steps and steps[-1] >= step:
            return steps[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"trainer exited ({proc.returncode}) before step {step}:\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"trainer did not reach step {step} within {timeout}s")


def killed_and_resumed(run_dir, data_dir, overrides: dict, step: int = 5) -> None:
    """A run SIGKILLed once it has logged `step` (no handler, no last checkpoint: back to its newest), then
    relaunched to the end; it must have resumed, not started over."""
    import signal

    from trainer.rundir import read_metrics

    proc = start_trainer(run_dir, data_dir, overrides)
    try:
        wait_for_step(run_dir, proc, step)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    assert not (run_dir / "result.json").exists()
    ok(run_trainer(run_dir, data_dir, overrides))
    assert any(e.get("event") == "resume" for e in read_metrics(run_dir))


def train_losses(run_dir) -> list[tuple[int, float]]:
    from trainer.rundir import read_metrics

    return [(e["step"], e["loss"]) for e in read_metrics(run_dir) if "loss" in e]


def read_result(run_dir) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == code, (
        f"exit {proc.returncode} (wanted {code})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


# The database every queue-level test runs against twice: SQLite, and a real PostgreSQL server (one cluster per
# session, a fresh database per test).
@pytest.fixture(scope="session")
def postgres():
    if pg_bin() is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pg = Postgres().start()
    yield pg
    pg.stop()


_dbs = iter(range(10_000))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("postgres").create_db(f"t{next(_dbs)}")


# End-to-end suites (the CLI, workers, faults, sweeps) run on SQLite by default; with ORCH_TEST_DB=postgresql
# (`.ci/run` does both) each test gets a fresh database on one PostgreSQL server per test session instead.
_e2e_pg: Postgres | None = None


def results_db(tmp_path: Path) -> str:
    global _e2e_pg
    if os.environ.get("ORCH_TEST_DB", "sqlite") != "postgresql":
        return f"sqlite:///{tmp_path / 'results.db'}"
    if pg_bin() is None:
        pytest.skip("ORCH_TEST_DB=postgresql, but the PostgreSQL server binaries are not installed")
    if _e2e_pg is None:
        import atexit

        _e2e_pg = Postgres().start()
        atexit.register(_e2e_pg.stop)
    return _e2e_pg.create_db(f"e2e{next(_dbs)}")

"""Every bad input to `orch` (issue 8): one line on stderr, `error: …` with the fix, exit code 2, no traceback,
and the database exactly as it was — no row written, no table created, a damaged file not touched.

Each case runs the real CLI in-process (typer's CliRunner) against a real SQLite database in its own folder,
a copy of one seeded with a real experiment (experiments/quickstart.py at --preset tiny, reading the conftest
dataset; nothing is trained) and three imported results. The folder's files are compared before and after
too, so a command that wrote an MLflow store, a plot folder or a new database on its way to an error fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)  # a validation that lets `orch worker --parallel 0` through would hang

QUICKSTART = str(REPO / "experiments" / "quickstart.py")
PASSWORD = "s3cret-pw"  # must never appear in any output
IMPORTED = "name,test_loss,seed\nbaseline,3.50,0\nbaseline,3.60,1\nclip,3.40,0\n"


def invoke(args: list[str], env: dict | None = None):
    return CliRunner().invoke(app, args, env=env)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, data_dir) -> dict:
    """results.db with the quickstart experiment queued (15 runs) and experiment `pub` imported (3 runs)."""
    root = tmp_path_factory.mktemp("seeded")
    url = f"sqlite:///{root / 'results.db'}"
    out = invoke(["submit", QUICKSTART, "--preset", "tiny", "--set", f"data.path={data_dir}", "--db", url])
    assert out.exit_code == 0, out.output
    (root / "pub.csv").write_text(IMPORTED)
    out = invoke(["import", str(root / "pub.csv"), "--db", url])
    assert out.exit_code == 0, out.output
    con = sqlite3.connect(root / "results.db")
    ids = dict(con.execute("SELECT id, state FROM runs").fetchall())
    con.close()
    assert len(ids) == 18 and sum(i.startswith("imp") for i in ids) == 3
    return {"db": root / "results.db", "ids": ids}


@dataclass
class Ctx:
    """One case's folder (the working directory), its database and helpers that write input files there."""

    tmp: Path
    db: Path
    data_dir: Path
    ids: dict

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def file(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return str(path)

    def exp(self, body: str, name: str = "exp.py") -> str:
        """An experiment file: the given body after the imports; `BASE` reads the test dataset."""
        return self.file(
            name,
            "from orchestrator.specs import Experiment, Intervention\n"
            f"BASE = {{'data.path': {str(self.data_dir)!r}}}\n" + body + "\n",
        )

    def sweep(self, body: str) -> str:
        return self.file(
            "sweep.py",
            "from orchestrator.specs import Choice, LogUniform, Sweep, Uniform\n"
            f"BASE = {{'data.path': {str(self.data_dir)!r}}}\n" + body + "\n",
        )

    def data_copy(self) -> Path:
        out = self.tmp / "data-copy"
        shutil.copytree(self.data_dir, out)
        return out

    def queued(self) -> str:
        return next(i for i, s in sorted(self.ids.items()) if s == "queued")

    def succeeded(self) -> str:
        return next(i for i, s in sorted(self.ids.items()) if s == "succeeded")

    def unknown_prefix(self) -> str:
        return next(p for p in (f"{n:04x}" for n in range(1 << 16)) if not any(i.startswith(p) for i in self.ids))

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def pg(self, password: str | None = None) -> str:
        auth = f"orch:{password}" if password else "orch"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.free_port()}/orch"


@dataclass
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    db: str = "seeded"  # seeded | corrupt | truncated | damaged-runs | empty | none: results.db before the command
    add_db: bool = True  # append --db URL (False: the case gives its own, or the command takes none)
    env: Callable[[Ctx], dict] | None = None
    expect: str = ""  # a fragment the error line must contain
    xfail: str | None = None


def exp_case(id: str, body: str, expect: str = "", extra: tuple = ()) -> Case:
    return Case(id, lambda c: ["submit", c.exp(body), *extra], expect=expect)


def csv_case(id: str, text: str | bytes, expect: str = "", name: str = "res.csv", extra: tuple = ()) -> Case:
    return Case(id, lambda c: ["import", c.file(name, text), *extra], expect=expect)


def sweep_case(id: str, body: str, expect: str = "", extra: tuple = ()) -> Case:
    return Case(id, lambda c: ["sweep", c.sweep(body), "--no-mlflow", *extra], expect=expect)


def _corrupt_shard(c: Ctx) -> str:
    data = c.data_copy()
    with open(data / "test_000000.bin", "r+b") as f:
        f.write(b"\x00" * 8)  # magic and version gone
    return str(data)


def _truncated_shard(c: Ctx) -> str:
    data = c.data_copy()
    path = data / "val_000000.bin"
    path.write_bytes(path.read_bytes()[:-100])
    return str(data)


def _no_val_split(c: Ctx) -> str:
    data = c.data_copy()
    for p in data.glob("val_*.bin"):
        p.unlink()
    return str(data)


def _empty_dir(c: Ctx) -> str:
    (c.tmp / "empty-data").mkdir()
    return str(c.tmp / "empty-data")


GOOD_SUBMIT = lambda c: ["submit", QUICKSTART, "--set", f"data.path={c.data_dir}"]  # noqa: E731

CASES = [
    # ---- experiment files ---------------------------------------------------------------------------------
    Case("submit-missing-file", lambda c: ["submit", str(c.tmp / "nope.py")], expect="does not exist"),
    Case("submit-file-is-a-directory", lambda c: ["submit", str(c.tmp)], expect="does not exist"),
    exp_case("file-syntax-error", "experiment = Experiment(name='x'", "SyntaxError"),
    exp_case("file-no-experiment-variable", "exp = Experiment(name='x')", "must define `experiment"),
    exp_case("file-raises", "x = 1 / 0", "ZeroDivisionError"),
    exp_case("file-calls-exit", "import sys\nsys.exit(3)", "exit(3)"),
    exp_case("file-unknown-key", "experiment = Experiment(name='x', colour='red')", "colour"),
    exp_case("file-wrong-type", "experiment = Experiment(name='x', seeds='many')", "seeds"),
    exp_case("file-seeds-zero", "experiment = Experiment(name='x', base=BASE, seeds=0)", "seeds"),
    exp_case("file-seeds-negative", "experiment = Experiment(name='x', base=BASE, seeds=-2)", "seeds"),
    exp_case("file-repeats-zero", "experiment = Experiment(name='x', base=BASE, repeats=0)", "repeats"),
    exp_case("file-bad-vary", "experiment = Experiment(name='x', vary='sometimes')", "vary"),
    exp_case(
        "file-duplicate-interventions",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='a', set={'optim.lr': 1e-3}),"
        " Intervention(name='a', set={'optim.lr': 2e-3})])",
        "unique",
    ),
    exp_case(
        "file-intervention-named-baseline",
        "experiment = Experiment(name='x', interventions=[Intervention(name='baseline')])",
        "reserved",
    ),
    exp_case(
        "file-stack-unknown",
        "experiment = Experiment(name='x', interventions=[Intervention(name='a', stack=['nosuch'])])",
        "nosuch",
    ),
    exp_case(
        "file-stack-conflict",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='lo', set={'optim.lr': 1e-3}),"
        " Intervention(name='hi', set={'optim.lr': 2e-3}), Intervention(name='both', stack=['lo', 'hi'])])",
        "differently",
    ),
    exp_case(
        "file-unknown-config-key",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='i', set={'optim.lrr': 1})])",
        "optim.lrr",
    ),
    exp_case(
        "file-impossible-value",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='h', set={'model.n_head': 5})])",
        "divisible",
    ),
    exp_case(
        "file-negative-lr",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='n', set={'optim.lr': -1})])",
        "optim.lr",
    ),
    exp_case("file-unknown-preset", "experiment = Experiment(name='x', preset='huge')", "huge"),
    exp_case("name-dotdot", "experiment = Experiment(name='..', base=BASE)", "not a valid name"),
    exp_case("name-slash", "experiment = Experiment(name='a/b', base=BASE)", "not a valid name"),
    exp_case("name-backslash", "experiment = Experiment(name='a\\\\b', base=BASE)", "not a valid name"),
    exp_case("name-leading-dot", "experiment = Experiment(name='.hidden', base=BASE)", "not a valid name"),
    exp_case("name-leading-dash", "experiment = Experiment(name='-x', base=BASE)", "not a valid name"),
    exp_case("name-empty", "experiment = Experiment(name='', base=BASE)", "not a valid name"),
    exp_case("name-control-char", "experiment = Experiment(name='a\\x07b', base=BASE)", "not a valid name"),
    exp_case("name-newline", "experiment = Experiment(name='a\\nb', base=BASE)", "not a valid name"),
    exp_case("name-too-long", "experiment = Experiment(name='a' * 201, base=BASE)", "201 characters"),
    exp_case(
        "intervention-name-path",
        "experiment = Experiment(name='x', base=BASE, interventions=[Intervention(name='../up')])",
        "not a valid name",
    ),
    # ---- submit options -------------------------------------------------------------------------------------
    Case("submit-seeds-zero", lambda c: [*GOOD_SUBMIT(c), "--seeds", "0"], expect="--seeds"),
    Case("submit-seeds-negative", lambda c: [*GOOD_SUBMIT(c), "--seeds", "-1"], expect="--seeds"),
    Case("submit-seeds-not-a-number", lambda c: [*GOOD_SUBMIT(c), "--seeds", "abc"], expect="--seeds"),
    Case("submit-unknown-preset", lambda c: [*GOOD_SUBMIT(c), "--preset", "huge"], expect="huge"),
    Case("submit-set-no-equals", lambda c: [*GOOD_SUBMIT(c), "--set", "optim.lr"], expect="key=value"),
    Case("submit-set-empty-key", lambda c: [*GOOD_SUBMIT(c), "--set", "=3"], expect="key=value"),
    Case("submit-set-unknown-key", lambda c: [*GOOD_SUBMIT(c), "--set", "optim.lrr=1"], expect="optim.lrr"),
    Case("submit-set-wrong-type", lambda c: [*GOOD_SUBMIT(c), "--set", "optim.lr=fast"], expect="optim.lr"),
    Case("submit-dry-run-bad-seeds", lambda c: [*GOOD_SUBMIT(c), "--dry-run", "--seeds", "0"], expect="--seeds"),
    # ---- data ---------------------------------------------------------------------------------------------
    Case(
        "data-other-dataset",
        lambda c: [*GOOD_SUBMIT(c), "--set", "data.dataset=gpjt/fineweb-gpt2-tokens"],
        expect="data.dataset is 'gpjt/fineweb-gpt2-tokens' but",
    ),
    Case(
        "data-start-token-past-the-end",
        lambda c: [*GOOD_SUBMIT(c), "--set", "data.start_val_token=100000000"],
        expect="data.start_val_token (100,000,000) is past the end of the val split",
    ),
    Case(
        "data-missing-dir",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={c.tmp / 'no-data'}"],
        expect="python -m trainer.prepare embedded --out",
    ),
    Case(
        "data-empty-dir",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={_empty_dir(c)}"],
        expect="no prepared data",
    ),
    Case(
        "data-corrupt-shard-header",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={_corrupt_shard(c)}"],
        expect="bad magic number",
    ),
    Case(
        "data-truncated-shard",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={_truncated_shard(c)}"],
        expect="truncated or corrupt",
    ),
    Case(
        "data-missing-val-split",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={_no_val_split(c)}"],
        expect="val_000000.bin is missing",
    ),
    Case(
        "data-test-slice-too-big",
        lambda c: [*GOOD_SUBMIT(c), "--set", "eval.test_sequences=100000"],
        expect="eval.test_sequences",
    ),
    Case(
        "data-path-is-a-file",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={c.file('f.bin', b'x')}"],
        expect="is a file",
    ),
    # ---- worker -------------------------------------------------------------------------------------------
    Case(
        "worker-gpus-per-run-zero",
        lambda c: ["worker", "--gpus", "0", "--gpus-per-run", "0", "--until-empty", "--no-mlflow"],
        expect="--gpus-per-run",
    ),
    Case(
        "worker-parallel-zero",
        lambda c: ["worker", "--parallel", "0", "--until-empty", "--no-mlflow"],
        expect="--parallel",
    ),
    Case(
        "worker-nproc-zero",
        lambda c: ["worker", "--nproc-per-node", "0", "--until-empty", "--no-mlflow"],
        expect="--nproc-per-node",
    ),
    Case(
        "worker-heartbeat-zero",
        lambda c: ["worker", "--heartbeat", "0", "--until-empty", "--no-mlflow"],
        expect="--heartbeat",
    ),
    Case(
        "worker-heartbeat-negative",
        lambda c: ["worker", "--heartbeat", "-1", "--until-empty", "--no-mlflow"],
        expect="--heartbeat",
    ),
    Case(
        "worker-grace-equals-heartbeat",
        lambda c: ["worker", "--heartbeat", "5", "--grace", "5", "--until-empty", "--no-mlflow"],
        expect="longer than --heartbeat",
    ),
    Case(
        "worker-grace-below-heartbeat",
        lambda c: ["worker", "--grace", "1", "--until-empty", "--no-mlflow"],
        expect="longer than --heartbeat",
    ),
    Case(
        "worker-gpus-not-indices",
        lambda c: ["worker", "--gpus", "a,b", "--until-empty", "--no-mlflow"],
        expect="--gpus",
    ),
    Case(
        "worker-gpus-repeated", lambda c: ["worker", "--gpus", "0,0", "--until-empty", "--no-mlflow"], expect="--gpus"
    ),
    Case(
        "worker-gpus-not-a-multiple",
        lambda c: ["worker", "--gpus", "0,1,2", "--gpus-per-run", "2", "--until-empty", "--no-mlflow"],
        expect="multiple",
    ),
    Case("worker-parallel-not-a-number", lambda c: ["worker", "--parallel", "two"], expect="--parallel"),
    # ---- table --------------------------------------------------------------------------------------------
    Case("table-bad-format", lambda c: ["table", "--format", "xml"], expect="--format"),
    Case("table-alpha-zero", lambda c: ["table", "--alpha", "0"], expect="--alpha"),
    Case("table-alpha-above-one", lambda c: ["table", "--alpha", "1.5"], expect="--alpha"),
    Case("table-alpha-nan", lambda c: ["table", "--alpha", "nan"], expect="--alpha"),
    Case("table-unknown-experiment", lambda c: ["table", "nosuch"], expect="no experiment named 'nosuch'"),
    Case("table-bad-correction", lambda c: ["table", "--correction", "bonferroni"], expect="holm, bh, none"),
    Case("table-sesoi-word", lambda c: ["table", "--sesoi", "big"], expect="--sesoi must be a positive number"),
    Case("table-sesoi-negative", lambda c: ["table", "--sesoi", "-0.01"], expect="--sesoi must be a positive"),
    Case("table-target-negative", lambda c: ["table", "--target", "-3"], expect="--target must be a positive"),
    Case("table-target-alpha", lambda c: ["table", "--target", "3.3", "--target-alpha", "2"], expect="--target-alpha"),
    Case("more-seeds-bad-correction", lambda c: ["more-seeds", "pub", "--correction", "x"], expect="holm, bh, none"),
    # ---- noise, more-seeds --------------------------------------------------------------------------------
    Case("noise-unknown-experiment", lambda c: ["noise", "nosuch"], expect="no experiment named 'nosuch'"),
    Case("noise-bad-vary", lambda c: ["noise", "quickstart", "--vary", "sometimes"], expect="--vary"),
    Case("noise-one-repeat", lambda c: ["noise", "quickstart", "--repeats", "1"], expect="2 repeats"),
    Case("more-seeds-unknown-experiment", lambda c: ["more-seeds", "nosuch"], expect="no experiment named"),
    Case("more-seeds-max-one", lambda c: ["more-seeds", "quickstart", "--max-seeds", "1"], expect="--max-seeds"),
    Case("more-seeds-bad-alpha", lambda c: ["more-seeds", "quickstart", "--alpha", "2"], expect="--alpha"),
    Case("more-seeds-poll-zero", lambda c: ["more-seeds", "quickstart", "--poll", "0"], expect="--poll"),
    # ---- import -------------------------------------------------------------------------------------------
    csv_case("import-nan", "name,test_loss\nbaseline,3.5\nclip,nan\n", "res.csv:3"),
    csv_case("import-inf", "name,test_loss\nbaseline,inf\nclip,3.4\n", "res.csv:2"),
    csv_case("import-minus-inf", "name,test_loss\nbaseline,3.5\nclip,-inf\n", "finite positive"),
    csv_case("import-negative", "name,test_loss\nbaseline,3.5\nclip,-0.5\n", "'-0.5'"),
    csv_case("import-zero", "name,test_loss\nbaseline,0\nclip,3.4\n", "finite positive"),
    csv_case("import-not-a-number", "name,test_loss\nbaseline,low\n", "'low'"),
    csv_case("import-missing-column", "name,loss\nbaseline,3.5\n", "test_loss"),
    csv_case("import-missing-value", "name,test_loss\nbaseline\n", "finite positive"),
    csv_case("import-empty-file", "", "no rows"),
    csv_case("import-header-only", "name,test_loss\n", "no rows"),
    csv_case("import-unknown-baseline", "name,test_loss\nbase,3.5\nclip,3.4\n", "--baseline"),
    csv_case("import-unknown-baseline-option", IMPORTED, "--baseline", extra=("--baseline", "ref")),
    csv_case("import-empty-name", "name,test_loss\nbaseline,3.5\n,3.4\n", "name is empty"),
    csv_case("import-bad-seed", "name,test_loss,seed\nbaseline,3.5,x\n", "seed"),
    csv_case("import-negative-seed", "name,test_loss,seed\nbaseline,3.5,-1\n", "seed"),
    csv_case("import-not-utf8", b"name,test_loss\nb\xe9\xff,3.5\n", "UTF-8"),
    csv_case("import-wrong-extension", IMPORTED, ".csv or .json", name="res.txt"),
    csv_case("import-json-invalid", "[{", "not valid JSON", name="res.json"),
    csv_case("import-json-not-a-list", '{"name": "baseline"}', "list of objects", name="res.json"),
    csv_case("import-json-null-loss", '[{"name": "baseline", "test_loss": null}]', "item 1", name="res.json"),
    csv_case("import-json-nan", '[{"name": "baseline", "test_loss": NaN}]', "finite positive", name="res.json"),
    csv_case("import-json-bool-loss", '[{"name": "baseline", "test_loss": true}]', "finite positive", name="res.json"),
    csv_case("import-name-dotdot", IMPORTED, "--experiment", extra=("--experiment", "..")),
    csv_case("import-name-slash", IMPORTED, "--experiment", extra=("--experiment", "a/b")),
    csv_case("import-name-from-bad-stem", IMPORTED, "--experiment", name=".hidden.csv"),
    Case("import-missing-file", lambda c: ["import", str(c.tmp / "nope.csv")], expect="does not exist"),
    # ---- suggest ------------------------------------------------------------------------------------------
    Case("suggest-nothing", lambda c: ["suggest"], add_db=False, expect="--params"),
    Case("suggest-negative-params", lambda c: ["suggest", "--params", "-5"], add_db=False, expect="positive"),
    Case("suggest-unknown-preset", lambda c: ["suggest", "--preset", "huge"], add_db=False, expect="huge"),
    Case(
        "suggest-bad-format",
        lambda c: ["suggest", "--preset", "tiny", "--format", "xml"],
        add_db=False,
        expect="--format",
    ),
    # ---- sweep --------------------------------------------------------------------------------------------
    Case("sweep-status-unknown", lambda c: ["sweep", "status", "nosuch"], expect="no sweep named 'nosuch'"),
    Case(
        "sweep-plot-unknown",
        lambda c: ["sweep", "plot", "nosuch", "--out", str(c.tmp / "plots")],
        expect="no sweep named 'nosuch'",
    ),
    Case("sweep-confirm-unknown", lambda c: ["sweep", "confirm", "nosuch"], expect="no sweep named 'nosuch'"),
    Case("sweep-status-experiment-name", lambda c: ["sweep", "status", "quickstart"], expect="no sweep named"),
    Case("sweep-plot-no-name", lambda c: ["sweep", "plot"], expect="needs the sweep's name"),
    Case("sweep-status-bad-format", lambda c: ["sweep", "status", "x", "--format", "xml"], expect="--format"),
    Case("sweep-confirm-zero-seeds", lambda c: ["sweep", "confirm", "x", "--seeds", "0"], expect="--seeds"),
    Case("sweep-missing-file", lambda c: ["sweep", str(c.tmp / "nope.py")], expect="no sweep file"),
    Case("sweep-typo-in-subcommand", lambda c: ["sweep", "stats", "lr-wd"], expect="status|plot|confirm"),
    sweep_case("sweep-file-syntax-error", "sweep = Sweep(name='s'", "SyntaxError"),
    sweep_case("sweep-file-no-sweep-variable", "s = 1", "must define `sweep"),
    sweep_case("sweep-file-bad-name", "sweep = Sweep(name='..', base=BASE)", "not a valid name"),
    sweep_case(
        "sweep-file-low-above-high",
        "sweep = Sweep(name='s', base=BASE, space={'optim.lr': LogUniform(low=1e-2, high=1e-4)})",
        "below high",
    ),
    sweep_case("sweep-file-empty-space", "sweep = Sweep(name='s', base=BASE, space={})", "space is empty"),
    sweep_case(
        "sweep-file-unknown-space-key",
        "sweep = Sweep(name='s', base=BASE, space={'optim.lrr': LogUniform(low=1e-4, high=1e-2)})",
        "optim.lrr",
    ),
    sweep_case("sweep-file-zero-trials", "sweep = Sweep(name='s', base=BASE, trials=0)", "trials"),
    sweep_case(
        "sweep-file-missing-data",
        "sweep = Sweep(name='s', base={'data.path': 'no/such/data'})",
        "python -m trainer.prepare",
    ),
    sweep_case("sweep-poll-zero", "sweep = Sweep(name='s', base=BASE)", "--poll", extra=("--poll", "0")),
    sweep_case(
        "sweep-grace-below-polls",
        "sweep = Sweep(name='s', base=BASE)",
        "--grace",
        extra=("--grace", "1", "--poll", "2"),
    ),
    sweep_case(
        "sweep-set-unknown-key", "sweep = Sweep(name='s', base=BASE)", "optim.lrr", extra=("--set", "optim.lrr=1")
    ),
    Case(
        "sweep-file-and-name",
        lambda c: ["sweep", c.sweep("sweep = Sweep(name='s', base=BASE)"), "s"],
        expect="takes no name",
    ),
    # ---- report, ls, logs, cancel, retry ------------------------------------------------------------------
    Case(
        "report-unknown-experiment",
        lambda c: ["report", "nosuch", "--out", str(c.tmp / "rep")],
        expect="no experiment named 'nosuch'",
    ),
    Case(
        "report-bad-alpha",
        lambda c: ["report", "quickstart", "--alpha", "0", "--out", str(c.tmp / "rep")],
        expect="--alpha",
    ),
    Case("ls-bad-state", lambda c: ["ls", "--state", "done"], expect="--state"),
    Case("ls-unknown-experiment", lambda c: ["ls", "nosuch"], expect="no experiment named 'nosuch'"),
    Case("logs-unknown-prefix", lambda c: ["logs", c.unknown_prefix()], expect="no run id starts with"),
    Case("logs-ambiguous-prefix", lambda c: ["logs", "imp"], expect="matches 3 runs"),
    Case("logs-wildcard", lambda c: ["logs", "%"], expect="not a run id"),
    Case("logs-zero-lines", lambda c: ["logs", c.queued()[:8], "-n", "0"], expect="-n"),
    Case("cancel-unknown", lambda c: ["cancel", "nosuch"], expect="no run or experiment matches"),
    Case("cancel-wildcard", lambda c: ["cancel", "%"], expect="no run or experiment matches"),
    Case("retry-succeeded-run", lambda c: ["retry", c.succeeded()], expect="is succeeded"),
    Case("retry-queued-run", lambda c: ["retry", c.queued()], expect="is queued"),
    Case("retry-unknown-prefix", lambda c: ["retry", c.unknown_prefix()], expect="no run id starts with"),
    Case("retry-ambiguous-prefix", lambda c: ["retry", "imp"], expect="give more of the id"),
    Case("retry-empty-prefix", lambda c: ["retry", ""], expect="not a run id"),
    Case("ui-bad-port", lambda c: ["ui", "--port", "0"], add_db=False, expect="--port"),
    Case("unknown-command", lambda c: ["trian"], add_db=False, expect="No such command"),
    Case("unknown-option", lambda c: ["table", "--colour"], expect="No such option"),
    # ---- the database itself ------------------------------------------------------------------------------
    *[
        Case(
            f"corrupt-db-{'-'.join(cmd[:2])}",
            lambda c, cmd=cmd: [*cmd],
            db="corrupt",
            expect="not a valid SQLite database",
        )
        for cmd in (
            ["table"],
            ["ls"],
            ["status"],
            ["noise", "quickstart"],
            ["logs", "abc"],
            ["cancel", "abc"],
            ["retry", "abc"],
            ["db", "upgrade"],
            ["sweep", "status", "x"],
        )
    ],
    Case("corrupt-db-submit", GOOD_SUBMIT, db="corrupt", expect="not a valid SQLite database"),
    Case(
        "corrupt-db-worker",
        lambda c: ["worker", "--until-empty", "--no-mlflow"],
        db="corrupt",
        expect="not a valid SQLite database",
    ),
    Case(
        "corrupt-db-import",
        lambda c: ["import", c.file("r.csv", IMPORTED)],
        db="corrupt",
        expect="not a valid SQLite database",
    ),
    *[
        Case(f"truncated-db-{cmd[0]}", lambda c, cmd=cmd: [*cmd], db="truncated", expect="not a valid SQLite database")
        for cmd in (["table"], ["ls"], ["status"])
    ],
    Case("truncated-db-submit", GOOD_SUBMIT, db="truncated", expect="not a valid SQLite database"),
    Case(
        "truncated-db-worker",
        lambda c: ["worker", "--until-empty", "--no-mlflow"],
        db="truncated",
        expect="not a valid SQLite database",
    ),
    # Damage found only mid-command: the schema pages are whole, the runs table's root page is not.
    *[
        Case(
            f"damaged-runs-db-{'-'.join(cmd[:2])}",
            lambda c, cmd=cmd: [*cmd],
            db="damaged-runs",
            expect="not a valid SQLite database",
        )
        for cmd in (["table"], ["ls"], ["status"], ["logs", "abc"], ["retry", "abc"], ["noise", "quickstart"])
    ],
    Case("empty-db-file-table", lambda c: ["table"], db="empty", expect="no orch database"),
    Case("empty-db-file-ls", lambda c: ["ls"], db="empty", expect="no orch database"),
    Case("no-db-table", lambda c: ["table"], db="none", expect="no database at"),
    Case("no-db-upgrade", lambda c: ["db", "upgrade"], db="none", expect="no database at"),
    # A database that does not exist yet must not be created by a command that refuses its input.
    Case("fresh-db-submit-bad-seeds", lambda c: [*GOOD_SUBMIT(c), "--seeds", "0"], db="none", expect="--seeds"),
    Case(
        "fresh-db-submit-missing-data",
        lambda c: ["submit", QUICKSTART, "--set", "data.path=nowhere"],
        db="none",
        expect="nowhere",
    ),
    Case(
        "fresh-db-import-nan",
        lambda c: ["import", c.file("r.csv", "name,test_loss\nbaseline,nan\n")],
        db="none",
        expect="finite positive",
    ),
    Case(
        "fresh-db-worker-parallel-zero",
        lambda c: ["worker", "--parallel", "0", "--until-empty", "--no-mlflow"],
        db="none",
        expect="--parallel",
    ),
    Case(
        "fresh-db-sweep-bad-file",
        lambda c: ["sweep", c.sweep("sweep = Sweep(name='s', base=BASE, trials=0)"), "--no-mlflow"],
        db="none",
        expect="trials",
    ),
    Case("fresh-db-sweep-status", lambda c: ["sweep", "status", "s"], db="none", expect="no database at"),
    Case("db-is-a-directory", lambda c: ["table", "--db", f"sqlite:///{c.tmp}"], add_db=False, expect="directory"),
    Case("db-not-a-url", lambda c: ["table", "--db", "results.db"], add_db=False, expect="not a database URL"),
    Case("db-http-url", lambda c: ["table", "--db", "http://example.com/x"], add_db=False, expect="unsupported"),
    Case(
        "db-mysql-url",
        lambda c: ["submit", QUICKSTART, "--set", f"data.path={c.data_dir}", "--db", "mysql://u@127.0.0.1/x"],
        add_db=False,
        expect="unsupported",
    ),
    Case(
        "db-unknown-driver",
        lambda c: ["table", "--db", "postgresql+nosuchdriver://u@127.0.0.1/x"],
        add_db=False,
        expect="no driver",
    ),
    Case("db-postgres-unreachable-table", lambda c: ["table", "--db", c.pg()], add_db=False, expect="cannot connect"),
    Case(
        "db-postgres-unreachable-submit",
        lambda c: [*GOOD_SUBMIT(c), "--db", c.pg()],
        add_db=False,
        expect="cannot connect",
    ),
    Case(
        "db-postgres-unreachable-worker",
        lambda c: ["worker", "--until-empty", "--no-mlflow", "--db", c.pg()],
        add_db=False,
        expect="cannot connect",
    ),
    Case(
        "db-postgres-password-in-env-is-not-shown",
        lambda c: ["table"],
        add_db=False,
        env=lambda c: {"ORCH_DB": c.pg(PASSWORD)},
        expect="cannot connect",
    ),
    *[
        Case(
            f"password-in-db-option-{name}",
            lambda c, cmd=cmd: [*cmd(c), "--db", c.pg(PASSWORD)],
            add_db=False,
            expect="~/.pgpass or $PGPASSWORD",
        )
        for name, cmd in (
            ("table", lambda c: ["table"]),
            ("submit", GOOD_SUBMIT),
            ("worker", lambda c: ["worker", "--until-empty", "--no-mlflow"]),
            ("db-upgrade", lambda c: ["db", "upgrade"]),
            ("import", lambda c: ["import", c.file("r.csv", IMPORTED)]),
            ("sweep-status", lambda c: ["sweep", "status", "x"]),
        )
    ],
    Case(
        "password-in-db-query",
        lambda c: ["ls", "--db", f"postgresql://orch@127.0.0.1/orch?password={PASSWORD}"],
        add_db=False,
        expect="~/.pgpass",
    ),
    Case(
        "password-in-unparsable-url",
        lambda c: ["ls", "--db", f"postgresql://orch:{PASSWORD}@host:port/x"],
        add_db=False,
        expect="~/.pgpass",
    ),
    Case(
        "unparsable-url",
        lambda c: ["ls", "--db", "postgresql://orch@host:port/x"],
        add_db=False,
        expect="not a database URL",
    ),
    *[
        Case(
            f"password-in-mlflow-option-{name}",
            lambda c, cmd=cmd: [*cmd, "--mlflow", f"http://u:{PASSWORD}@127.0.0.1:9"],
            expect="$MLFLOW_TRACKING_PASSWORD",
        )
        for name, cmd in (("worker", ["worker", "--until-empty"]), ("sync", ["sync"]))
    ],
]


def _dump(db: Path) -> list:
    """Every table's definition and rows, read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        rows = [
            (name, sorted(map(repr, con.execute(f'SELECT * FROM "{name}"').fetchall())))
            for kind, name, _ in tables
            if kind == "table"
        ]
        return [tables, rows]
    finally:
        con.close()


def _files(folder: Path) -> list[str]:
    """The folder's files, less SQLite's lock, WAL and shared-memory files (they come and go with readers)."""
    skip = (".lock", "-wal", "-shm", "-journal")
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not str(p).endswith(skip))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)] if c.xfail else [])
        for c in CASES
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, seeded, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command writes by default (results.db, mlflow.db, report/) lands here
    monkeypatch.delenv("ORCH_DB", raising=False)
    ctx = Ctx(tmp_path, tmp_path / "results.db", data_dir, seeded["ids"])
    if case.db in ("seeded", "truncated", "damaged-runs"):
        src, dst = sqlite3.connect(seeded["db"]), sqlite3.connect(ctx.db)
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=WAL")  # as orch leaves it, so that opening it writes nothing
        root = dst.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
        page = dst.execute("PRAGMA page_size").fetchone()[0]
        src.close(), dst.close()
        data = ctx.db.read_bytes()
        if case.db == "truncated":
            ctx.db.write_bytes(data[: len(data) // 2])
        elif case.db == "damaged-runs":
            start = (root - 1) * page
            ctx.db.write_bytes(data[:start] + os.urandom(page) + data[start + page :])
    elif case.db == "corrupt":
        ctx.db.write_bytes(os.urandom(4096 * 5))
    elif case.db == "empty":
        ctx.db.write_bytes(b"")
    args = case.args(ctx) + (["--db", ctx.url] if case.add_db else [])
    env = case.env(ctx) if case.env else None
    before_bytes = ctx.db.read_bytes() if ctx.db.exists() else None
    before_dump = _dump(ctx.db) if case.db == "seeded" else None
    before_files = _files(tmp_path)

    result = invoke(args, env=env)

    exc = result.exception
    trace = "".join(traceback.format_exception(exc)) if exc and not isinstance(exc, SystemExit) else ""
    assert not trace, f"{args}: raised\n{trace}"
    assert "Traceback" not in result.output
    assert result.exit_code == 2, f"{args}: exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{args}: stderr is not one error line:\n{result.stderr}"
    assert case.expect in lines[0], f"{args}: {case.expect!r} not in {lines[0]!r}"
    assert PASSWORD not in result.output, f"{args}: the password was printed: {result.output}"
    # The database as it was: a damaged file byte for byte, a good one row for row with no new table.
    if case.db == "seeded":
        assert _dump(ctx.db) == before_dump, f"{args}: the database changed"
    elif before_bytes is not None:
        assert ctx.db.read_bytes() == before_bytes, f"{args}: the database file changed"
    else:
        assert not ctx.db.exists(), f"{args}: a database was created"
    assert _files(tmp_path) == before_files, f"{args}: files appeared or vanished"


def test_the_matrix_covers_every_command():
    assert len(CASES) >= 70 and len({c.id for c in CASES}) == len(CASES)
    ids = " ".join(c.id for c in CASES)
    for command in (
        "submit",
        "worker",
        "table",
        "noise",
        "more-seeds",
        "import",
        "suggest",
        "sweep",
        "report",
        "ls",
        "status",
        "logs",
        "cancel",
        "retry",
        "db-upgrade",
        "corrupt-db",
        "truncated-db",
        "password",
    ):
        assert command in ids, command


def test_password_in_orch_db_is_allowed_and_never_shown(tmp_path, monkeypatch):
    """$ORCH_DB may hold a password (it is not on the command line); errors still never show it."""
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://orch:{PASSWORD}@127.0.0.1:{port}/orch"
    for args in (["ls"], ["status"], ["sweep", "status", "x"]):
        result = invoke(args, env={"ORCH_DB": url})
        assert result.exit_code == 2 and f"cannot connect to {url.replace(PASSWORD, '***')}" in result.stderr
        assert PASSWORD not in result.output


def test_check_dataset_reads_headers_only(data_dir):
    from trainer.data import check_dataset

    meta = json.loads((data_dir / "meta.json").read_text())
    assert check_dataset(data_dir, seq_len=64, val_sequences=32, test_sequences=128) == meta["tokens"]


def test_good_input_still_works_and_no_check_data_skips_the_check(seeded, data_dir, tmp_path, monkeypatch):
    """The checks refuse bad input only: the seeded database takes a good submit again, and --no-check-data
    lets through a data path that exists only on the worker nodes."""
    monkeypatch.chdir(tmp_path)
    src, dst = sqlite3.connect(seeded["db"]), sqlite3.connect(tmp_path / "results.db")
    src.backup(dst)
    src.close(), dst.close()
    url = f"sqlite:///{tmp_path / 'results.db'}"
    ok = invoke(["submit", QUICKSTART, "--set", f"data.path={data_dir}", "--db", url])
    assert ok.exit_code == 0 and "0 queued, 15 reused" in ok.stdout, ok.output
    refused = invoke(["submit", QUICKSTART, "--set", "data.path=/only/on/workers", "--db", url])
    assert refused.exit_code == 2 and "--no-check-data" in refused.stderr
    ok = invoke(["submit", QUICKSTART, "--set", "data.path=/only/on/workers", "--no-check-data", "--db", url])
    assert ok.exit_code == 0 and "15 queued, 0 reused" in ok.stdout, ok.output


def test_the_installed_entry_point_prints_one_line_too(tmp_path):
    """The same through a real process (what a user runs): no traceback, one line, exit 2, file untouched."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    db = tmp_path / "results.db"
    db.write_bytes(os.urandom(8192))
    before = db.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ls", "--db", f"sqlite:///{db}"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {db} is not a valid SQLite database (file is not a database): move it aside or restore a backup"
    ]
    assert db.read_bytes() == before

"""Experiment files: expansion, run identity, and spec errors that name the file, intervention and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import runspec, specs
from tests.conftest import REPO, subprocess_env

EXPERIMENTS = sorted(p for p in (REPO / "experiments").glob("*.py") if not p.stem.startswith("sweep"))
SWEEPS = sorted((REPO / "experiments").glob("sweep*.py"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_shipped_sweep_files_load_at_both_scales(path):
    sweep = specs.load_sweep(path)
    for preset in ("tiny", "gpt2-small"):
        base = runspec.sweep_base(sweep, preset=preset)
        assert base["eval"]["interval"] > 0
        runs = runspec.trial_runs(sweep, base, {k: 1e-3 for k in sweep.space}, "trial-0")
        assert len(runs) == sweep.seeds


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiment_files_expand_at_both_scales(path):
    exp = specs.load_experiment(path)
    for preset in ("tiny", "gpt2-small"):
        runs = runspec.expand(exp, preset=preset)
        assert runs
        if preset == "gpt2-small":  # every intervention changes something at the scale it was written for
            assert len({r.id for r in runs}) == len(runs) and not runspec.identical_arms(runs)


def test_an_intervention_that_changes_nothing_is_flagged():
    # The tiny preset already trains in fp32, so "fp32" is the baseline there: one run, and a warning.
    runs = runspec.expand(specs.load_experiment(REPO / "experiments/amp.py"), preset="tiny")
    assert runspec.identical_arms(runs) == [("baseline", "fp32")]


def test_family_files_cover_the_blog_series():
    names = {p.stem for p in EXPERIMENTS}
    assert {
        "gradient_clipping",
        "remove_dropout",
        "qkv_bias",
        "lr_schedule",
        "weight_decay",
        "weight_tying",
        "amp",
        "noise",
        "stacked",
        "quickstart",
    } <= names
    wd = runspec.expand(specs.load_experiment(REPO / "experiments/weight_decay.py"))
    assert {r.config.optim.weight_decay for r in wd} == {0.01, 0.1, 0.33724}


def test_quickstart_is_a_real_demo():
    exp = specs.load_experiment(REPO / "experiments/quickstart.py")
    runs = runspec.expand(exp)
    arms = {r.arm for r in runs}
    assert "baseline" in arms and len(arms) >= 5 and exp.seeds >= 2


def test_run_identity_is_the_resolved_config():
    exp = specs.Experiment(name="a", seeds=2, repeats=2)
    runs = runspec.expand(exp)
    assert len({r.id for r in runs}) == 4
    # The same baseline from another file, or spelled as an explicit no-op change, is the same run.
    same = runspec.expand(specs.Experiment(name="b", base={"model.dropout": 0.1}, seeds=2, repeats=2))
    assert {r.id for r in same} == {r.id for r in runs}
    assert [r.seed for r in runs] == [42, 42, 43, 43]


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "exp.py"
    path.write_text("from orchestrator.specs import Experiment, Intervention\n" + body)
    return path


@pytest.mark.parametrize(
    "body, expected",
    [
        (
            'experiment = Experiment(name="x", interventions=[Intervention(name="bad", set={"model.dropot": 0})])',
            ["intervention 'bad'", "model.dropot", "did you mean 'dropout'"],
        ),
        (
            'experiment = Experiment(name="x", interventions=[Intervention(name="typed", set={"optim.lr": "fast"})])',
            ["intervention 'typed'", "optim.lr"],
        ),
        (
            'experiment = Experiment(name="x", interventions=[Intervention(name="heads", set={"model.n_head": 5})])',
            ["intervention 'heads'", "model.n_embd (64) must be divisible by model.n_head (5)"],
        ),
        ('experiment = Experiment(name="x", seeds=0)', ["seeds"]),
        ('experiment = Experiment(name="x", colour="red")', ["colour"]),
        ("x = 1 / 0", ["exp.py:2", "ZeroDivisionError"]),
        ("exp = 3", ["must define `experiment = Experiment(...)`"]),
    ],
)
def test_spec_errors_name_file_intervention_and_key(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(specs.SpecError) as info:
        runspec.expand(specs.load_experiment(path), source=str(path))
    for fragment in expected:
        assert fragment in str(info.value)


def test_cli_rejects_a_bad_file_and_leaves_the_database_untouched(tmp_path):
    db = tmp_path / "results.db"
    good = write(tmp_path, 'experiment = Experiment(name="ok")')
    env = subprocess_env()
    orch = [sys.executable, "-m", "orchestrator.cli"]
    ok = subprocess.run(
        [*orch, "submit", str(good), "--db", f"sqlite:///{db}", "--no-check-data"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    before = db.read_bytes()
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from orchestrator.specs import Experiment, Intervention\n"
        'experiment = Experiment(name="ok", interventions=[Intervention(name="i", set={"optim.lrr": 1})])\n'
    )
    out = subprocess.run(
        [*orch, "submit", str(bad), "--db", f"sqlite:///{db}"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "optim.lrr" in out.stderr and "intervention 'i'" in out.stderr
    assert db.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# A dry run reports every problem of a file at once, and counts what a submit would queue and reuse.

MANY_PROBLEMS = """
experiment = Experiment(
    name="x",
    base={"optim.lrr": 1e-3, "run.seed": -1},
    interventions=[
        Intervention(name="a", set={"model.dropot": 0.0, "optim.lr": -1, "model.n_head": 5}),
        Intervention(name="b", set={"optim.grad_clip": "high", "schedule.kind": "sometimes"}),
        Intervention(name="lo", set={"optim.weight_decay": 0.01}),
        Intervention(name="hi", set={"optim.weight_decay": 0.3}),
        Intervention(name="both", stack=["lo", "hi"]),
        Intervention(name="fine", set={"optim.grad_clip": 1.0}),
    ],
)
"""


def test_every_bad_key_and_value_of_every_arm_is_reported_at_once(tmp_path):
    path = write(tmp_path, MANY_PROBLEMS)
    with pytest.raises(specs.SpecError) as info:
        runspec.expand(specs.load_experiment(path), source=str(path), overrides={"eval.batchsize": 4})
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: 9 problems, nothing queued:"
    want = [
        "base config: unknown config key 'optim.lrr'",
        "--set: unknown config key 'eval.batchsize'",
        "base config: run.seed: Input should be greater than or equal to 0",
        "intervention 'a': unknown config key 'model.dropot'",
        "intervention 'a': optim.lr: Input should be greater than 0",
        "intervention 'a': model: model.n_embd (64) must be divisible by model.n_head (5)",
        "intervention 'b': optim.grad_clip:",
        "intervention 'b': schedule.kind:",
        "intervention 'both': intervention 'both' stacks 'lo' and 'hi', which set optim.weight_decay differently",
    ]
    for fragment in want:
        assert sum(fragment in line for line in lines[1:]) == 1, (fragment, lines)
    # The base's bad run.seed is named once, not again for each arm that inherits it; a good arm adds nothing.
    assert sum("run.seed" in line for line in lines) == 1 and not any("'fine'" in line for line in lines)
    assert "did you mean 'dropout'" in str(info.value)
    # The CLI: all of them on its one error line, exit 2, nothing written.
    db = tmp_path / "results.db"
    from typer.testing import CliRunner

    from orchestrator.cli import app

    args = ["submit", str(path), "--set", "eval.batchsize=4", "--dry-run", "--no-check-data", "--db", f"sqlite:///{db}"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and not db.exists()
    (error,) = [line for line in out.stderr.splitlines() if line.strip()]
    assert error.startswith("error: ") and all(fragment in error for fragment in want)


COUNTED = """
experiment = Experiment(
    name="counted",
    seeds=SEEDS,
    interventions=[
        Intervention(name="clip", set={"optim.grad_clip": 1.0}),
        Intervention(name="same", set={"model.dropout": 0.1}),  # the tiny baseline's own value: its runs
    ],
)
"""


def test_a_dry_run_counts_queued_and_reused_as_the_submit_does(tmp_path):
    from orchestrator import api

    url = f"sqlite:///{tmp_path / 'results.db'}"
    first = write(tmp_path, "SEEDS = 2\n" + COUNTED)
    dry = api.submit(first, dry_run=True, check_data_here=False, db=url)
    assert not (tmp_path / "results.db").exists()  # a dry run creates no database
    # Six runs: 'same' is the baseline's runs, so a submit queues 4 and reuses two of them (still queued).
    assert (len(dry.queued), len(dry.reused)) == (4, 2) and {s for _, s in dry.reused} == {"queued"}
    real = api.submit(first, check_data_here=False, db=url)
    assert [r.id for r in dry.queued] == [r.id for r in real.queued]
    assert [(r.id, s) for r, s in dry.reused] == [(r.id, s) for r, s in real.reused]
    # One more seed, against the database: the 4 stored runs (and 'same', twice over) reused, 2 new queued.
    more = write(tmp_path, "SEEDS = 3\n" + COUNTED)
    dry = api.submit(more, dry_run=True, check_data_here=False, db=url)
    assert (len(dry.queued), len(dry.reused)) == (2, 7) and str(dry).startswith("counted: would queue 2, reuse 7")
    real = api.submit(more, check_data_here=False, db=url)
    assert [r.id for r in dry.queued] == [r.id for r in real.queued]
    assert [(r.id, s) for r, s in dry.reused] == [(r.id, s) for r, s in real.reused]
    assert str(real) == "counted: 2 queued, 7 reused"

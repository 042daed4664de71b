"""`orch plan` and `orch submit --seeds auto` (orchestrator/plan.py): sample sizes against scipy's noncentral t
computed here independently and against simulated studies, σ and σ_d from a database of imported and
simulated runs, the CLI's text and JSON, and every bad input as one line. Nothing is trained: finished runs
are imported, or claimed and finished through the real queue with known losses (as tests/test_stats.py does).
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from orchestrator import api, noise, power, queries, queue
from orchestrator import plan as plan_
from orchestrator.cli import app
from orchestrator.db import connect
from tests.conftest import REPO, subprocess_env


def nct_power(ncp: float, df: int, level: float) -> float:
    """Two-sided power of a t-test, straight from scipy's noncentral t (NaN far in the lower tail: ~0)."""
    t = sps.t.ppf(1 - level / 2, df)
    return float(sps.nct.sf(t, df, ncp) + np.nan_to_num(sps.nct.cdf(-t, df, ncp)))


def paired_power(effect, sigma_d, n, level):
    return nct_power(effect * math.sqrt(n) / sigma_d, n - 1, level)


def unpaired_power(effect, sigma, n, level):
    return nct_power(effect / (sigma * math.sqrt(2 / n)), 2 * n - 2, level)


# ---------------------------------------------------------------------------------------------------------
# Sample sizes.


def test_known_sample_sizes():
    # d = 1, two-sided α = 0.05, 80%: 17 per group unpaired, 10 pairs paired (the exact noncentral-t counts,
    # as G*Power gives them; the normal approximation says 16 and 8).
    assert power.seeds_unpaired(1.0, 1.0, 0.8, 0.05) == 17
    assert power.seeds_paired(1.0, 1.0, 0.8, 0.05) == 10
    assert unpaired_power(1, 1, 17, 0.05) >= 0.8 > unpaired_power(1, 1, 16, 0.05)
    assert paired_power(1, 1, 10, 0.05) >= 0.8 > paired_power(1, 1, 9, 0.05)
    # In nats: σ 0.01 and an effect of 0.01 is d = 1 too.
    assert power.seeds_unpaired(0.01, 0.01) == 17 and power.seeds_paired(0.01, 0.01) == 10


@pytest.mark.parametrize(
    "effect, sigma, target, level",
    [
        (0.01, 0.02, 0.8, 0.05),
        (0.005, 0.003, 0.9, 0.05 / 3),
        (0.02, 0.01, 0.95, 0.01),
        (0.001, 0.01, 0.8, 0.025),  # hundreds of seeds
        (0.05, 0.01, 0.5, 0.05),  # 2 is already enough
    ],
)
def test_sample_size_is_the_smallest_with_the_target_power(effect, sigma, target, level):
    n = power.seeds_paired(effect, sigma, target, level)
    assert paired_power(effect, sigma, n, level) >= target
    assert n == 2 or paired_power(effect, sigma, n - 1, level) < target
    assert power.power_paired(effect, sigma, n, level) == pytest.approx(paired_power(effect, sigma, n, level))
    n = power.seeds_unpaired(effect, sigma, target, level)
    assert unpaired_power(effect, sigma, n, level) >= target
    assert n == 2 or unpaired_power(effect, sigma, n - 1, level) < target


def test_beyond_the_cap_says_more_than_10000_and_far_tails_are_not_nan():
    assert power.seeds_paired(1e-5, 0.01) is None and power.seeds_unpaired(1e-5, 0.01) is None
    assert plan_.Design("paired", 0.01, None, None).seeds == "more than 10000"
    # scipy's noncentral t returns NaN in the far lower tail; the power there is 1, not NaN.
    assert power.power_paired(1.0, 0.01, 3, 0.05) == pytest.approx(1.0)
    assert power.power_unpaired(1.0, 0.01, 3, 3, 1e-5) == pytest.approx(1.0)


def test_simulated_paired_studies_reach_the_planned_power():
    # Each seed's luck (σ 0.02) is common to both arms; what is left, σ_d, is what pairing pays for.
    effect, sigma_d, level = 0.01, 0.008, 0.05 / 2
    n = power.seeds_paired(effect, sigma_d, 0.8, level)
    planned = power.power_paired(effect, sigma_d, n, level)
    rng = np.random.default_rng(20260501)
    luck = rng.normal(0, 0.02, (2000, n))
    base = 3.70 + luck + rng.normal(0, sigma_d / math.sqrt(2), (2000, n))
    arm = 3.70 - effect + luck + rng.normal(0, sigma_d / math.sqrt(2), (2000, n))
    detected = np.mean(sps.ttest_rel(base, arm, axis=1).pvalue < level)
    assert abs(detected - planned) <= 0.03, (n, planned, detected)
    # Unpaired with Welch's test (the table's), at the unpaired count: about the target too.
    sigma = 0.01
    n = power.seeds_unpaired(effect, sigma, 0.8, level)
    base, arm = rng.normal(3.70, sigma, (2000, n)), rng.normal(3.70 - effect, sigma, (2000, n))
    detected = np.mean(sps.ttest_ind(base, arm, axis=1, equal_var=False).pvalue < level)
    assert abs(detected - power.power_unpaired(effect, sigma, n, n, level)) <= 0.03


def test_levels_per_correction():
    assert power.per_arm_level(0.05, 4, "holm") == pytest.approx(0.0125)
    assert power.per_arm_level(0.05, 4, "bh") == pytest.approx(0.0125)
    assert power.per_arm_level(0.05, 4, "none") == 0.05
    assert power.per_arm_level(0.05, 0, "holm") == 0.05


# ---------------------------------------------------------------------------------------------------------
# From a database.

BASE = [3.700, 3.712, 3.695, 3.706, 3.690]  # seeds 0..4
ARMS = {
    "a": [3.690, 3.705, 3.684, 3.699, 3.681],  # seeds 0..4
    "b": [3.702, 3.709, 3.690, 3.711],  # seeds 0..3
}
LONE = [3.70, 3.68, 3.69]  # "c": imported without seeds, pairs with nothing


def imported(tmp_path, name="imp") -> str:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    rows = [{"name": "baseline", "test_loss": v, "seed": s} for s, v in enumerate(BASE)]
    rows += [{"name": arm, "test_loss": v, "seed": s} for arm, vs in ARMS.items() for s, v in enumerate(vs)]
    rows += [{"name": "c", "test_loss": v} for v in LONE]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rows))
    api.import_results(path, db=url)
    return url


def pooled_sigma_d() -> float:
    diffs = [np.array(vs) - np.array(BASE[: len(vs)]) for vs in ARMS.values()]
    return math.sqrt(sum((len(d) - 1) * np.var(d, ddof=1) for d in diffs) / sum(len(d) - 1 for d in diffs))


def test_plan_from_a_database_uses_the_baseline_sigma_and_pooled_pairs(tmp_path):
    url = imported(tmp_path)
    p = api.plan("imp", effect=0.01, db=url)
    assert p.sigma == pytest.approx(np.std(BASE, ddof=1))
    assert p.sigma_d == pytest.approx(pooled_sigma_d()) and p.sigma_d_measured
    assert "pooled over a, b" in p.sigma_d_from and "9 per-seed differences" in p.sigma_d_from
    assert p.m == 3 and p.level == pytest.approx(0.05 / 3)
    assert p.paired.n == power.seeds_paired(0.01, p.sigma_d, 0.8, 0.05 / 3)
    assert p.unpaired.n == power.seeds_unpaired(0.01, p.sigma, 0.8, 0.05 / 3)
    now = {a.arm: a for a in p.now}
    assert now["a"].test == "paired" and now["a"].pairs == 5
    assert now["a"].power == pytest.approx(paired_power(0.01, p.sigma_d, 5, 0.05 / 3))
    assert now["c"].test == "unpaired" and now["c"].power == pytest.approx(
        power.power_unpaired(0.01, p.sigma, 3, 5, 0.05 / 3)
    )
    # --sigma replaces σ (the unpaired count follows it); σ_d stays what the pairs measured.
    given = api.plan("imp", effect=0.01, sigma=0.02, correction="none", db=url)
    assert given.sigma == 0.02 and given.sigma_d == pytest.approx(p.sigma_d) and given.level == 0.05
    assert given.unpaired.n == power.seeds_unpaired(0.01, 0.02, 0.8, 0.05)
    assert "given (--sigma)" in given.text() and "also measured: the baseline of imp" in given.text()


def test_noise_studies_give_sigma_when_they_have_more_runs(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    eng = connect(url)
    exp = experiment_file(tmp_path, seeds=3)
    api.submit(exp, check_data_here=False, db=url)
    finish_all(eng)
    assert "baseline of pl" in api.plan("pl", effect=0.01, db=url).sigma_from
    noise.noise(eng, "pl", 6, "init")
    noise.noise(eng, "pl", 8, "data")  # more runs, but a source of noise the experiment's seeds do not vary
    finish_all(eng)
    p = api.plan("pl", effect=0.01, db=url)
    init = [r.test_loss for e, a, r in queries.runs_of(eng, ["pl.noise-init"])]
    assert p.sigma == pytest.approx(np.std(init, ddof=1)) and "pl.noise-init (6 runs" in p.sigma_from
    used = {s.experiment: s.used for s in p.sources}
    assert used == {"pl": False, "pl.noise-init": True, "pl.noise-data": False}
    assert "also measured: the baseline of pl" in p.text() and "pl.noise-data" in p.text()


def test_without_pairs_sigma_d_is_assumed_and_said(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    path = tmp_path / "lone.csv"
    path.write_text("name,test_loss\nbaseline,3.70\nbaseline,3.72\nbaseline,3.69\nx,3.68\nx,3.66\n")
    api.import_results(path, db=url)
    p = api.plan("lone", effect=0.01, db=url)
    assert not p.sigma_d_measured and p.sigma_d == pytest.approx(p.sigma * math.sqrt(2))
    assert "assumed" in p.sigma_d_from and any("uncorrelated" in n for n in p.notes)
    assert p.paired.n >= p.unpaired.n  # no correlation: pairing only loses degrees of freedom


def test_too_few_baseline_runs_says_how_to_fix_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'results.db'}"
    path = tmp_path / "one.csv"
    path.write_text("name,test_loss,seed\nbaseline,3.70,0\nx,3.68,0\n")
    api.import_results(path, db=url)
    with pytest.raises(ValueError, match=r"1 finished baseline run.*--seeds 2.*orch noise one.*--sigma"):
        api.plan("one", effect=0.01, db=url)
    p = api.plan("one", effect=0.01, sigma=0.01, db=url)
    assert p.paired.n == power.seeds_paired(0.01, 0.01 * math.sqrt(2), 0.8, 0.05)
    assert p.now[0].power is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(effect=0), "--effect must be a positive"),
        (dict(effect=-0.01), "--effect must be a positive"),
        (dict(effect=math.nan), "--effect must be a positive"),
        (dict(effect=0.01, power=1.0), "--power must be between 0 and 1"),
        (dict(effect=0.01, power=0), "--power must be between 0 and 1"),
        (dict(effect=0.01, alpha=1.5), "--alpha must be between 0 and 1"),
        (dict(effect=0.01, sigma=0), "--sigma must be a positive"),
        (dict(effect=0.01, correction="bonferroni"), "--correction must be holm, bh or none"),
    ],
)
def test_bad_input_is_refused_with_the_fix(tmp_path, kwargs, message):
    url = imported(tmp_path)
    with pytest.raises(ValueError, match=message):
        api.plan("imp", db=url, **kwargs)


def test_unknown_experiment_names_the_known_ones(tmp_path):
    url = imported(tmp_path)
    with pytest.raises(ValueError, match="no experiment named 'nope'; known: imp"):
        api.plan("nope", effect=0.01, db=url)


# ---------------------------------------------------------------------------------------------------------
# The CLI.


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def one_error_line(result, expect: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr


def test_cli_plan_text_and_json(tmp_path):
    url = imported(tmp_path)
    out = invoke(["plan", "imp", "--effect", "0.01", "--db", url])
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plan for imp: detect a true improvement of 0.01 nats with 80% power")
    assert lines[1].startswith("σ ") and "baseline of imp (5 finished runs)" in lines[1]
    assert lines[2].startswith("σ_d ") and "pooled over a, b" in lines[2]
    assert "per arm = α 0.05 / 3 interventions (holm" in out.stdout
    p = api.plan("imp", effect=0.01, db=url)
    assert f"seeds per arm: {p.paired.n} paired" in out.stdout and f"· {p.unpaired.n} unpaired" in out.stdout
    assert "power now for 0.01: " in out.stdout and "(paired, 5 seeds shared with the baseline: a)" in out.stdout
    out = invoke(["plan", "imp", "--effect", "0.01", "--correction", "bh", "--format", "json", "--db", url])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["paired"]["n"] == p.paired.n and data["unpaired"]["n"] == p.unpaired.n
    assert data["sigma"] == pytest.approx(p.sigma) and data["correction"] == "bh" and data["m"] == 3
    assert {a["arm"] for a in data["now"]} == {"a", "b", "c"}


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--effect", "0"], "--effect must be a positive"),
        (["--effect", "0.01", "--power", "1.2"], "--power must be between 0 and 1"),
        (["--effect", "0.01", "--alpha", "0"], "--alpha must be between 0 and 1"),
        (["--effect", "0.01", "--correction", "sidak"], "--correction must be holm, bh or none"),
        (["--effect", "0.01", "--sigma", "-1"], "--sigma must be a positive"),
        (["--effect", "0.01", "--format", "yaml"], "--format must be text or json"),
        ([], "--effect"),
        (["--effect", "small"], "--effect"),
    ],
)
def test_cli_plan_bad_input_is_one_line(tmp_path, args, expect):
    url = imported(tmp_path)
    one_error_line(invoke(["plan", "imp", *args, "--db", url]), expect)


def test_cli_plan_unknown_experiment_and_too_few_runs_are_one_line(tmp_path):
    url = imported(tmp_path)
    one_error_line(invoke(["plan", "nope", "--effect", "0.01", "--db", url]), "no experiment named 'nope'")
    path = tmp_path / "one.csv"
    path.write_text("name,test_loss,seed\nbaseline,3.70,0\nx,3.68,0\n")
    api.import_results(path, db=url)
    one_error_line(invoke(["plan", "one", "--effect", "0.01", "--db", url]), "or pass --sigma")


def test_the_installed_entry_point_prints_the_plan(tmp_path):
    url = imported(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "imp", "--effect", "0.02", "--format", "json", "--db", url],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["paired"]["n"] == api.plan("imp", effect=0.02, db=url).paired.n


# ---------------------------------------------------------------------------------------------------------
# orch submit --seeds auto.

TRUTH = {"baseline": 3.70, "clip": 3.69, "nodrop": 3.68}


def experiment_file(tmp_path, seeds: int = 3, name: str = "pl") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(
        "from orchestrator.specs import Experiment, Intervention\n"
        f"experiment = Experiment(name={name!r}, seeds={seeds}, interventions=[\n"
        "    Intervention(name='clip', set={'optim.grad_clip': 0.5}),\n"
        "    Intervention(name='nodrop', set={'model.dropout': 0.0}),\n"
        "])\n"
    )
    return str(path)


def finish_all(eng) -> None:
    """Claim every queued run and finish it: truth + the seed's luck (shared by the arms) + its own noise."""
    arm_of = {r.id: arm for _, arm, r in queries.runs_of(eng)}
    while batch := queue.claim(eng, "sim", 50):
        for r in batch:
            luck = np.random.default_rng([r.seed, r.data_seed, r.repeat, 1]).normal(0, 0.02)
            own = np.random.default_rng([r.seed, r.data_seed, r.repeat, len(arm_of[r.id])]).normal(0, 0.004)
            loss = TRUTH[arm_of[r.id]] + luck + own
            queue.finish(eng, r.id, "sim", "succeeded", result={"test_loss": loss, "step": 1, "status": "succeeded"})


def seeds_per_arm(url: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, arm, _ in queries.runs_of(connect(url), ["pl"]):
        out[arm] = out.get(arm, 0) + 1
    return out


@pytest.fixture
def measured(tmp_path):
    """pl.py submitted with 3 seeds (`--seeds 3`, as before) and its runs finished."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    path = experiment_file(tmp_path, seeds=1)
    out = invoke(["submit", path, "--seeds", "3", "--no-check-data", "--db", url])
    assert out.exit_code == 0 and "pl: 9 queued, 0 reused" in out.stdout, out.output
    assert "seeds auto" not in out.stdout and seeds_per_arm(url) == {"baseline": 3, "clip": 3, "nodrop": 3}
    finish_all(connect(url))
    return path, url


def test_submit_seeds_auto_queues_the_paired_count(measured):
    path, url = measured
    want = api.plan("pl", effect=0.004, db=url)
    assert want.sigma_d_measured and 3 < want.paired.n < 50
    dry = invoke(["submit", path, "--seeds", "auto", "--effect", "0.004", "--no-check-data", "--dry-run", "--db", url])
    assert dry.exit_code == 0, dry.output
    first = dry.stdout.splitlines()[0]
    assert first.startswith(f"seeds auto: {want.paired.n} per arm (paired design, σ_d {want.sigma_d:.4g} std of")
    assert "effect 0.004, power 0.8, level 0.025: α 0.05 / 2 interventions, holm)" in first
    # Counted as the submit below counts: the 9 measured runs are reused, the rest queued.
    lines = dry.stdout.splitlines()
    assert sum(x.startswith("would queue ") for x in lines) == 3 * (want.paired.n - 3)
    assert sum(x.startswith("would reuse ") for x in lines) == 9
    assert seeds_per_arm(url) == {"baseline": 3, "clip": 3, "nodrop": 3}  # a dry run queues nothing
    out = invoke(["submit", path, "--seeds", "auto", "--effect", "0.004", "--no-check-data", "--db", url])
    assert out.exit_code == 0, out.output
    n = want.paired.n
    assert f"pl: {3 * (n - 3)} queued, 9 reused" in out.stdout
    assert seeds_per_arm(url) == {"baseline": n, "clip": n, "nodrop": n}
    # The same from Python; --power and --sigma reach the plan.
    sub = api.submit(path, seeds="auto", effect=0.004, power=0.9, dry_run=True, check_data_here=False, db=url)
    assert sub.plan.target_power == 0.9 and len(sub.runs) == 3 * sub.plan.paired.n
    assert sub.plan.paired.n == api.plan("pl", effect=0.004, power=0.9, db=url).paired.n


def test_submit_seeds_auto_with_sigma_needs_no_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    path = experiment_file(tmp_path)
    out = invoke(
        ["submit", path, "--seeds", "auto", "--effect", "0.01", "--sigma", "0.01", "--dry-run", "--no-check-data"]
        + ["--db", url]
    )
    assert out.exit_code == 0, out.output
    n = power.seeds_paired(0.01, 0.01 * math.sqrt(2), 0.8, 0.05 / 2)
    assert out.stdout.startswith(f"seeds auto: {n} per arm (paired design, σ_d 0.01414 = σ·√2, assumed")
    assert "σ 0.01 given (--sigma)" in out.stdout
    assert sum(x.startswith("would queue ") for x in out.stdout.splitlines()) == 3 * n
    assert not (tmp_path / "fresh.db").exists()


def test_submit_seeds_auto_errors(measured, tmp_path):
    path, url = measured
    before = sqlite3.connect(url.removeprefix("sqlite:///")).execute("SELECT count(*) FROM runs").fetchone()
    base = ["submit", path, "--no-check-data", "--db", url]
    one_error_line(invoke([*base, "--seeds", "auto"]), "--seeds auto needs --effect")
    one_error_line(invoke([*base, "--effect", "0.01"]), "--effect is for --seeds auto only")
    one_error_line(invoke([*base, "--seeds", "3", "--sigma", "0.01"]), "--sigma is for --seeds auto only")
    one_error_line(invoke([*base, "--seeds", "abc"]), "--seeds takes a number of seeds per arm or auto")
    one_error_line(invoke([*base, "--seeds", "0"]), "--seeds must be at least 1")
    one_error_line(invoke([*base, "--seeds", "auto", "--effect", "-1"]), "--effect must be a positive")
    one_error_line(invoke([*base, "--seeds", "auto", "--effect", "0.01", "--power", "2"]), "--power must be")
    one_error_line(invoke([*base, "--seeds", "auto", "--effect", "1e-7"]), "more than 10000 seeds per arm")
    after = sqlite3.connect(url.removeprefix("sqlite:///")).execute("SELECT count(*) FROM runs").fetchone()
    assert after == before
    # An experiment the database has not measured: run seeds first, or give --sigma.
    fresh = experiment_file(tmp_path, name="fresh")
    auto = ["--seeds", "auto", "--effect", "0.01", "--no-check-data"]
    one_error_line(invoke(["submit", fresh, *auto, "--db", url]), f"run `orch submit {fresh} --seeds 2`")
    one_error_line(invoke(["submit", fresh, *auto, "--db", f"{url}x"]), "no database at")
    assert not (tmp_path / "results.dbx").exists()
    api.submit(fresh, seeds=1, check_data_here=False, db=url)
    finish_all(connect(url))
    with pytest.raises(ValueError, match=r"'fresh' has 1 finished baseline run.*--seeds 2.*orch noise fresh.*--sigma"):
        api.submit(fresh, seeds="auto", effect=0.01, check_data_here=False, db=url)

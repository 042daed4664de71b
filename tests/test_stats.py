"""Noise-aware comparison: statistics against scipy, interval coverage, planted effects, more-seeds,
noise studies, stacking and imported results. "Training" here is simulated at the database: runs are
claimed and finished through the real queue with losses drawn from a known model, so the truth is known."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator import (
    imports,
    more_seeds,
    noise,
    power,
    queries,
    queue,
    runspec,
    sequential,
    specs,
    stats,
    submission,
    table_render,
)
from orchestrator import table as tbl
from orchestrator.db import connect


def test_welch_matches_scipy():
    rng = np.random.default_rng(0)
    base, arm = rng.normal(3.70, 0.01, 5), rng.normal(3.68, 0.02, 4)
    c = stats.compare({(i, 0, 0): v for i, v in enumerate(arm)}, {(100 + i, 0, 0): v for i, v in enumerate(base)})
    ref = sps.ttest_ind(base, arm, equal_var=False)
    assert c.test == "welch" and c.p_value == pytest.approx(ref.pvalue)
    assert c.improvement == pytest.approx(base.mean() - arm.mean())
    ci = ref.confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_shared_seeds_are_compared_paired():
    rng = np.random.default_rng(1)
    seed_luck = rng.normal(0, 0.05, 6)  # large per-seed effect shared by both arms
    base = 3.70 + seed_luck + rng.normal(0, 0.002, 6)
    arm = 3.69 + seed_luck + rng.normal(0, 0.002, 6)
    keys = [(s, 0, 0) for s in range(6)]
    c = stats.compare(dict(zip(keys, arm)), dict(zip(keys, base)))
    ref = sps.ttest_rel(base, arm)
    assert c.test == "paired" and c.p_value == pytest.approx(ref.pvalue)
    assert c.verdict == stats.BETTER  # Welch would drown the 0.01 in the 0.05 seed spread
    welch = sps.ttest_ind(base, arm, equal_var=False)
    assert welch.pvalue > 0.05


def test_one_run_is_unverified():
    c = stats.compare({(1, 0, 0): 3.6}, {(1, 0, 0): 3.7, (2, 0, 0): 3.71})
    assert c.verdict == stats.UNVERIFIED and c.improvement == pytest.approx(0.105) and c.p_value is None


def test_intervals_cover_the_true_difference_95_percent_of_the_time():
    rng = np.random.default_rng(2024)
    true_diff, hits, trials = 0.02, 0, 2000
    for _ in range(trials):
        n_a, n_b = rng.integers(3, 7, 2)
        base = rng.normal(3.70, 0.010, n_b)
        arm = rng.normal(3.70 - true_diff, 0.015, n_a)
        c = stats.compare({(1000 + i, 0, 0): v for i, v in enumerate(arm)}, {(i, 0, 0): v for i, v in enumerate(base)})
        hits += c.ci_low <= true_diff <= c.ci_high
    assert 0.93 <= hits / trials <= 0.97


def test_minimum_detectable_effect_has_the_promised_power():
    sigma, n = 0.01, 4
    mde = power.minimum_detectable(sigma, n, n)
    assert power.power_unpaired(mde, sigma, n, n) == pytest.approx(0.8, abs=1e-6)
    # Simulated: a t-test detects an effect of that size about 80% of the time.
    rng = np.random.default_rng(7)
    detected = np.mean(
        [sps.ttest_ind(rng.normal(0, sigma, n), rng.normal(-mde, sigma, n)).pvalue < 0.05 for _ in range(3000)]
    )
    assert 0.76 <= detected <= 0.84
    assert power.minimum_detectable(sigma, 8, 8) < mde  # more seeds, finer resolution


def test_sequential_looks_keep_the_false_positive_rate_at_alpha():
    # A null arm, paired with its baseline, looked at after every seed from 2 to 10 and stopped at the first
    # verdict: at p < 0.05 per look that manufactures a verdict in ~19% of studies; at the sequential level,
    # ~5%. Checked with scipy's own ttest_rel per study, on draws independent of the level's calibration.
    level = sequential.sequential_alpha(2, 10, 0.05, paired=True)
    assert 0.005 < level < 0.02
    assert sequential.sequential_alpha(2, 10, 0.05, paired=False) > level  # Welch's df are larger: a milder level
    assert sequential.sequential_alpha(2, 2) == 0.05 and sequential.sequential_alpha(
        5, 20
    ) > sequential.sequential_alpha(2, 20)
    rng = np.random.default_rng(11)
    studies_ = rng.normal(0, 0.01, (2000, 2, 10))  # (study, baseline|arm, seed)
    first_p = np.array([[sps.ttest_rel(b[:n], a[:n]).pvalue for n in range(2, 11)] for b, a in studies_])
    naive, rate = np.mean(first_p.min(1) < 0.05), np.mean(first_p.min(1) < level)
    assert naive > 0.14
    assert 0.035 <= rate <= 0.065


# ---------------------------------------------------------------------------------------------------------
# Studies through the real queue with simulated training.

TRUE_LOSS = {"baseline": 3.70, "effect": 3.66, "null": 3.70}
SIGMA = 0.01
SALT = 0  # the noise draws are a pure function of (run, arm, SALT): the same on every machine


def simulate(eng, loss_of=lambda run, arm: TRUE_LOSS[arm]):
    """Claim every queued run and finish it with loss = truth + a seed-determined normal draw."""
    arm_of = {r.id: arm for _, arm, r in queries.runs_of(eng)}
    while batch := queue.claim(eng, "sim", 50):
        for r in batch:
            noise = np.random.default_rng(
                [r.seed, r.data_seed, r.repeat, zlib.crc32(arm_of[r.id].encode()), SALT]
            ).normal(0, SIGMA)
            loss = loss_of(r, arm_of[r.id]) + noise
            queue.finish(eng, r.id, "sim", "succeeded", result={"test_loss": loss, "step": 1, "status": "succeeded"})


def board(eng, name, alpha=0.05, options=None):
    boards = tbl.build(queries.runs_of(eng), queries.specs(eng), alpha, options)
    [b] = [b for b in boards if b.experiment == name]
    return {r.arm: r for r in b.rows}, b


@pytest.fixture
def eng(tmp_path):
    return connect(f"sqlite:///{tmp_path / 'results.db'}")


def planted(n_seeds: int) -> specs.Experiment:
    return specs.Experiment(
        name="planted",
        seeds=n_seeds,
        interventions=[
            specs.Intervention(name="effect", set={"optim.lr": 2e-3}),
            specs.Intervention(name="null", set={"optim.lr": 5e-4}),
        ],
    )


def test_a_planted_effect_is_found_and_a_null_is_within_noise(eng):
    exp = planted(8)
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng)
    rows, b = board(eng, "planted")
    assert rows["effect"].verdict == stats.BETTER and rows["effect"].test == "paired"
    assert rows["effect"].ci_low <= 0.04 <= rows["effect"].ci_high
    assert rows["null"].verdict == stats.UNDECIDED
    assert b.baseline_sigma == pytest.approx(SIGMA, rel=0.6) and b.detectable is not None
    assert [r.arm for r in b.rows][0] == "effect"  # ranked by mean loss


def test_more_seeds_spends_runs_where_the_answer_is_open_and_stops_when_decided(eng):
    exp = planted(2)
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng)
    rounds = 0
    while True:
        report, reasons, _ = more_seeds.more_seeds(eng, "planted", max_seeds=10)
        if not report.queued:
            break
        assert all(r.arm in ("baseline", "effect", "null") for r in report.queued)
        simulate(eng)
        rounds += 1
        assert rounds < 20
    rows, _ = board(eng, "planted")
    assert rows["effect"].verdict == stats.BETTER and rows["effect"].n < 10  # decided early
    assert rows["null"].verdict == stats.UNDECIDED
    assert "decided" in reasons["effect"]
    # Once decided, a further call queues nothing.
    again, _, _ = more_seeds.more_seeds(eng, "planted", max_seeds=10)
    assert not again.queued
    # The verdicts were sequential tests, and say so; resubmitting the file does not make them fixed-sample.
    _, b = board(eng, "planted")
    # Holm over the 2 arms: the effect, ranked first, is held to α/2, calibrated for the looks.
    assert b.looks == (2, 10) and rows["effect"].level == pytest.approx(sequential.sequential_alpha(2, 10, 0.025))
    assert rows["effect"].p_value < rows["effect"].level and rows["effect"].p_adjusted < 0.05
    assert any(line.startswith("sequential:") for line in table_render.summary(b))
    submission.submit(eng, planted(2), runspec.expand(planted(2)))
    assert board(eng, "planted")[1].looks == (2, 10)


def test_more_seeds_refuses_a_noise_study_and_names_what_to_run(eng):
    exp = planted(2)
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng)
    noise.noise(eng, "planted", 3, "init")
    with pytest.raises(specs.SpecError, match="noise study.*orch noise planted --repeats"):
        more_seeds.more_seeds(eng, "planted.noise-init", max_seeds=6)
    assert queries.specs(eng)["planted.noise-init"].looks is None  # nothing recorded


def test_a_sequential_board_with_one_baseline_run_says_both(eng):
    exp = planted(1)
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng)
    more_seeds.more_seeds(eng, "planted", max_seeds=4)
    lines = table_render.summary(board(eng, "planted")[1])
    assert any(line.startswith("one baseline run") for line in lines)
    assert any(line.startswith("sequential:") for line in lines)


def test_noise_study_varies_one_source_at_a_time(eng):
    exp = specs.Experiment(name="base", seeds=1)
    submission.submit(eng, exp, runspec.expand(exp))
    for vary in noise.VARY:
        rep = noise.noise(eng, "base", 4, vary)
        cfgs = [r.config for r in rep.queued + [r for r, _ in rep.reused]]
        inits = {c.run.seed for c in cfgs}
        datas = {(c.data.order, c.data.seed) for c in cfgs}
        assert len(inits) == (4 if vary in ("init", "both") else 1)
        assert len(datas) == (4 if vary in ("data", "both") else 1)
        if vary == "none":  # identical configs told apart by the repeat number (repeat 0 is the baseline run)
            assert {r.repeat for r in rep.queued + [r for r, _ in rep.reused]} == {0, 1, 2, 3}

    # Simulate: the initialisation matters more than the data order here.
    def loss(run, arm):
        return 3.7 + 0.02 * np.sin(run.seed) + 0.005 * np.sin(run.data_seed + 1) * (run.data_seed > 0)

    simulate(eng, loss)
    _, b = board(eng, "base")
    assert set(b.noise) == set(noise.VARY) and all(v["n"] == 4 for v in b.noise.values())
    md = table_render.render([b], "markdown")
    assert "noise by source" in md and "init σ" in md and "none σ" in md
    with pytest.raises(specs.SpecError, match="--vary must be"):
        noise.noise(eng, "base", 4, "weather")


def test_stacks_show_the_sum_of_their_parts_and_conflicts_name_both(eng):
    exp = specs.Experiment(
        name="stk",
        seeds=3,
        interventions=[
            specs.Intervention(name="a", set={"optim.grad_clip": 1.0}),
            specs.Intervention(name="b", set={"model.dropout": 0.0}),
            specs.Intervention(name="ab", stack=["a", "b"]),
        ],
    )
    runs = runspec.expand(exp)
    ab = next(r for r in runs if r.arm == "ab").config
    assert ab.optim.grad_clip == 1.0 and ab.model.dropout == 0.0
    submission.submit(eng, exp, runs)
    simulate(eng, lambda run, arm: {"baseline": 3.7, "a": 3.69, "b": 3.68, "ab": 3.675}[arm])
    rows, _ = board(eng, "stk")
    assert rows["ab"].parts == ["a", "b"]
    assert rows["ab"].parts_sum == pytest.approx(rows["a"].improvement + rows["b"].improvement)
    bad = specs.Experiment(
        name="x",
        interventions=[
            specs.Intervention(name="lo", set={"optim.lr": 1e-4}),
            specs.Intervention(name="hi", set={"optim.lr": 1e-3}),
            specs.Intervention(name="both", stack=["lo", "hi"]),
        ],
    )
    with pytest.raises(specs.SpecError, match="stacks 'lo' and 'hi', which set optim.lr differently"):
        runspec.expand(bad)
    with pytest.raises(ValueError, match="not another intervention"):
        specs.Experiment(name="y", interventions=[specs.Intervention(name="s", stack=["missing"])])


BLOG = """name,test_loss,stack
weight-tying,3.874305,
wd-cerebras,3.813856,
baseline,3.691526,
fp32,3.678968,
clipping,3.678317,
qkv-bias,3.669385,
wd-0.01,3.642940,
no-dropout,3.641282,
lr-schedule,3.601917,
stacked,3.577761,clipping+no-dropout+lr-schedule+wd-0.01
"""


def test_imported_published_numbers_rank_as_published(eng, tmp_path):
    path = tmp_path / "blog.csv"
    path.write_text(BLOG)
    assert imports.import_results(eng, path, "blog") == 10
    rows, b = board(eng, "blog")
    order = [r.arm for r in b.rows]
    assert order == [
        "stacked",
        "lr-schedule",
        "no-dropout",
        "wd-0.01",
        "qkv-bias",
        "clipping",
        "fp32",
        "baseline",
        "wd-cerebras",
        "weight-tying",
    ]
    published = {
        "weight-tying": -0.183,
        "wd-cerebras": -0.122,
        "fp32": 0.0126,
        "clipping": 0.0132,
        "qkv-bias": 0.0221,
        "wd-0.01": 0.0486,
        "no-dropout": 0.0502,
        "lr-schedule": 0.0896,
        "stacked": 0.1138,
    }
    for arm, imp in published.items():
        assert rows[arm].improvement == pytest.approx(imp, abs=6e-4) and rows[arm].imported
        assert rows[arm].verdict == stats.UNVERIFIED  # one run each: no noise estimate
    assert rows["stacked"].parts_sum == pytest.approx(0.2016, abs=1e-3)  # far above the observed 0.1138
    # With repeated seeds imported, verdicts follow.
    seeded = tmp_path / "seeded.json"
    draws = np.random.default_rng(3).normal(0, 0.002, (3, 5))  # independent noise per arm and seed
    seeded.write_text(
        "["
        + ",".join(
            f'{{"name": "{n}", "test_loss": {v + draws[i, s]}, "seed": {s}}}'
            for s in range(5)
            for i, (n, v) in enumerate((("baseline", 3.6915), ("clipping", 3.6783), ("same", 3.6915)))
        )
        + "]"
    )
    imports.import_results(eng, seeded, "seeded")
    rows, _ = board(eng, "seeded")
    assert rows["clipping"].verdict == stats.BETTER and rows["same"].verdict == stats.UNDECIDED


@pytest.mark.parametrize(
    "content, message",
    [
        ("name,loss\nbaseline,3.7\n", "needs 'name' and 'test_loss'"),
        ("name,test_loss\nbaseline,abc\n", "test_loss must be a finite positive number"),
        ("name,test_loss\nother,3.7\n", "no row named 'baseline'"),
    ],
)
def test_bad_imports_are_clear_and_store_nothing(eng, tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(specs.SpecError, match=message):
        imports.import_results(eng, path, "bad")
    assert queries.counts(eng) == {}


def test_a_more_seeds_decision_is_the_verdict_the_table_then_shows(eng):
    # Every look's decision is printed with the p and the method that `orch table` shows afterwards, even once
    # the baseline has seeds a decided arm lacks (it stays paired on the seeds it shares).
    exp = planted(2)
    submission.submit(eng, exp, runspec.expand(exp))
    simulate(eng)
    for _ in range(12):
        look = more_seeds.more_seeds(eng, "planted", max_seeds=8, options=tbl.Options(sesoi=0.02))
        simulate(eng)
        rows, b = board(eng, "planted", options=tbl.Options(sesoi=0.02))
        for arm, why in look.reasons.items():
            if why.startswith("decided: better") or why.startswith("decided: worse"):
                assert why.startswith(f"decided: {rows[arm].verdict} (p = {rows[arm].p_adjusted:.3g} < 0.05, Holm")
                assert rows[arm].test == "paired" and rows[arm].pairs == rows[arm].n
            if why.startswith("decided: equivalent"):
                assert rows[arm].verdict == stats.EQUIVALENT
        if not look.report.queued:
            break
    assert rows["effect"].verdict == stats.BETTER and rows["effect"].n < rows["baseline"].n
    assert rows["null"].verdict in (stats.EQUIVALENT, stats.UNDECIDED)

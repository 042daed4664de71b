"""The verdicts' promises, checked by simulation against scipy with fixed seeds: a board of many null arms
under Holm, the false discovery rate under Benjamini–Hochberg, the equivalence verdict's error rate at the
margin and its power inside it, the target test's level, the probability of improvement, and the pairing rule
that never switches an arm's test behind a decision already printed.

Each simulation's tolerance is three binomial standard errors of its rate (2,000 boards: ±0.015 at 5%), so a
test fails for a real miscalibration, not for the luck of one seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator import multiplicity, sequential, stats

BOARDS = 2000


def tolerance(rate: float, trials: int = BOARDS) -> float:
    return 3 * math.sqrt(rate * (1 - rate) / trials)


def paired_losses(rng, boards: int, effects: list[float], n: int, sigma=0.01, seed_sd=0.03):
    """`boards` studies of a baseline and one arm per effect on seeds 0…n−1 whose luck every arm shares:
    (baseline (boards, n), arms (boards, arms, n))."""
    luck = rng.normal(0, seed_sd, (boards, 1, n))
    base = 3.7 + luck[:, 0] + rng.normal(0, sigma, (boards, n))
    arms = 3.7 - np.asarray(effects)[None, :, None] + luck + rng.normal(0, sigma, (boards, len(effects), n))
    return base, arms


def measured(base: np.ndarray, arms: np.ndarray) -> dict[str, stats.Measured]:
    """One board through the table's own path (stats.measure), keyed as runs trained here are."""
    keys = [(s, 0, 0) for s in range(base.shape[-1])]
    baseline = dict(zip(keys, base))
    return {f"arm{i}": stats.measure(dict(zip(keys, a)), baseline) for i, a in enumerate(arms)}


def decided(judged: dict) -> set[str]:
    return {arm for arm, (c, _) in judged.items() if c.verdict in (stats.BETTER, stats.WORSE)}


# The simulations compute each arm's p-value for all boards at once with scipy (a board at a time through
# stats.measure costs ~2 ms per arm in scipy's overhead), then judge every board with multiplicity.correct;
# the first SAME boards go through stats.measure and multiplicity.judge too, which must agree exactly.
SAME = 40


def test_holm_keeps_a_board_of_ten_null_arms_from_any_false_verdict():
    rng = np.random.default_rng(101)
    base, arms = paired_losses(rng, BOARDS, [0.0] * 10, n=3)
    p = sps.ttest_rel(base[:, None, :], arms, axis=-1).pvalue
    any_false = {
        c: np.mean([min(multiplicity.correct(list(row), 0.05, c).adjusted) < 0.05 for row in p])
        for c in ("holm", "none")
    }
    for b in range(SAME):
        judged = multiplicity.judge(measured(base[b], arms[b]), 0.05, "holm")
        adjusted = multiplicity.correct(list(p[b]), 0.05, "holm").adjusted
        assert [judged[f"arm{i}"][1] for i in range(10)] == pytest.approx(adjusted, rel=1e-9)
        assert bool(decided(judged)) == (min(adjusted) < 0.05)
    assert any_false["holm"] <= 0.05 + tolerance(0.05)
    # Uncorrected, the same boards call some null arm better or worse far more often: the test can fail.
    assert any_false["none"] > 0.25


def test_holm_levels_and_adjusted_p_agree_with_the_step_down_procedure():
    p = [0.01, 0.04, 0.03, 0.005]
    c = multiplicity.correct(p, 0.05, "holm")
    # Sorted: 0.005 (×4 = 0.02), 0.01 (×3 = 0.03), 0.03 (×2 = 0.06), 0.04 (×1, but never below 0.06).
    assert c.adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # The first two are decided at α/4 and α/3; the third fails at α/2, and the last is held to that level.
    assert c.levels == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])
    assert all((a < 0.05) == (x < lvl) for a, x, lvl in zip(c.adjusted, p, c.levels))
    bh = multiplicity.correct(p, 0.05, "bh")
    assert bh.adjusted == pytest.approx(list(sps.false_discovery_control(p, method="bh")))
    assert all((a < 0.05) == (x < lvl) for a, x, lvl in zip(bh.adjusted, p, bh.levels))
    with pytest.raises(ValueError, match="--correction must be one of holm, bh, none"):
        multiplicity.correct(p, 0.05, "bonferroni")


def test_benjamini_hochberg_keeps_the_false_discovery_rate_at_alpha():
    rng = np.random.default_rng(202)
    base, arms = paired_losses(rng, BOARDS, [0.0] * 7 + [0.04] * 3, n=4)
    p = sps.ttest_rel(base[:, None, :], arms, axis=-1).pvalue
    shares, found = [], 0
    for b, row in enumerate(p):
        got = np.asarray(multiplicity.correct(list(row), 0.05, "bh").adjusted) < 0.05
        if b < SAME:
            assert decided(multiplicity.judge(measured(base[b], arms[b]), 0.05, "bh")) == {
                f"arm{i}" for i in np.flatnonzero(got)
            }
        shares.append(got[:7].sum() / got.sum() if got.any() else 0.0)
        found += got[7:].sum()
    assert np.mean(shares) <= 0.05 + 3 * np.std(shares) / math.sqrt(BOARDS)
    assert found / (3 * BOARDS) > 0.3  # and it finds the real effects


def test_sequential_looks_combined_with_holm_keep_the_board_at_alpha():
    # Five null arms looked at after every seed from 2 to 6, each board stopped at its first decision, with
    # the p-values calibrated for the looks (sequential.sequential_p) and Holm across the arms.
    rng = np.random.default_rng(303)
    looks = (2, 6)
    base, arms = paired_losses(rng, BOARDS, [0.0] * 5, n=looks[1])
    stopped = np.zeros(BOARDS, dtype=bool)
    for n in range(looks[0], looks[1] + 1):
        p = sps.ttest_rel(base[:, None, :n], arms[..., :n], axis=-1).pvalue
        for b in np.flatnonzero(~stopped):
            calibrated = [sequential.sequential_p(*looks, x) for x in p[b]]
            stopped[b] = min(multiplicity.correct(calibrated, 0.05, "holm").adjusted) < 0.05
            if b < SAME:
                judged = multiplicity.judge(measured(base[b, :n], arms[b, :, :n]), 0.05, "holm", looks)
                assert bool(decided(judged)) == stopped[b]
    assert stopped.mean() <= 0.05 + tolerance(0.05)


def test_sequential_p_is_the_chance_of_so_small_a_p_at_any_look():
    level = sequential.sequential_alpha(2, 10, 0.05)
    assert sequential.sequential_p(2, 10, level) == pytest.approx(0.05, abs=2e-3)
    assert sequential.sequential_p(2, 2, 0.03) == 0.03  # one look: the p-value itself
    assert sequential.sequential_p(2, 10, 0.2) > 0.2  # looking again makes a small p less surprising


def test_tost_matches_the_two_one_sided_t_tests_by_hand():
    rng = np.random.default_rng(5)
    keys = [(s, 0, 0) for s in range(6)]
    base, arm = 3.7 + rng.normal(0, 0.01, 6), 3.701 + rng.normal(0, 0.01, 6)
    m = stats.measure(dict(zip(keys, arm)), dict(zip(keys, base)))
    d = base - arm
    se = d.std(ddof=1) / math.sqrt(6)
    by_hand = max(sps.t.sf((d.mean() + 0.02) / se, 5), sps.t.cdf((d.mean() - 0.02) / se, 5))
    assert stats.tost(m, 0.02) == pytest.approx(by_hand, rel=1e-10)
    welch = stats.measure({(100 + i, 0, 0): v for i, v in enumerate(arm)}, dict(zip(keys, base)))
    va, vb = arm.var(ddof=1) / 6, base.var(ddof=1) / 6
    df = (va + vb) ** 2 / (va**2 / 5 + vb**2 / 5)
    se = math.sqrt(va + vb)
    diff = base.mean() - arm.mean()
    by_hand = max(sps.t.sf((diff + 0.02) / se, df), sps.t.cdf((diff - 0.02) / se, df))
    assert welch.test == "welch" and stats.tost(welch, 0.02) == pytest.approx(by_hand, rel=1e-9)


@pytest.mark.parametrize("test", ["paired", "welch"])
def test_equivalence_at_the_margin_is_claimed_at_most_alpha_of_the_time(test):
    # A true improvement of exactly δ is not "no effect beyond δ": the verdict may say equivalent at most
    # α of the time (TOST is conservative at small n). Inside the margin it should say so often.
    rng = np.random.default_rng(404 if test == "paired" else 405)
    delta, sigma, n = 0.01, 0.005, 8
    rates = {}
    for effect in (delta, 0.0):
        base, arm = rng.normal(3.7, sigma, (BOARDS, n)), rng.normal(3.7 - effect, sigma, (BOARDS, n))
        if test == "paired":
            low = sps.ttest_rel(base + delta, arm, axis=-1, alternative="greater").pvalue
            high = sps.ttest_rel(base - delta, arm, axis=-1, alternative="less").pvalue
        else:
            low = sps.ttest_ind(base + delta, arm, axis=-1, equal_var=False, alternative="greater").pvalue
            high = sps.ttest_ind(base - delta, arm, axis=-1, equal_var=False, alternative="less").pvalue
        p_eq = np.maximum(low, high)
        for b in range(SAME):
            arm_keys = [(s, 0, 0) for s in range(n)] if test == "paired" else [(100 + s, 0, 0) for s in range(n)]
            m = stats.measure(dict(zip(arm_keys, arm[b])), {(s, 0, 0): v for s, v in enumerate(base[b])})
            c = stats.decide(m, 0.05, delta)
            assert m.test == test and c.p_equivalence == pytest.approx(p_eq[b], rel=1e-9)
            assert (c.verdict == stats.EQUIVALENT) == (p_eq[b] < 0.05 and c.p_value >= 0.05)
        rates[effect] = np.mean(p_eq < 0.05)
    assert rates[delta] <= 0.05 + tolerance(0.05)
    assert rates[0.0] > 0.5


def test_intervals_at_each_arms_level_cover_the_truth():
    # Coverage of the intervals a Holm board prints, paired on seeds whose luck both arms share: each arm's
    # interval is at its own level, between 1 − α/m and 1 − α, so it covers the true improvement ≥ 95% of
    # the time.
    rng = np.random.default_rng(606)
    effects, n = [0.0, 0.01, 0.03], 4
    base, arms = paired_losses(rng, BOARDS, effects, n=n)
    d = base[:, None, :] - arms
    est, se = d.mean(-1), d.std(-1, ddof=1) / math.sqrt(n)
    p = sps.ttest_rel(base[:, None, :], arms, axis=-1).pvalue
    levels = np.array([multiplicity.correct(list(row), 0.05, "holm").levels for row in p])
    half = sps.t.ppf(1 - levels / 2, n - 1) * se
    for b in range(SAME):
        judged = multiplicity.judge(measured(base[b], arms[b]), 0.05, "holm")
        for i in range(len(effects)):
            c, _ = judged[f"arm{i}"]
            assert (c.ci_low, c.ci_high) == (
                pytest.approx(est[b, i] - half[b, i]),
                pytest.approx(est[b, i] + half[b, i]),
            )
    covered = np.mean(np.abs(est - np.asarray(effects)) <= half, axis=0)
    assert np.all(covered >= 0.95 - tolerance(0.05))


def test_the_target_test_is_one_sided_at_its_level():
    rng = np.random.default_rng(707)
    values = rng.normal(3.27, 0.01, 5)
    t = (values.mean() - 3.28) / (values.std(ddof=1) / math.sqrt(5))
    assert stats.below_target(list(values), 3.28) == pytest.approx(sps.t.cdf(t, 4), rel=1e-10)
    assert stats.below_target([3.2], 3.28) is None  # one run: no test
    # An arm whose true mean is the target is called below it at most 1% of the time.
    calls = sum(stats.below_target(list(rng.normal(3.28, 0.01, 5)), 3.28) < 0.01 for _ in range(BOARDS))
    assert calls / BOARDS <= 0.01 + tolerance(0.01)


def test_probability_of_improvement_counts_the_run_pairs_and_brackets_the_truth():
    base, arm = [3.70, 3.72, 3.69], [3.68, 3.71, 3.70, 3.66]
    pairs = [(b > a) + 0.5 * (b == a) for b in base for a in arm]
    est, low, high = stats.probability_of_improvement(arm, base)
    assert est == pytest.approx(np.mean(pairs)) and low <= est <= high
    assert stats.probability_of_improvement(arm, []) is None
    # With many runs it approaches the normal model's Φ(Δ / (σ√2)), inside its bootstrap interval.
    rng = np.random.default_rng(808)
    b, a = rng.normal(3.70, 0.01, 200), rng.normal(3.69, 0.01, 200)
    est, low, high = stats.probability_of_improvement(list(a), list(b))
    truth = sps.norm.cdf(0.01 / (0.01 * math.sqrt(2)))
    assert low <= truth <= high and high - low < 0.15


def test_a_baseline_seed_added_later_does_not_switch_an_arms_test():
    # The demo's case: arms paired on seeds 0 and 1 decide; more-seeds then adds seed 2 to the baseline (for
    # another arm). The decided arm keeps its paired test on the two seeds it shares — with the same p.
    keys = [(s, 0, 0) for s in range(3)]
    base = dict(zip(keys, [3.70, 3.75, 3.72]))
    arm = dict(zip(keys[:2], [3.68, 3.731]))
    before = stats.measure(arm, {k: base[k] for k in keys[:2]})
    after = stats.measure(arm, base)
    assert before.test == after.test == "paired" and after.pairs == 2
    assert after.p_value == before.p_value == pytest.approx(sps.ttest_rel([3.70, 3.75], [3.68, 3.731]).pvalue)
    # Nothing shared: Welch on all runs, as scipy computes it.
    other = {(s + 10, 0, 0): v for s, v in enumerate([3.68, 3.71, 3.69])}
    w = stats.measure(other, base)
    assert w.test == "welch" and w.pairs == 0
    assert w.p_value == pytest.approx(sps.ttest_ind(list(base.values()), [3.68, 3.71, 3.69], equal_var=False).pvalue)

"""Is an intervention's improvement signal or noise? Every number here comes from scipy / numpy.

An improvement is baseline mean − arm mean of the test loss (positive = lower loss = better), as in the
blog series' table. With at least two runs on each side it gets a confidence interval and a p-value:
- paired t-test (scipy.stats.ttest_rel) when arm and baseline ran the same seeds (seed, data seed, repeat):
  a seed's luck is shared by both sides and cancels in the difference;
- otherwise Welch's t-test (scipy.stats.ttest_ind, equal_var=False), which assumes no common variance.
The verdict is "better" / "worse" when p < α, else "within noise"; with a single run on either side there is
no variance to test against, and the verdict is "unverified" (the series' single runs per intervention).

Adding seeds until a verdict appears (`orch more-seeds`) tests the same arm again and again; at p < 0.05 on
every look, a null intervention from 2 to 10 seeds is called better or worse about 19% of the time, not 5%.
An experiment grown that way is therefore tested at the sequential level of `sequential_alpha`: one nominal
level for every look (Pocock's constant boundary), calibrated so that the chance of any look deciding a null
arm stays α.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, stats

Key = tuple  # (seed, data_seed, repeat): which runs pair up
BETTER, WORSE, NOISE, UNVERIFIED, BASELINE = "better", "worse", "within noise", "unverified", "baseline"
FUTILITY_MIN_RUNS = 3  # more_seeds never calls an arm hopeless on fewer runs per side than this


@dataclass
class Comparison:
    n: int
    mean: float
    std: float | None
    improvement: float | None  # baseline mean − arm mean
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    test: str | None  # "paired" | "welch" | None
    verdict: str
    level: float = 0.05  # the p-value a verdict needs (α, or the sequential level); the CI is at 1 − level


def describe(values: list[float]) -> tuple[int, float, float | None]:
    arr = np.asarray(values, dtype=float)
    return len(arr), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def compare(
    arm: dict[Key, float], baseline: dict[Key, float], alpha: float = 0.05, looks: tuple[int, int] | None = None
) -> Comparison:
    """Compare one arm's test losses with the baseline's, each keyed by (seed, data seed, repeat).

    `looks` = (first, last): the verdict was looked at after every run added from `first` to `last` runs per
    side (`orch more-seeds`), so it is tested at `sequential_alpha` for that test instead of α.
    """
    n, mean, std = describe(list(arm.values()))
    if not baseline:
        return Comparison(n, mean, std, None, None, None, None, None, UNVERIFIED, alpha)
    b = np.asarray(list(baseline.values()), dtype=float)
    improvement = float(b.mean() - mean)
    if n < 2 or len(b) < 2:
        return Comparison(n, mean, std, improvement, None, None, None, None, UNVERIFIED, alpha)
    shared = sorted(set(arm) & set(baseline), key=repr)
    paired = len(shared) >= 2 and len(shared) == len(arm) == len(baseline)
    test = "paired" if paired else "welch"
    level = sequential_alpha(looks[0], looks[1], alpha, paired) if looks else alpha
    if paired:
        base_vals = np.array([baseline[k] for k in shared])
        arm_vals = np.array([arm[k] for k in shared])
        if np.all(base_vals - arm_vals == base_vals[0] - arm_vals[0]):  # no spread in the differences
            return _degenerate(n, mean, std, improvement, test, level)
        result = stats.ttest_rel(base_vals, arm_vals)
    else:
        a = np.asarray(list(arm.values()), dtype=float)
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            return _degenerate(n, mean, std, improvement, test, level)
        result = stats.ttest_ind(b, a, equal_var=False)
    ci = result.confidence_interval(confidence_level=1 - level)
    p = float(result.pvalue)
    verdict = (BETTER if improvement > 0 else WORSE) if p < level else NOISE
    return Comparison(n, mean, std, improvement, float(ci.low), float(ci.high), p, test, verdict, level)


@lru_cache(maxsize=64)
def sequential_alpha(first: int, last: int, alpha: float = 0.05, paired: bool = True) -> float:
    """The p-value a verdict needs when it is looked at after every added run, from `first` to `last` runs
    per side, and a study stops at the first look that decides: the level at which a null arm is decided at
    any look with probability α (Pocock's constant boundary, for the t-tests actually used).

    The level is the α-quantile of the smallest p-value over the looks, read off 100,000 simulated null
    studies on standard normal losses, with a fixed generator seed so that a table never changes between two
    reads. Paired: the one-sample t-test of ttest_rel on the differences, whose smallest p is pivotal (it
    does not depend on σ), so the level is exact. Welch: ttest_ind(equal_var=False) on equal variances, an
    approximation: with the baseline's variance 2× or 4× the arm's, a null arm is decided ~6% or ~7% of the
    time instead of 5%. Looking less often than every run only lowers the rate. 2…10 runs, paired: 0.0099.
    """
    first = max(first, 2)  # no verdict before two runs per side
    if last <= first:
        return alpha
    rng = np.random.default_rng(20261121)
    n = np.arange(1, last + 1)
    looks = slice(first - 1, last)
    min_p = []
    for _ in range(4):  # 4 × 25,000 studies: bounded memory for a large `last`
        # Running moments give every look's t statistic in one pass; scipy's ttest on each prefix would
        # re-read all runs at every look (quadratic in `last`). tests/test_stats.py checks the result
        # against scipy's ttest_rel study by study.
        a = _running(rng.standard_normal((25_000, last)), n)
        if paired:
            t, df = a[0] / np.sqrt(a[1] / n), n - 1
        else:
            b = _running(rng.standard_normal((25_000, last)), n)
            se2_a, se2_b = a[1] / n, b[1] / n
            t = (a[0] - b[0]) / np.sqrt(se2_a + se2_b)
            df = (se2_a + se2_b) ** 2 / (se2_a**2 / (n - 1) + se2_b**2 / (n - 1))  # Welch–Satterthwaite
        with np.errstate(divide="ignore", invalid="ignore"):
            p = 2 * stats.t.sf(np.abs(t[:, looks]), df[..., looks])
        min_p.append(np.nanmin(p, axis=1))
    return float(np.quantile(np.concatenate(min_p), alpha))


def _running(x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample variance (ddof 1) of every prefix x[:, :k], along axis 1."""
    mean = np.cumsum(x, axis=1) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (np.cumsum(x * x, axis=1) - n * mean**2) / (n - 1)
    return mean, var


def _degenerate(n, mean, std, improvement, test, level) -> Comparison:
    # Every run on both sides identical (deterministic CPU repeats): there is no noise to test against.
    verdict = NOISE if improvement == 0 else (BETTER if improvement > 0 else WORSE)
    return Comparison(
        n, mean, std, improvement, improvement, improvement, 0.0 if improvement else 1.0, test, verdict, level
    )


def _power_at(ncp: float, df: int, alpha: float) -> float:
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    p = float(stats.nct.sf(t_crit, df, ncp) + stats.nct.cdf(-t_crit, df, ncp))
    # scipy's noncentral t returns NaN far in the tail (ncp ≳ 10), where the power has long reached 1.
    return 1.0 if math.isnan(p) else p


def power(effect: float, sigma: float, n_arm: int, n_base: int, alpha: float = 0.05) -> float:
    """Probability that a two-sample t-test at level α detects a true improvement `effect` (noncentral t)."""
    return _power_at(effect / (sigma * math.sqrt(1 / n_arm + 1 / n_base)), n_arm + n_base - 2, alpha)


def minimum_detectable(
    sigma: float, n_arm: int, n_base: int, alpha: float = 0.05, target_power: float = 0.8
) -> float | None:
    """The smallest true improvement detected with `target_power` at these run counts and this σ."""
    if sigma is None or sigma <= 0 or n_arm < 2 or n_base < 2:
        return None
    df = n_arm + n_base - 2
    # Solve in units of the standard error, where the answer lies in a small bracket for any σ.
    ncp = optimize.brentq(lambda x: _power_at(x, df, alpha) - target_power, 0.0, 50.0)
    return float(ncp * sigma * math.sqrt(1 / n_arm + 1 / n_base))


def could_decide(c: Comparison, max_runs: int) -> bool:
    """Could more seeds (up to max_runs per side) still move this arm out of "within noise"?

    Yes when the interval with max_runs per side — the observed standard error shrunk as 1/√n, with the
    t quantile of the test actually used (paired: n − 1 degrees of freedom; Welch: about 2n − 2) at the
    comparison's own level — would be narrower than the observed improvement, so that it could exclude zero.
    An arm with one run always could, and so could one with fewer than FUTILITY_MIN_RUNS: a spread measured
    on two runs (one degree of freedom when paired) is too uncertain to give up on an arm.
    """
    if c.verdict not in (NOISE, UNVERIFIED):
        return False
    if c.n >= max_runs:
        return False
    if c.verdict == UNVERIFIED or c.ci_low is None or c.n < FUTILITY_MIN_RUNS:
        return True

    def df(n: int) -> int:
        return n - 1 if c.test == "paired" else 2 * n - 2

    q = 1 - c.level / 2
    se_now = (c.ci_high - c.ci_low) / 2 / stats.t.ppf(q, df(c.n))
    half_max = se_now * math.sqrt(c.n / max_runs) * stats.t.ppf(q, df(max_runs))
    return abs(c.improvement) > half_max

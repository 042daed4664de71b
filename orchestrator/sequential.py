"""Looking again and again: the level a verdict needs when `orch more-seeds` looked after every added run.

Adding seeds until a verdict appears tests the same arm again and again; at p < 0.05 on every look, a null
intervention from 2 to 10 seeds is called better or worse about 19% of the time, not 5%. An experiment grown
that way is therefore tested at one nominal level for every look (Pocock's constant boundary), calibrated so
that the chance of any look deciding a null arm stays α.

Both numbers come from one simulated null distribution of the smallest p-value over the looks, per
(first look, last look, test): `sequential_alpha` is its α-quantile (the raw p a verdict needs), and
`sequential_p` is its distribution function at an observed p (the chance that a null arm shows a p-value this
small at some look: a p-value on the scale of a single test, which multiplicity.py corrects across arms).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import stats

SIMULATED_STUDIES = 100_000  # the level's simulation error: ±0.0007 at α = 0.05 (binomial, 1 σ)
GENERATOR_SEED = 20261121  # fixed: a table never changes between two reads


@lru_cache(maxsize=64)
def null_min_p(first: int, last: int, paired: bool = True) -> np.ndarray:
    """The smallest two-sided p-value over looks after every run from `first` to `last` runs per side, for
    SIMULATED_STUDIES null studies on standard normal losses, sorted.

    Paired: the one-sample t-test of ttest_rel on the differences, whose smallest p is pivotal (it does not
    depend on σ), so the calibration is exact up to simulation error. Welch: ttest_ind(equal_var=False) on
    equal variances, an approximation: with the baseline's variance 2× or 4× the arm's, a null arm is decided
    ~6% or ~7% of the time instead of 5%. Looking less often than every run only lowers the rate."""
    rng = np.random.default_rng(GENERATOR_SEED)
    n = np.arange(1, last + 1)
    looks = slice(first - 1, last)
    min_p = []
    for _ in range(4):  # 4 × 25,000 studies: bounded memory for a large `last`
        # Running moments give every look's t statistic in one pass; scipy's ttest on each prefix would
        # re-read all runs at every look (quadratic in `last`). tests/test_stats.py checks the result
        # against scipy's ttest_rel study by study.
        a = _running(rng.standard_normal((SIMULATED_STUDIES // 4, last)), n)
        if paired:
            t, df = a[0] / np.sqrt(a[1] / n), n - 1
        else:
            b = _running(rng.standard_normal((SIMULATED_STUDIES // 4, last)), n)
            se2_a, se2_b = a[1] / n, b[1] / n
            t = (a[0] - b[0]) / np.sqrt(se2_a + se2_b)
            df = (se2_a + se2_b) ** 2 / (se2_a**2 / (n - 1) + se2_b**2 / (n - 1))  # Welch–Satterthwaite
        with np.errstate(divide="ignore", invalid="ignore"):
            p = 2 * stats.t.sf(np.abs(t[:, looks]), df[..., looks])
        min_p.append(np.nanmin(p, axis=1))
    return np.sort(np.concatenate(min_p))


def sequential_alpha(first: int, last: int, alpha: float = 0.05, paired: bool = True) -> float:
    """The p-value a verdict needs when it is looked at after every added run, from `first` to `last` runs
    per side, and a study stops at the first look that decides: the level at which a null arm is decided at
    any look with probability α. 2…10 runs, paired, α = 0.05: 0.0099."""
    first = max(first, 2)  # no verdict before two runs per side
    if last <= first:
        return alpha
    return float(np.quantile(null_min_p(first, last, paired), alpha))


def sequential_p(first: int, last: int, p: float, paired: bool = True) -> float:
    """The chance that a null arm shows a p-value ≤ `p` at some look from `first` to `last` runs: the
    observed p calibrated for the looks (p itself where there were no repeated looks). Never below one in
    SIMULATED_STUDIES + 1, the resolution of the simulation."""
    first = max(first, 2)
    if last <= first:
        return p
    sample = null_min_p(first, last, paired)
    return float((np.searchsorted(sample, p, side="right") + 1) / (len(sample) + 1))


def _running(x: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample variance (ddof 1) of every prefix x[:, :k], along axis 1."""
    mean = np.cumsum(x, axis=1) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (np.cumsum(x * x, axis=1) - n * mean**2) / (n - 1)
    return mean, var

"""Power and sample size of the table's t-tests: the chance that a true improvement is detected, the seeds it
takes (`orch plan`), and the smallest improvement the current run counts would detect (above each table).

For a true improvement δ (test-loss nats: baseline mean − arm mean) at the two-sided level α':
- paired (every arm on the same seeds; scipy's ttest_rel, the one-sample t-test on the n differences of std
  σ_d): T ~ noncentral t(df = n − 1, ncp = δ·√n / σ_d);
- unpaired (the two-sample test, n_a and n_b runs of std σ): T ~ noncentral t(df = n_a + n_b − 2,
  ncp = δ / (σ·√(1/n_a + 1/n_b))).
power = P(T > t) + P(T < −t), t the 1 − α'/2 quantile of the central t with the same df, from scipy.stats.nct:
exact for normally distributed losses (Owen 1965; Cohen 1988, ch. 2), where the normal approximation
undercounts at the few seeds pre-training can afford (δ/σ_d = 1, α' = 0.05, 80%: 8 instead of 10 paired).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy import optimize, stats

MAX_N = 10_000  # seeds per arm: beyond this, "more than 10000"


def _power(ncp: float, df: float, level: float) -> float:
    """Two-sided power of a t-test at `level` whose statistic is noncentral t(df, ncp), ncp ≥ 0."""
    if math.isinf(ncp):
        return 1.0
    t = stats.t.ppf(1 - level / 2, df)
    upper = float(stats.nct.sf(t, df, ncp))
    lower = float(stats.nct.cdf(-t, df, ncp))
    # scipy returns NaN for the lower tail far out (ncp ≳ 7); it is below P(T < 0) = Φ(−ncp) < 1e-11 there.
    return upper + (0.0 if math.isnan(lower) else lower)


def power_paired(effect: float, sigma_d: float, n: int, level: float = 0.05) -> float:
    """Power of the paired t-test (ttest_rel) on n pairs whose differences have std σ_d."""
    ncp = math.inf if sigma_d == 0 else abs(effect) * math.sqrt(n) / sigma_d
    return _power(ncp, n - 1, level)


def power_unpaired(effect: float, sigma: float, n_arm: int, n_base: int | None = None, level: float = 0.05) -> float:
    """Power of the two-sample t-test with n_arm and n_base runs (default: n_arm) of std σ each."""
    n_base = n_arm if n_base is None else n_base
    se = sigma * math.sqrt(1 / n_arm + 1 / n_base)
    return _power(math.inf if se == 0 else abs(effect) / se, n_arm + n_base - 2, level)


def smallest_n(power_at: Callable[[int], float], target: float, max_n: int = MAX_N) -> int | None:
    """The smallest n in [2, max_n] with power_at(n) ≥ target (power grows with n), or None beyond max_n."""
    if power_at(2) >= target:
        return 2
    if power_at(max_n) < target:
        return None
    low, high = 2, 4  # power_at(low) < target ≤ power_at(high), found by doubling, then bisected
    while high < max_n and power_at(high) < target:
        low, high = high, min(2 * high, max_n)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power_at(mid) >= target else (mid, high)
    return high


def seeds_paired(effect: float, sigma_d: float, target: float = 0.8, level: float = 0.05) -> int | None:
    return smallest_n(lambda n: power_paired(effect, sigma_d, n, level), target)


def seeds_unpaired(effect: float, sigma: float, target: float = 0.8, level: float = 0.05) -> int | None:
    return smallest_n(lambda n: power_unpaired(effect, sigma, n, n, level), target)


def upper_factor(df: int, confidence: float = 0.8) -> float:
    """σ's upper confidence bound over its estimate s, from (df)·s²/σ² ~ χ²(df): √(df / χ²_{1−confidence}(df))."""
    return math.sqrt(df / stats.chi2.ppf(1 - confidence, df))


def per_arm_level(alpha: float, m: int, correction: str) -> float:
    """The level one arm is planned at: α/m (holm, bh: their strictest step), α with no correction."""
    return alpha if correction == "none" else alpha / max(m, 1)


def minimum_detectable(
    sigma: float | None, n_arm: int, n_base: int, alpha: float = 0.05, target_power: float = 0.8
) -> float | None:
    """The smallest true improvement the two-sample test detects with `target_power` at these run counts."""
    if sigma is None or sigma <= 0 or n_arm < 2 or n_base < 2:
        return None
    df = n_arm + n_base - 2
    # Solve in units of the standard error, where the answer lies in a small bracket for any σ.
    ncp = optimize.brentq(lambda x: _power(x, df, alpha) - target_power, 0.0, 50.0)
    return float(ncp * sigma * math.sqrt(1 / n_arm + 1 / n_base))

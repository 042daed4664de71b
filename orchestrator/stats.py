"""Is an intervention's improvement signal, noise, or too small to matter? Every number comes from scipy.

An improvement is baseline − arm test loss (positive = lower loss = better), as in the blog series' table.
With at least two runs on each side it gets a confidence interval and a p-value, from one rule for pairing:
- paired t-test (scipy.stats.ttest_rel) on the runs whose seed, data seed and repeat both arms share, when
  they share at least MIN_PAIRS: a seed's luck is common to both sides and cancels in the difference. Runs
  the other arm lacks are left out of the test (the table says how many were paired), so a seed added to
  the baseline alone never switches an arm's test behind a verdict already printed;
- otherwise Welch's t-test (scipy.stats.ttest_ind, equal_var=False) on all runs, which assumes no common
  variance and no shared seeds.

Verdicts (the table's legend says the same):
- better / worse: the two-sided p-value is below the arm's level (α, lowered for the other arms of the board by
  multiplicity.py and for repeated looks by sequential.py); the interval at that level excludes zero;
- equivalent: no effect beyond ±δ, the smallest effect of interest (`sesoi`): both one-sided tests of TOST
  (Schuirmann 1987; Lakens 2017) reject at the arm's level. An arm both better and equivalent has a real
  but trivial effect, and says so;
- undecided: neither — the runs cannot tell (more seeds, or a larger δ, may);
- unverified: a single run on either side, no variance to test against (the series' single runs).

Two further numbers per arm, neither of which changes the verdict:
- below a target loss (`--target`, the speed-run records' rule): scipy.stats.ttest_1samp, one-sided, that the
  arm's mean test loss is below the target, at p < TARGET_ALPHA by default (modded-nanogpt's 0.01);
- the probability of improvement P(arm < baseline) on a fresh seed: the Mann–Whitney U statistic over all
  run pairs / (n·m), with a percentile bootstrap interval that resamples each arm on its own (rliable's
  "probability of improvement", Agarwal et al. 2021; Bouthillier et al. 2021 recommend it beside the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

Key = tuple  # which runs pair up: (seed, data_seed, repeat) for runs trained here (table.pairing_key)
BETTER, WORSE, EQUIVALENT, UNDECIDED, UNVERIFIED, BASELINE = (
    "better",
    "worse",
    "equivalent",
    "undecided",
    "unverified",
    "baseline",
)
MIN_PAIRS = 2  # ttest_rel needs two differences for a variance
FUTILITY_MIN_RUNS = 3  # more_seeds never calls an arm hopeless on fewer runs per side than this
TARGET_ALPHA = 0.01  # modded-nanogpt's record rule: mean below the target at p < 0.01
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 20261204  # fixed: the same interval on every read


@dataclass
class Measured:
    """One arm against the baseline before any verdict: the test that the pairing rule chose, on which runs."""

    n: int  # the arm's finished runs
    mean: float
    std: float | None
    improvement: float | None  # the estimate the test is about: mean paired difference, or difference of means
    test: str | None = None  # "paired" | "welch" | None (unverified)
    pairs: int = 0  # runs in the paired test
    p_value: float | None = None  # two-sided, uncorrected
    fit: object = field(default=None, repr=False)  # scipy's TtestResult: intervals at any level
    samples: tuple = field(default=(), repr=False)  # (baseline values, arm values) the test used
    degenerate: bool = False  # every difference identical: no noise to test against


@dataclass
class Comparison:
    n: int
    mean: float
    std: float | None
    improvement: float | None  # see Measured
    ci_low: float | None
    ci_high: float | None
    p_value: float | None  # two-sided, uncorrected
    test: str | None  # "paired" | "welch" | None
    verdict: str
    level: float = 0.05  # the p-value a verdict needs (after corrections); the CI is at 1 − level
    pairs: int = 0
    sesoi: float | None = None  # δ of the equivalence test, where one was asked for
    p_equivalence: float | None = None  # TOST: the larger of the two one-sided p-values
    trivial: bool = False  # better or worse, and yet within ±δ


def describe(values: list[float]) -> tuple[int, float, float | None]:
    arr = np.asarray(values, dtype=float)
    return len(arr), float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else None


def measure(arm: dict[Key, float], baseline: dict[Key, float]) -> Measured:
    """The test the pairing rule picks for one arm against the baseline, each keyed by pairing key."""
    n, mean, std = describe(list(arm.values()))
    if not baseline:
        return Measured(n, mean, std, None)
    shared = sorted(set(arm) & set(baseline), key=repr)
    if len(shared) >= MIN_PAIRS:
        b, a = np.array([baseline[k] for k in shared]), np.array([arm[k] for k in shared])
        m = Measured(n, mean, std, float(np.mean(b - a)), "paired", len(shared), samples=(b, a))
        if np.all(b - a == b[0] - a[0]):
            m.degenerate = True
        else:
            m.fit = stats.ttest_rel(b, a)
    else:
        b, a = np.asarray(list(baseline.values()), dtype=float), np.asarray(list(arm.values()), dtype=float)
        m = Measured(n, mean, std, float(b.mean() - a.mean()), samples=(b, a))
        if len(a) < 2 or len(b) < 2:
            return m  # unverified
        m.test = "welch"
        if np.ptp(a) == 0 and np.ptp(b) == 0:
            m.degenerate = True
        else:
            m.fit = stats.ttest_ind(b, a, equal_var=False)
    m.p_value = (0.0 if m.improvement else 1.0) if m.degenerate else float(m.fit.pvalue)
    return m


def decide(m: Measured, level: float, sesoi: float | None = None, different: bool | None = None) -> Comparison:
    """The verdict of a measured arm whose p-value is held to `level` (after corrections), with the
    equivalence test against ±`sesoi` where one is given. `different`: the board's decision from its
    adjusted p-value (multiplicity.py), which equals p < level up to the sequential simulation's resolution."""
    c = Comparison(m.n, m.mean, m.std, m.improvement, None, None, m.p_value, m.test, UNVERIFIED, level, m.pairs)
    c.sesoi = sesoi
    if m.test is None:
        return c
    if m.degenerate:  # every run on both sides identical (deterministic CPU repeats): no noise to test against
        c.ci_low = c.ci_high = m.improvement
        c.p_equivalence = None if sesoi is None else (0.0 if abs(m.improvement) < sesoi else 1.0)
    else:
        ci = m.fit.confidence_interval(confidence_level=1 - level)
        c.ci_low, c.ci_high = float(ci.low), float(ci.high)
        c.p_equivalence = None if sesoi is None else tost(m, sesoi)
    different = c.p_value < level if different is None else different
    c.trivial = c.p_equivalence is not None and c.p_equivalence < level
    if different:
        c.verdict = BETTER if m.improvement > 0 else WORSE
    else:
        c.verdict = EQUIVALENT if c.trivial else UNDECIDED
        c.trivial = False
    return c


def compare(
    arm: dict[Key, float],
    baseline: dict[Key, float],
    alpha: float = 0.05,
    looks: tuple[int, int] | None = None,
    sesoi: float | None = None,
) -> Comparison:
    """One arm against the baseline on its own (no other arms to correct for). `looks` = (first, last): the
    verdict was looked at after every run added from `first` to `last` runs per side (`orch more-seeds`), so
    it is held to sequential.sequential_alpha instead of α."""
    from orchestrator.sequential import sequential_alpha

    m = measure(arm, baseline)
    return decide(m, sequential_alpha(*looks, alpha, m.test == "paired") if looks and m.test else alpha, sesoi)


def tost(m: Measured, sesoi: float) -> float:
    """Two one-sided tests that the improvement lies within ±sesoi: the larger of the two p-values (H0:
    improvement ≤ −δ, and H0: improvement ≥ δ), with the same paired or Welch test as the difference."""
    b, a = m.samples
    if m.test == "paired":
        low = stats.ttest_rel(b + sesoi, a, alternative="greater").pvalue
        high = stats.ttest_rel(b - sesoi, a, alternative="less").pvalue
    else:
        low = stats.ttest_ind(b + sesoi, a, equal_var=False, alternative="greater").pvalue
        high = stats.ttest_ind(b - sesoi, a, equal_var=False, alternative="less").pvalue
    return float(max(low, high))


def below_target(values: list[float], target: float) -> float | None:
    """One-sided p-value that the mean test loss is below `target` (H0: mean ≥ target); None under 2 runs."""
    if len(values) < 2:
        return None
    arr = np.asarray(values, dtype=float)
    if np.ptp(arr) == 0:
        return 0.0 if arr[0] < target else 1.0
    return float(stats.ttest_1samp(arr, target, alternative="less").pvalue)


def probability_of_improvement(
    arm: list[float], baseline: list[float], confidence: float = 0.95
) -> tuple[float, float, float] | None:
    """P(an arm run has a lower test loss than a baseline run), both on fresh seeds, with a percentile
    bootstrap interval; None without a run on each side."""
    if not arm or not baseline:
        return None
    a, b = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    estimate = float(stats.mannwhitneyu(b, a).statistic / (len(a) * len(b)))
    if len(a) < 2 or len(b) < 2:
        return estimate, 0.0, 1.0  # one run on a side: the bootstrap has nothing to resample there

    def p_improvement(base, arm_, axis=-1):
        wins = (np.expand_dims(base, -1) > np.expand_dims(arm_, -2)).mean(axis=(-1, -2))
        ties = (np.expand_dims(base, -1) == np.expand_dims(arm_, -2)).mean(axis=(-1, -2))
        return wins + 0.5 * ties

    ci = stats.bootstrap(
        (b, a),
        p_improvement,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(BOOTSTRAP_SEED),
    ).confidence_interval
    return estimate, float(ci.low), float(ci.high)


def could_decide(c: Comparison, max_runs: int) -> bool:
    """Could more seeds (up to max_runs per side) still move this undecided arm to a verdict?

    Yes when the interval with max_runs per side — the observed standard error shrunk as 1/√n, with the
    t quantile of the test actually used (paired: n − 1 degrees of freedom; Welch: about 2n − 2) at the
    comparison's own level — would be narrower than the observed improvement, so that it could exclude zero;
    or, with a smallest effect of interest δ, narrow enough to fit within ±δ around it (equivalence).
    An arm with one run always could, and so could one with fewer than FUTILITY_MIN_RUNS: a spread measured
    on two runs (one degree of freedom when paired) is too uncertain to give up on an arm.
    """
    if c.verdict not in (UNDECIDED, UNVERIFIED):
        return False
    if c.n >= max_runs:
        return False
    if c.verdict == UNVERIFIED or c.ci_low is None or c.n < FUTILITY_MIN_RUNS:
        return True
    n_now = c.pairs if c.test == "paired" else c.n

    def df(n: int) -> int:
        return n - 1 if c.test == "paired" else 2 * n - 2

    q = 1 - c.level / 2
    se_now = (c.ci_high - c.ci_low) / 2 / stats.t.ppf(q, df(n_now))
    half_max = se_now * math.sqrt(n_now / max_runs) * stats.t.ppf(q, df(max_runs))
    could_equal = c.sesoi is not None and abs(c.improvement) + half_max < c.sesoi
    return abs(c.improvement) > half_max or could_equal

"""Many interventions on one board: corrections so that the board as a whole keeps its promise.

Testing 9 null interventions each at α = 0.05 calls at least one of them better or worse far more often than
5% of the time (1 − 0.95⁹ ≈ 37% for independent tests). So the arms of one board are one family:
- holm (the default): Holm's step-down procedure (Holm 1979, "A simple sequentially rejective multiple test
  procedure") keeps the family-wise error rate — the chance of any false verdict on the board — at α, under
  any dependence between the arms (they share one baseline, so they are dependent);
- bh: Benjamini–Hochberg (1995) keeps the false discovery rate — the expected share of false verdicts among
  the decided arms — at α: more verdicts, with some of them wrong;
- none: each arm at α on its own, as a single comparison would be.

`correct` takes each arm's p-value on the scale of a single test (sequential.sequential_p once more-seeds has
looked) and returns the adjusted p-values (a verdict needs adjusted p < α) and, per arm, the level its own
p-value was held to — the level of its confidence interval, so that an interval excludes zero exactly when
the arm is decided: Holm's step level at the arm's rank or at the first step that failed, whichever comes
first; for BH the level k·α/m of the k decided arms (Benjamini & Yekutieli 2005's false-coverage-rate
intervals), α/m when none is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from orchestrator import sequential
from orchestrator.stats import Comparison, Measured, decide

CORRECTIONS = ("holm", "bh", "none")
DESCRIBED = {
    "holm": "Holm across the {m} interventions: any false verdict on the board ≤ α",
    "bh": "Benjamini–Hochberg across the {m} interventions: share of false verdicts ≤ α",
    "none": "not corrected for the {m} interventions",
}


@dataclass
class Corrected:
    adjusted: list[float]  # per arm, in the order given: a verdict needs adjusted < α
    levels: list[float]  # per arm: the level its own p-value (and interval) is held to


def check(correction: str) -> str:
    if correction not in CORRECTIONS:
        raise ValueError(f"--correction must be one of {', '.join(CORRECTIONS)}, not {correction!r}")
    return correction


def correct(p: list[float], alpha: float, correction: str = "holm") -> Corrected:
    """Adjusted p-values and per-arm levels for one board's arms (p on the scale of a single test)."""
    check(correction)
    m = len(p)
    if m == 0:
        return Corrected([], [])
    ps = np.asarray(p, dtype=float)
    if correction == "none" or m == 1:
        return Corrected([float(x) for x in ps], [alpha] * m)
    order = np.argsort(ps, kind="stable")
    levels = np.empty(m)
    if correction == "holm":
        steps = alpha / (m - np.arange(m))  # α/m, α/(m−1), …, α at ranks 1…m
        adjusted_sorted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ps[order]))
        failed = np.flatnonzero(ps[order] >= steps)
        stop = failed[0] if len(failed) else m  # ranks from here on are held to the level that failed
        levels[order] = steps[np.minimum(np.arange(m), stop)]
        adjusted = np.empty(m)
        adjusted[order] = adjusted_sorted
    else:
        adjusted = stats.false_discovery_control(ps, method="bh")
        decided = int(np.sum(adjusted < alpha))
        levels[:] = max(decided, 1) * alpha / m
    return Corrected([float(x) for x in adjusted], [float(x) for x in levels])


def judge(
    measured: dict[str, Measured],
    alpha: float,
    correction: str = "holm",
    looks: tuple[int, int] | None = None,
    sesoi: float | None = None,
) -> dict[str, tuple[Comparison, float | None]]:
    """The verdicts of one board's arms as one family, and each arm's adjusted p-value: every p calibrated
    for more-seeds' looks (sequential.sequential_p), corrected across the arms, then each arm's own p held
    to its level (its interval, and its equivalence test against ±sesoi, at that level)."""
    family = [arm for arm, m in measured.items() if m.p_value is not None]

    def single_scale(m: Measured) -> float:
        return sequential.sequential_p(*looks, m.p_value, m.test == "paired") if looks else m.p_value

    corrected = correct([single_scale(measured[a]) for a in family], alpha, correction)
    levels, adjusted = dict(zip(family, corrected.levels)), dict(zip(family, corrected.adjusted))
    out = {}
    for arm, m in measured.items():
        level = levels.get(arm, alpha)
        if looks and m.test:
            level = sequential.sequential_alpha(*looks, level, m.test == "paired")
        different = adjusted[arm] < alpha if arm in adjusted else None
        out[arm] = (decide(m, level, sesoi, different), adjusted.get(arm))
    return out

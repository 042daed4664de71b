"""Planning: how many seeds each arm needs to detect a true improvement (`orch plan`, `orch submit --seeds auto`).

For a true improvement δ (`--effect`, in test-loss nats: baseline mean − arm mean, as in `orch table`) and a
target power 1 − β, the smallest n ≥ 2 seeds per arm at which the table's two-sided t-test, at the per-arm
level α', detects δ with probability at least 1 − β. Two designs:

- paired: every arm runs the same seeds (as `orch submit` queues them), and the test is scipy's ttest_rel,
  the one-sample t-test on the n per-seed differences d = arm − baseline, of std σ_d:
      T ~ noncentral t(df = n − 1, ncp = δ·√n / σ_d)
- unpaired: independent seeds, n per arm, and the two-sample t-test (the table's Welch test, whose degrees of
  freedom are about 2n − 2 at equal n and σ):
      T ~ noncentral t(df = 2n − 2, ncp = δ / (σ·√(2/n)))

power(n) = P(T > t) + P(T < −t), t = the 1 − α'/2 quantile of the central t with the same df, from
scipy.stats.nct: exact for the t-test on normally distributed losses (Owen 1965; Cohen 1988, ch. 2), where the
normal approximation n ≈ (z_{1−α'/2} + z_{1−β})²·σ_d²/δ² undercounts at the few seeds pre-training can afford
(at δ/σ_d = 1, α' = 0.05, 80%: 8 instead of 10 paired; 16 instead of 17 per arm unpaired at δ/σ = 1). The
search stops at MAX_N seeds per arm ("more than 10000").

Where σ and σ_d come from (`measure`):
- σ: the seed-to-seed std (ddof 1) of the baseline's finished runs, or of a noise study's (`orch noise EXP`,
  experiment EXP.noise-VARY), whichever has more runs among those that vary what the experiment's seeds vary;
  all of them are shown. `--sigma S` replaces it.
- σ_d: pooled over every intervention arm with at least 2 runs paired with the baseline's (table.pairing_key),
  each arm's variance of its differences weighted by its degrees of freedom:
      σ_d² = Σ_i (k_i − 1)·s_i² / Σ_i (k_i − 1)        (k_i pairs of arm i)
  (a "pair" of one and the same run, an arm identical to the baseline at this preset, is left out). With no
  pairs measured, σ_d = σ·√2: arms uncorrelated, the worst case for pairing (about the unpaired count); a
  seed that is lucky in both arms makes the real σ_d smaller. `--sigma S` gives σ_d = S·√2 unless measured.
- Either rests on few runs, so below UNCERTAIN_DF degrees of freedom the plan also says how many seeds the
  paired design needs at the 80% upper confidence bound of σ_d, √(df / χ²_{0.2}(df))·σ_d.

Multiple comparisons: the table corrects across the m interventions of a board. Holm's procedure (Holm 1979)
rejects at least whatever Bonferroni's α/m rejects, so a plan at α' = α/m (Holm's first and strictest step)
is safe for Holm; for Benjamini–Hochberg (1995) α/m is BH's strictest step too, and BH needs fewer seeds when
many arms truly differ; with no correction α' = α. (An experiment grown by `orch more-seeds` is tested at a
lower, sequential level: a plan is for a fixed number of seeds.)

Power now: for each intervention arm, the power its current runs have for δ at α', with the test the table
picks (paired on the seeds it shares with the baseline, from 2; else the two-sample test on all runs).

References: J. Cohen, Statistical Power Analysis for the Behavioral Sciences, 2nd ed., 1988, ch. 2;
D. B. Owen, "The power of Student's t-test", JASA 60 (1965) 320–333; S. Holm, "A simple sequentially
rejective multiple test procedure", Scand. J. Statist. 6 (1979) 65–70; Y. Benjamini, Y. Hochberg,
"Controlling the false discovery rate", JRSS B 57 (1995) 289–300; scipy.stats.nct.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator.multiplicity import CORRECTIONS
from orchestrator.power import (
    MAX_N,
    per_arm_level,
    power_paired,
    power_unpaired,
    seeds_paired,
    seeds_unpaired,
    upper_factor,
)
from orchestrator.stats import MIN_PAIRS

UNCERTAIN_DF = 20  # below this many degrees of freedom behind σ_d, the plan also says what its upper bound needs


def check(effect: float, power: float, alpha: float, sigma: float | None, correction: str) -> None:
    """Refuse inputs a plan cannot use, each with the fix (ValueError, shown as one line by the CLI)."""
    if effect is None or not (effect > 0 and math.isfinite(effect)):
        raise ValueError(
            f"--effect must be a positive improvement in test-loss nats (baseline − arm), e.g. --effect 0.01, "
            f"not {effect}"
        )
    if not 0 < power < 1:
        raise ValueError(f"--power must be between 0 and 1, e.g. --power 0.8, not {power}")
    if not 0 < alpha < 1:
        raise ValueError(f"--alpha must be between 0 and 1, e.g. 0.05, not {alpha}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"--sigma must be a positive test-loss std in nats, e.g. --sigma 0.01, not {sigma}")
    if correction not in CORRECTIONS:
        raise ValueError(f"--correction must be holm, bh or none, not {correction!r}")


# ---------------------------------------------------------------------------------------------------------
# What the database measured.


@dataclass
class SigmaSource:
    """One measurement of σ: the baseline of the experiment itself or of one of its noise studies."""

    experiment: str
    vary: str  # what its seeds vary: init | data | both | none
    n: int  # finished baseline runs
    sigma: float | None  # their std (ddof 1); None below 2 runs
    used: bool = False


@dataclass
class ArmCount:
    """An intervention arm's finished runs: how many, and how many pair with the baseline's."""

    arm: str
    n: int
    pairs: int  # runs on the baseline's seeds (table.pairing_key): the table tests it paired, on these, from 2


@dataclass
class Measured:
    experiment: str
    vary: str = "init"
    baseline_n: int = 0
    active: int = 0  # the experiment's runs still queued or running
    sources: list[SigmaSource] = field(default_factory=list)
    sigma_d: float | None = None  # pooled std of the per-seed differences arm − baseline
    sigma_d_df: int = 0
    sigma_d_pairs: int = 0
    sigma_d_arms: list[str] = field(default_factory=list)
    arms: list[ArmCount] = field(default_factory=list)
    interventions: list[str] = field(default_factory=list)  # the board's m: every intervention arm known


def measure(engine, experiment: str, interventions: Sequence[str] = ()) -> Measured:
    """σ sources, pooled σ_d and the run counts of an experiment, from its finished runs (table.finished).
    `interventions`: arms about to be submitted, counted in the board's m with those already there."""
    from orchestrator import noise, queries, states
    from orchestrator import table as tbl
    from orchestrator.specs import BASELINE

    spec = queries.specs(engine).get(experiment)
    vary = spec.vary if spec is not None else "init"  # what a seed of the experiment varies
    out = Measured(experiment, vary)
    by_exp: dict[str, dict[str, list]] = {}
    for exp, arm, run in queries.runs_of(engine, noise.with_studies(engine, [experiment])):
        by_exp.setdefault(exp, {}).setdefault(arm, []).append(run)
    arms = by_exp.get(experiment, {})
    out.active = len({r.id for rs in arms.values() for r in rs if r.state in states.ACTIVE})
    base_runs = [r for r in arms.get(BASELINE, []) if tbl.finished(r)]
    base = {tbl.pairing_key(r): r for r in base_runs}
    out.baseline_n = len(base)
    for exp in [experiment, *sorted(e for e in by_exp if e != experiment)]:
        losses = [r.test_loss for r in by_exp.get(exp, {}).get(BASELINE, []) if tbl.finished(r)]
        study_vary = vary if exp == experiment else exp.split(noise.NOISE_SEP, 1)[1]
        std = float(np.std(losses, ddof=1)) if len(losses) > 1 else None
        out.sources.append(SigmaSource(exp, study_vary, len(losses), std))
    names = set(interventions) | {a for a in arms if a != BASELINE}
    names |= {i.name for i in spec.interventions} if spec is not None else set()
    out.interventions = sorted(names)
    weighted, df, pairs = 0.0, 0, 0
    for arm in sorted(a for a in arms if a != BASELINE):
        runs = {tbl.pairing_key(r): r for r in arms[arm] if tbl.finished(r)}
        common = [k for k in runs if k in base]
        out.arms.append(ArmCount(arm, len(runs), len(common)))
        # A pair of the very same run (an intervention that changes nothing at this preset) differs by 0: no
        # information about σ_d, and it would pull σ_d towards 0.
        shared = [k for k in common if runs[k].id != base[k].id]
        if len(shared) >= MIN_PAIRS:
            d = np.array([runs[k].test_loss - base[k].test_loss for k in shared])
            weighted += (len(d) - 1) * float(np.var(d, ddof=1))
            df += len(d) - 1
            pairs += len(d)
            out.sigma_d_arms.append(arm)
    if df:
        out.sigma_d, out.sigma_d_df, out.sigma_d_pairs = math.sqrt(weighted / df), df, pairs
    return out


# ---------------------------------------------------------------------------------------------------------
# The plan.


@dataclass
class Design:
    test: str  # "paired" | "unpaired"
    sigma: float  # σ_d for paired, σ for unpaired
    n: int | None  # seeds per arm; None: more than max_n
    power: float | None  # the power at n (at least the target)
    max_n: int = MAX_N

    @property
    def seeds(self) -> str:
        return str(self.n) if self.n is not None else f"more than {self.max_n}"


@dataclass
class ArmPower:
    """An intervention arm's power now, at its current run counts, for the planned effect and level."""

    arm: str
    test: str | None  # "paired" | "unpaired" | None (fewer than 2 runs on a side)
    n_arm: int
    n_base: int
    pairs: int  # runs of the arm on the baseline's seeds: those the paired test uses
    power: float | None


@dataclass
class Plan:
    experiment: str
    effect: float
    target_power: float
    alpha: float
    correction: str
    m: int  # interventions on the board
    level: float  # the per-arm level planned at
    sigma: float
    sigma_from: str  # where σ comes from, in words
    sigma_d: float
    sigma_d_from: str
    sigma_d_measured: bool  # False: σ_d = σ·√2 assumed (no pairs measured)
    paired: Design
    unpaired: Design
    now: list[ArmPower]
    sources: list[SigmaSource] = field(default_factory=list)  # every σ measured (the baseline and noise studies)
    baseline_n: int = 0
    notes: list[str] = field(default_factory=list)

    def level_text(self) -> str:
        if self.m == 1 and self.correction != "none":
            return f"{self.level:.3g} per arm (α {self.alpha:g}: one intervention, nothing to correct for)"
        if self.correction == "none":
            return f"{self.level:.3g} per arm (α {self.alpha:g}, no correction across {_arms(self.m)})"
        why = (
            "holm: its first and strictest step, Bonferroni's, so the plan is safe"
            if self.correction == "holm"
            else "bh: its strictest step; BH needs fewer seeds when many arms truly differ"
        )
        return f"{self.level:.3g} per arm = α {self.alpha:g} / {_arms(self.m)} ({why})"

    def now_text(self) -> str:
        if not self.now:
            return f"no intervention runs finished yet (baseline: {self.baseline_n})"
        groups: dict[tuple, list[str]] = {}
        for a in self.now:
            groups.setdefault((a.power, a.test, a.n_arm, a.n_base, a.pairs), []).append(a.arm)
        parts = []
        for (pw, test, n_arm, n_base, pairs), arms in groups.items():
            if pw is None:
                parts.append(f"— ({n_arm} vs {n_base} baseline runs, a t-test needs 2 per side: {', '.join(arms)})")
            elif test == "paired":
                parts.append(f"{pw:.2f} (paired, {pairs} seeds shared with the baseline: {', '.join(arms)})")
            else:
                parts.append(f"{pw:.2f} (unpaired, {n_arm} vs {n_base} baseline runs: {', '.join(arms)})")
        return "; ".join(parts)

    def text(self) -> str:
        others = [s for s in self.sources if not s.used and s.sigma is not None]
        also = "; also measured: " + ", ".join(_source(s) for s in others) if others else ""
        lines = [
            f"plan for {self.experiment}: detect a true improvement of {self.effect:g} nats with "
            f"{self.target_power:.0%} power (two-sided t-test)",
            f"σ    {self.sigma:.4g}  {self.sigma_from}{also}",
            f"σ_d  {self.sigma_d:.4g}  {self.sigma_d_from}",
            f"level {self.level_text()}",
            f"seeds per arm: {self.paired.seeds} paired (every arm on the same seeds, as orch queues them) · "
            f"{self.unpaired.seeds} unpaired (independent seeds)",
            f"power now for {self.effect:g}: {self.now_text()}",
            *self.notes,
        ]
        return "\n".join(lines)

    def auto_line(self) -> str:
        """What `orch submit --seeds auto` prints."""
        sigma = "" if self.sigma_d_measured else f", σ {self.sigma:.4g} {self.sigma_from}"
        return (
            f"seeds auto: {self.paired.seeds} per arm (paired design, σ_d {self.sigma_d:.4g} "
            f"{self.sigma_d_from}{sigma}; effect {self.effect:g}, power {self.target_power:g}, "
            f"level {self.level:.3g}: α {self.alpha:g}"
            + (f" / {_arms(self.m)}, {self.correction})" if self.correction != "none" else ", no correction)")
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _arms(m: int) -> str:
    return f"{m} intervention{'s' if m != 1 else ''}"


def _source(s: SigmaSource) -> str:
    from orchestrator.noise import NOISE_SEP

    where = s.experiment if NOISE_SEP in s.experiment else f"the baseline of {s.experiment}"
    varying = f", varying {s.vary}" if NOISE_SEP in s.experiment else ""
    return f"{where} {s.sigma:.4g} ({s.n} runs{varying})"


def make(
    measured: Measured,
    effect: float,
    power: float = 0.8,
    alpha: float = 0.05,
    sigma: float | None = None,
    correction: str = "holm",
    fix: str = "",
) -> Plan:
    """The plan for a measured experiment (or for `--sigma` alone: an empty Measured). `fix`: how to get
    baseline runs, said in the error when there is no σ."""
    check(effect, power, alpha, sigma, correction)
    exp = measured.experiment
    notes: list[str] = []
    sources = [SigmaSource(**asdict(s)) for s in measured.sources]
    usable = [s for s in sources if s.sigma is not None and s.sigma > 0]
    # The σ that the experiment's own seeds see: its baseline, or a noise study varying the same thing.
    same = [s for s in usable if s.vary == measured.vary]
    chosen = max(same or usable, key=lambda s: s.n, default=None)  # max keeps the first of a tie: the baseline
    given = sigma is not None
    if given:
        sigma_from = "given (--sigma)"
    elif chosen is None:
        runs = f"{measured.baseline_n} finished baseline run{'s' if measured.baseline_n != 1 else ''}"
        zero = " with a spread of 0 (identical runs)" if any(s.sigma == 0 for s in sources) else ""
        waiting = f", {measured.active} still queued or running (wait for them: orch worker)" if measured.active else ""
        raise ValueError(
            f"experiment {exp!r} has {runs}{zero}{waiting}: a σ needs at least 2 that differ; run 2 or more "
            f"seeds first ({fix or 'orch submit FILE --seeds 2'}), measure it with `orch noise {exp}`, "
            f"or pass --sigma, e.g. --sigma 0.01"
        )
    else:
        chosen.used = True
        sigma = chosen.sigma
        is_study = chosen.experiment != exp
        sigma_from = (
            f"from {chosen.experiment} ({chosen.n} runs of the baseline, varying {chosen.vary})"
            if is_study
            else f"seed-to-seed std of the baseline of {exp} ({chosen.n} finished runs)"
        )
        if chosen.vary != measured.vary:
            notes.append(
                f"note: σ comes from a noise study varying {chosen.vary}, while {exp}'s seeds vary "
                f"{measured.vary}: run `orch noise {exp} --vary {measured.vary}` for the σ that applies"
            )
    if measured.sigma_d is not None:
        sigma_d, sigma_d_measured = measured.sigma_d, True
        sigma_d_from = (
            f"std of {measured.sigma_d_pairs} per-seed differences arm − baseline, pooled over "
            f"{', '.join(measured.sigma_d_arms)} ({measured.sigma_d_df} df)"
        )
    else:
        sigma_d, sigma_d_measured = sigma * math.sqrt(2), False
        sigma_d_from = "= σ·√2, assumed: no pairs measured yet"
        notes.append(
            "note: no arm has 2 runs on the baseline's seeds yet, so σ_d assumes uncorrelated arms, the worst "
            "case for pairing (about the unpaired count); seeds shared by the arms usually make it smaller"
        )
    m = max(len(measured.interventions), 1)
    level = per_arm_level(alpha, m, correction)
    n_paired = seeds_paired(effect, sigma_d, power, level)
    n_unpaired = seeds_unpaired(effect, sigma, power, level)
    paired = Design("paired", sigma_d, n_paired, power_paired(effect, sigma_d, n_paired, level) if n_paired else None)
    unpaired = Design(
        "unpaired",
        sigma,
        n_unpaired,
        power_unpaired(effect, sigma, n_unpaired, n_unpaired, level) if n_unpaired else None,
    )
    # A σ measured on few runs is itself uncertain: say what the paired plan needs at its 80% upper bound.
    df = measured.sigma_d_df if sigma_d_measured else (None if given else chosen.n - 1)
    if df is not None and df < UNCERTAIN_DF and n_paired is not None:
        high = sigma_d * upper_factor(df)
        n_high = seeds_paired(effect, high, power, level)
        notes.append(
            f"note: σ_d rests on {df} df; at its 80% upper confidence bound ({high:.4g}) the paired plan needs "
            f"{n_high if n_high is not None else f'more than {MAX_N}'} seeds per arm"
        )
    now = []
    for a in measured.arms:  # the test the table picks for each arm (stats.py's pairing rule)
        nb = measured.baseline_n
        if a.pairs >= MIN_PAIRS:
            now.append(ArmPower(a.arm, "paired", a.n, nb, a.pairs, power_paired(effect, sigma_d, a.pairs, level)))
        elif a.n >= 2 and nb >= 2:
            now.append(ArmPower(a.arm, "unpaired", a.n, nb, a.pairs, power_unpaired(effect, sigma, a.n, nb, level)))
        else:
            now.append(ArmPower(a.arm, None, a.n, nb, a.pairs, None))
    return Plan(
        experiment=exp,
        effect=effect,
        target_power=power,
        alpha=alpha,
        correction=correction,
        m=m,
        level=level,
        sigma=sigma,
        sigma_from=sigma_from,
        sigma_d=sigma_d,
        sigma_d_from=sigma_d_from,
        sigma_d_measured=sigma_d_measured,
        paired=paired,
        unpaired=unpaired,
        now=now,
        sources=sources,
        baseline_n=measured.baseline_n,
        notes=notes,
    )

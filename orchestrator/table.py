"""`orch table`: the improvement-vs-baseline leaderboard, in the shape of the blog series' table — and honest.

Arms are ranked by mean test loss over their finished runs. Each row: runs, mean ± std, the improvement vs
the baseline (positive = lower loss = better) with its confidence interval, the p-value and a verdict
(orchestrator/stats.py), judged with the board's other arms as one family (multiplicity.py: Holm by default)
and calibrated for `orch more-seeds`' looks (sequential.py). Also per board: the baseline's σ and the smallest
improvement the current run counts would detect, the equivalence margin δ, a target loss. A stack of
interventions shows its improvement beside the sum of its parts'. Noise studies (`orch noise`) add σ per
source of noise. Failed and diverged runs are listed below, never ranked; queued and running ones are
counted, so a half-finished study says so. table_render.py shows boards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import multiplicity, power, states, stats
from orchestrator.noise import NOISE_SEP
from orchestrator.specs import BASELINE, Experiment
from orchestrator.states import RunState


@dataclass
class Row:
    experiment: str
    arm: str
    n: int
    mean: float | None
    std: float | None
    improvement: float | None = None  # baseline − arm: the mean paired difference when paired
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None  # two-sided, uncorrected
    test: str | None = None  # "paired" | "welch"
    verdict: str | None = None
    level: float | None = None  # the raw p-value its verdict needs, after corrections; the CI is at 1 − level
    pending: int = 0
    imported: bool = False
    parts: list[str] = field(default_factory=list)  # for a stack: its interventions
    parts_sum: float | None = None  # and the sum of their improvements
    losses: list[float] = field(default_factory=list)
    pairs: int = 0  # runs in the paired test
    p_adjusted: float | None = None  # corrected for the board's other arms and for more-seeds' looks: < α decides
    p_equivalence: float | None = None  # TOST against ±δ (board.sesoi), uncorrected
    trivial: bool = False  # better or worse, yet shown within ±δ
    p_target: float | None = None  # one-sided: mean test loss below board.target
    below_target: bool | None = None
    p_improvement: float | None = None  # P(arm < baseline) on fresh seeds, and its bootstrap interval
    p_improvement_low: float | None = None
    p_improvement_high: float | None = None


@dataclass
class Board:
    experiment: str
    rows: list[Row]
    failed: list[dict]
    alpha: float
    looks: tuple[int, int] | None = None  # (first, last) when `orch more-seeds` grew it: sequential verdicts
    baseline_sigma: float | None = None
    baseline_n: int = 0
    detectable: float | None = None  # smallest improvement detectable at 80% power with the current counts
    noise: dict[str, dict] = field(default_factory=dict)  # vary mode -> {"n", "sigma"}
    correction: str = "holm"
    family: int = 0  # arms with a p-value: the family the correction is over
    sesoi: float | None = None  # δ of the equivalence verdicts
    sesoi_source: str | None = None  # "--sesoi", "the spec", or where an automatic δ came from
    target: float | None = None
    target_alpha: float = stats.TARGET_ALPHA

    @property
    def level(self) -> float:
        """The strictest raw p-value a verdict here needs: α, after corrections and more-seeds' looks."""
        return min([r.level for r in self.rows if r.level is not None] or [self.alpha])


@dataclass
class Options:
    """How the boards judge: the family-wise correction, the equivalence margin, the target loss."""

    alpha: float = 0.05
    correction: str = "holm"
    sesoi: float | str | None = None  # nats, "auto" (the baseline's σ), or None: each spec's own
    target: float | None = None
    target_alpha: float = stats.TARGET_ALPHA

    def __post_init__(self):
        multiplicity.check(self.correction)
        if isinstance(self.sesoi, str) and self.sesoi != "auto":
            raise ValueError(f"--sesoi must be a positive number of nats (e.g. 0.01) or auto, not {self.sesoi!r}")
        if isinstance(self.sesoi, (int, float)) and not self.sesoi > 0:
            raise ValueError(f"--sesoi must be a positive number of nats (e.g. 0.01), not {self.sesoi:g}")
        if not 0 < self.target_alpha < 1:
            raise ValueError(f"--target-alpha must lie between 0 and 1 (e.g. 0.01), not {self.target_alpha:g}")
        if self.target is not None and not self.target > 0:
            raise ValueError(f"--target must be a positive test loss in nats (e.g. 3.28), not {self.target:g}")


def build(
    runs: list[tuple[str, str, object]],
    specs: dict[str, Experiment] | None = None,
    alpha: float = 0.05,
    options: Options | None = None,
) -> list[Board]:
    """One board per experiment from (experiment, arm, run) triples; `specs` (queries.specs) gives each
    experiment's stacks, its smallest effect of interest and, once `orch more-seeds` has looked at it, its
    sequential looks."""
    options = options or Options(alpha)
    by_exp: dict[str, dict[str, list]] = {}
    for exp, arm, run in runs:
        by_exp.setdefault(exp, {}).setdefault(arm, []).append(run)
    noise: dict[str, dict[str, dict]] = {}
    for exp, arms in by_exp.items():
        if NOISE_SEP in exp:
            parent, vary = exp.split(NOISE_SEP, 1)
            losses = [r.test_loss for r in arms.get(BASELINE, []) if finished(r)]
            n, _, sigma = stats.describe(losses) if losses else (0, None, None)
            noise.setdefault(parent, {})[vary] = {"n": n, "sigma": sigma}
    boards = {}
    for exp, arms in sorted(by_exp.items()):
        if NOISE_SEP in exp:
            continue  # shown as noise sources of their parent experiment
        spec = (specs or {}).get(exp)
        boards[exp] = _board(exp, arms, spec, options, noise.get(exp, {}))
    for parent, sources in noise.items():
        boards.setdefault(parent, Board(parent, [], [], options.alpha, correction=options.correction)).noise = sources
    return list(boards.values())


def finished(run) -> bool:
    """A run that counts in the table: succeeded, with a test loss."""
    return run.state == RunState.SUCCEEDED and run.test_loss is not None


def pairing_key(run) -> tuple:
    """Which runs of two arms pair up in a paired test: those that truly shared a seed and data order.

    Runs trained here pair on (seed, data seed, repeat). Imported runs pair only with imported runs of the
    same given seed and repeat (another codebase's seed 0 is not ours); imported without a seed (an import
    older than seed-aware imports did not record one) they pair with nothing, and the arms get Welch's test."""
    result = run.result or {}
    if result.get("imported"):
        given = result.get("seed")
        return ("imported", run.id) if given is None else ("imported", given, run.repeat)
    return (run.seed, run.data_seed, run.repeat)


def _board(exp: str, arms: dict[str, list], spec: Experiment | None, options: Options, noise: dict) -> Board:
    looks = (spec.looks.first, spec.looks.last) if spec and spec.looks else None
    board = Board(exp, [], [], options.alpha, looks, noise=noise, correction=options.correction, target=options.target)
    board.target_alpha = options.target_alpha
    base_losses = {pairing_key(r): r.test_loss for r in arms.get(BASELINE, []) if finished(r)}
    if len(base_losses) > 1:
        board.baseline_n, _, board.baseline_sigma = stats.describe(list(base_losses.values()))
    elif base_losses:
        board.baseline_n = 1
    board.sesoi, board.sesoi_source = _sesoi(options.sesoi, spec, board)
    measured: dict[str, stats.Measured] = {}
    for arm, rs in arms.items():
        losses = {pairing_key(r): r.test_loss for r in rs if finished(r)}
        board.failed += _failures(arm, rs)
        row = Row(
            exp,
            arm,
            len(losses),
            None,
            None,
            pending=sum(r.state in states.ACTIVE for r in rs),
            imported=any((r.result or {}).get("imported") for r in rs),
            losses=sorted(losses.values()),
        )
        if losses:
            row.n, row.mean, row.std = stats.describe(list(losses.values()))
            if arm == BASELINE:
                row.verdict = stats.BASELINE
            else:
                measured[arm] = stats.measure(losses, base_losses)
                pi = stats.probability_of_improvement(list(losses.values()), list(base_losses.values()))
                if pi is not None:
                    row.p_improvement, row.p_improvement_low, row.p_improvement_high = pi
            if board.target is not None:
                row.p_target = stats.below_target(row.losses, board.target)
                row.below_target = None if row.p_target is None else row.p_target < board.target_alpha
        board.rows.append(row)
    _judge(board, measured)
    by_arm = {r.arm: r for r in board.rows}
    stacks = {i.name: i.stack for i in spec.interventions if i.stack} if spec else {}
    for r in board.rows:
        r.parts = stacks.get(r.arm, [])
        parts = [by_arm.get(p) for p in r.parts]
        if parts and all(p is not None and p.improvement is not None for p in parts):
            r.parts_sum = sum(p.improvement for p in parts)
    board.rows.sort(key=lambda r: (r.mean is None, r.mean if r.mean is not None else 0.0))
    arm_ns = [r.n for r in board.rows if r.arm != BASELINE and r.n]
    if board.baseline_sigma is not None and arm_ns:
        board.detectable = power.minimum_detectable(board.baseline_sigma, min(arm_ns), board.baseline_n, board.level)
    return board


def _judge(board: Board, measured: dict[str, stats.Measured]) -> None:
    """The board's verdicts, its arms judged as one family (multiplicity.judge), copied onto its rows."""
    by_arm = {r.arm: r for r in board.rows}
    board.family = sum(m.p_value is not None for m in measured.values())
    judged = multiplicity.judge(measured, board.alpha, board.correction, board.looks, board.sesoi)
    for arm, (c, adjusted) in judged.items():
        row = by_arm[arm]
        row.improvement, row.ci_low, row.ci_high = c.improvement, c.ci_low, c.ci_high
        row.p_value, row.test, row.verdict, row.level = c.p_value, c.test, c.verdict, c.level
        row.pairs, row.p_equivalence, row.trivial, row.p_adjusted = c.pairs, c.p_equivalence, c.trivial, adjusted


def _sesoi(asked: float | str | None, spec: Experiment | None, board: Board) -> tuple[float | None, str | None]:
    """δ for the equivalence verdicts and where it came from: --sesoi, else the spec's, else none.
    "auto": the baseline's seed-to-seed σ — from the noise study with the most runs where there is one —
    an effect smaller than one seed's luck, which no single run could show."""
    if isinstance(asked, (int, float)):
        return float(asked), "--sesoi"
    if asked == "auto":
        studies = [(v["n"], v["sigma"], vary) for vary, v in board.noise.items() if v["sigma"]]
        if studies:
            n, sigma, vary = max(studies)
            return sigma, f"the σ of noise study {vary!r} over {n} runs (--sesoi auto)"
        if board.baseline_sigma:
            return board.baseline_sigma, f"the baseline's σ over {board.baseline_n} runs (--sesoi auto)"
        return None, None
    if spec is not None and spec.sesoi is not None:
        return spec.sesoi, "the experiment's sesoi"
    return None, None


def _failures(arm: str, rs: list) -> list[dict]:
    out = []
    for r in rs:
        if r.state in (RunState.FAILED, RunState.DIVERGED):
            step = (r.result or {}).get("diverged_step")
            detail = f"diverged at step {step}" if step else _last_line(r.error)
            out.append({"arm": arm, "run": r.id, "seed": r.seed, "state": r.state, "detail": detail})
    return out


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""

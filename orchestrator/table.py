"""`orch table`: the improvement-vs-baseline leaderboard, in the shape of the blog series' table — and honest.

Arms are ranked by mean test loss over their finished runs. Each row: runs, mean ± std, the improvement vs
the baseline (positive = lower loss = better) with its confidence interval (95% at α = 0.05; at the
sequential level once `orch more-seeds` has looked), the p-value and a verdict (orchestrator/stats.py).
Above each table: the baseline's σ and the smallest improvement the current run counts would detect. A stack
of interventions shows its improvement beside the sum of its parts'. Noise studies (`orch noise`) add σ per
source of noise. Failed and diverged runs are listed below, never ranked; queued and running ones are
counted, so a half-finished study says so.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

from orchestrator import states, stats
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
    improvement: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    test: str | None = None
    verdict: str | None = None
    level: float | None = None  # the p-value its verdict needs: α, or the sequential level
    pending: int = 0
    imported: bool = False
    parts: list[str] = field(default_factory=list)  # for a stack: its interventions
    parts_sum: float | None = None  # and the sum of their improvements
    losses: list[float] = field(default_factory=list)


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

    @property
    def level(self) -> float:
        """The strictest p-value a verdict here needs: α, or the sequential level once more-seeds looked."""
        return min([r.level for r in self.rows if r.level is not None] or [self.alpha])


def build(
    runs: list[tuple[str, str, object]], specs: dict[str, Experiment] | None = None, alpha: float = 0.05
) -> list[Board]:
    """One board per experiment from (experiment, arm, run) triples; `specs` (queries.specs) gives each
    experiment's stacks and, once `orch more-seeds` has looked at it, its sequential looks."""
    by_exp: dict[str, dict[str, list]] = {}
    for exp, arm, run in runs:
        by_exp.setdefault(exp, {}).setdefault(arm, []).append(run)
    boards = {}
    for exp, arms in sorted(by_exp.items()):
        if NOISE_SEP in exp:
            continue  # shown as noise sources of their parent experiment
        spec = (specs or {}).get(exp)
        stacks = {i.name: i.stack for i in spec.interventions if i.stack} if spec else {}
        looks = (spec.looks.first, spec.looks.last) if spec and spec.looks else None
        boards[exp] = _board(exp, arms, stacks, alpha, looks)
    for exp, arms in by_exp.items():
        if NOISE_SEP in exp:
            parent, vary = exp.split(NOISE_SEP, 1)
            losses = [r.test_loss for r in arms.get(BASELINE, []) if finished(r)]
            n, _, sigma = stats.describe(losses) if losses else (0, None, None)
            board = boards.setdefault(parent, Board(parent, [], [], alpha))
            board.noise[vary] = {"n": n, "sigma": sigma}
    return list(boards.values())


def finished(run) -> bool:
    """A run that counts in the table: succeeded, with a test loss."""
    return run.state == RunState.SUCCEEDED and run.test_loss is not None


def _key(run) -> tuple:
    return (run.seed, run.data_seed, run.repeat)


def _board(
    exp: str, arms: dict[str, list], stacks: dict[str, list[str]], alpha: float, looks: tuple[int, int] | None
) -> Board:
    base_losses = {_key(r): r.test_loss for r in arms.get(BASELINE, []) if finished(r)}
    rows, failed = [], []
    for arm, rs in arms.items():
        losses = {_key(r): r.test_loss for r in rs if finished(r)}
        for r in rs:
            if r.state in (RunState.FAILED, RunState.DIVERGED):
                step = (r.result or {}).get("diverged_step")
                failed.append(
                    {
                        "arm": arm,
                        "run": r.id,
                        "seed": r.seed,
                        "state": r.state,
                        "detail": f"diverged at step {step}" if step else _last_line(r.error),
                    }
                )
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
            if arm == BASELINE:
                row.n, row.mean, row.std = stats.describe(list(losses.values()))
                row.verdict = stats.BASELINE
            else:
                c = stats.compare(losses, base_losses, alpha, looks)
                row.n, row.mean, row.std = c.n, c.mean, c.std
                row.improvement, row.ci_low, row.ci_high = c.improvement, c.ci_low, c.ci_high
                row.p_value, row.test, row.verdict, row.level = c.p_value, c.test, c.verdict, c.level
        rows.append(row)
    by_arm = {r.arm: r for r in rows}
    for r in rows:
        r.parts = stacks.get(r.arm, [])
        parts = [by_arm.get(p) for p in r.parts]
        if parts and all(p is not None and p.improvement is not None for p in parts):
            r.parts_sum = sum(p.improvement for p in parts)
    rows.sort(key=lambda r: (r.mean is None, r.mean if r.mean is not None else 0.0))
    board = Board(exp, rows, failed, alpha, looks)
    if len(base_losses) > 1:
        board.baseline_n, _, board.baseline_sigma = stats.describe(list(base_losses.values()))
        arm_ns = [r.n for r in rows if r.arm != BASELINE and r.n]
        if arm_ns:
            board.detectable = stats.minimum_detectable(
                board.baseline_sigma, min(arm_ns), board.baseline_n, board.level
            )
    elif base_losses:
        board.baseline_n = 1
    return board


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


# ---------------------------------------------------------------------------------------------------------
# Rendering.

HEADER = ["run", "n", "test loss", "improvement", "CI", "p", "verdict", "sum of parts"]  # CI: labelled per board


def _f(x: float | None, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _cells(r: Row) -> list[str]:
    name = r.arm + (" (imported)" if r.imported else "")
    n = str(r.n) + (f" +{r.pending} pending" if r.pending else "")
    loss = "—" if r.mean is None else f"{r.mean:.4f}" + (f" ± {r.std:.4f}" if r.std is not None else "")
    if r.arm == BASELINE:
        return [name, n, loss, "—", "", "", "baseline", ""]
    ci = f"[{_f(r.ci_low, signed=True)}, {_f(r.ci_high, signed=True)}]" if r.ci_low is not None else ""
    p = "" if r.p_value is None else (f"{r.p_value:.3f}" if r.p_value >= 0.001 else f"{r.p_value:.1e}")
    parts = f"{_f(r.parts_sum, signed=True)} ({' + '.join(r.parts)})" if r.parts else ""
    return [
        name,
        n,
        loss,
        _f(r.improvement, signed=True),
        ci,
        p + (f" {r.test}" if r.test else ""),
        r.verdict or "",
        parts,
    ]


def columns(b: Board) -> tuple[list[str], list[list[str]]]:
    """Header and cells, without the stack column when nothing in this experiment is stacked."""
    cells = [_cells(r) for r in b.rows]
    header = list(HEADER)
    header[4] = "CI (sequential)" if b.looks else f"{100 * (1 - b.alpha):.4g}% CI"
    if not any(r.parts for r in b.rows):
        return header[:-1], [c[:-1] for c in cells]
    return header, cells


def summary(b: Board) -> list[str]:
    lines = []
    if b.baseline_sigma is not None:
        line = f"baseline σ = {b.baseline_sigma:.4f} over {b.baseline_n} runs"
        if b.detectable is not None:
            line += (
                f"; with these run counts the smallest improvement detected 80% of the time at p < {b.level:.3g}"
                f" is {b.detectable:.4f}"
            )
        lines.append(line)
    elif b.baseline_n == 1:
        lines.append("one baseline run: no noise estimate, every verdict is unverified (add seeds: orch more-seeds)")
    if b.looks:
        levels = sorted({f"{r.level:.3g} ({r.test})" for r in b.rows if r.level is not None and r.test})
        lines.append(
            f"sequential: orch more-seeds looked after every run from {b.looks[0]} to {b.looks[1]} per arm, "
            f"so a verdict needs p < {' or '.join(levels) or f'{b.level:.3g}'} and its CI is at that level; "
            f"over all looks a null intervention is called better or worse with probability α = {b.alpha:g}"
        )
    if b.noise:
        lines.append(
            "noise by source: "
            + ", ".join(f"{vary} σ = {_f(v['sigma'])} (n={v['n']})" for vary, v in sorted(b.noise.items()))
        )
    return lines


def render(boards: list[Board], fmt: str = "rich") -> str | None:
    """Markdown, CSV or JSON as text; rich prints to the terminal itself and returns None."""
    if fmt == "json":
        return json.dumps(
            [
                {**{k: v for k, v in asdict(b).items() if k != "rows"}, "rows": [asdict(r) for r in b.rows]}
                for b in boards
            ],
            indent=2,
        )
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        cols = [
            "n",
            "mean",
            "std",
            "improvement",
            "ci_low",
            "ci_high",
            "p_value",
            "test",
            "verdict",
            "pending",
            "imported",
            "parts_sum",
            "level",
        ]
        w.writerow(["experiment", "arm", *cols])
        for b in boards:
            for r in b.rows:
                w.writerow([b.experiment, r.arm, *[getattr(r, c) for c in cols]])
            for f in b.failed:
                w.writerow([b.experiment, f["arm"], 0, *[""] * 7, f["state"], 0, False, "", ""])
        return out.getvalue()
    if fmt == "markdown":
        parts = []
        for b in boards:
            parts.append(f"### {b.experiment}\n")
            parts += [f"{line}\n" for line in summary(b)]
            if b.rows:
                header, cells = columns(b)
                parts.append("| " + " | ".join(header) + " |")
                parts.append("|" + "---|" * len(header))
                parts += ["| " + " | ".join(c) + " |" for c in cells]
            if b.failed:
                parts.append("\nNot ranked:\n")
                parts += [
                    f"- {f['arm']} (seed {f['seed']}, run {f['run']}): {f['state']} {f['detail']}".rstrip()
                    for f in b.failed
                ]
            parts.append("")
        return "\n".join(parts)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    colour = {stats.BETTER: "green", stats.WORSE: "red", stats.NOISE: "yellow", stats.UNVERIFIED: "dim"}
    for b in boards:
        t = Table(
            title=b.experiment, title_justify="left", caption="\n".join(summary(b)) or None, caption_justify="left"
        )
        header, all_cells = columns(b)
        for h in header:
            t.add_column(h, justify="left" if h in ("run", "verdict", "sum of parts") else "right")
        for r, cells in zip(b.rows, all_cells):
            if r.verdict in colour:
                cells[6] = f"[{colour[r.verdict]}]{cells[6]}[/]"
            t.add_row(*cells, style="bold" if r.arm == BASELINE else None)
        console.print(t)
        for f in b.failed:
            console.print(
                f"  [red]not ranked[/red] {f['arm']} (seed {f['seed']}, run {f['run']}): {f['state']} {f['detail']}"
            )
    return None

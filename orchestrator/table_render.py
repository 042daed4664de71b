"""How a leaderboard is shown: rich on a terminal, markdown, CSV and JSON, with the lines above each board
that say what its numbers and verdicts mean (`orch table`, and the report page's table)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

from orchestrator import multiplicity, stats
from orchestrator.specs import BASELINE
from orchestrator.table import Board, Row

HEADER = ["intervention", "n", "test loss", "improvement", "CI", "p", "verdict", "sum of parts"]  # CI, p: per board
CORRECTION_NAMES = {"holm": "Holm", "bh": "BH", "none": ""}


def _f(x: float | None, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def _cells(r: Row, b: Board) -> list[str]:
    name = r.arm + (" (imported)" if r.imported else "")
    n = str(r.n) + (f" +{r.pending} pending" if r.pending else "")
    loss = "—" if r.mean is None else f"{r.mean:.4f}" + (f" ± {r.std:.4f}" if r.std is not None else "")
    target = []
    if b.target is not None:
        target = ["—" if r.p_target is None else f"{'yes' if r.below_target else 'no'} (p {_p(r.p_target)})"]
    if r.arm == BASELINE:
        return [name, n, loss, "—", "", "", "baseline", *target, ""]
    ci = f"[{_f(r.ci_low, signed=True)}, {_f(r.ci_high, signed=True)}]" if r.ci_low is not None else ""
    p = "" if r.p_adjusted is None else _p(r.p_adjusted)
    test = "" if r.test is None else (f" paired ({r.pairs})" if r.test == "paired" else f" {r.test}")
    verdict = (r.verdict or "") + (", trivial" if r.trivial else "")
    parts = f"{_f(r.parts_sum, signed=True)} ({' + '.join(r.parts)})" if r.parts else ""
    return [name, n, loss, _f(r.improvement, signed=True), ci, p + test, verdict, *target, parts]


def columns(b: Board) -> tuple[list[str], list[list[str]]]:
    """Header and cells, without the stack column when nothing in this experiment is stacked."""
    cells = [_cells(r, b) for r in b.rows]
    header = list(HEADER)
    header[4] = "CI (at each arm's level)" if b.looks or b.family > 1 and b.correction != "none" else "95% CI"
    if header[4] == "95% CI":
        header[4] = f"{100 * (1 - b.alpha):.4g}% CI"
    header[5] = "p" + (f" ({p_method(b)})" if p_method(b) else "")
    if b.target is not None:
        header.insert(7, f"mean < {b.target:g}")
    if not any(r.parts for r in b.rows):
        return header[:-1], [c[:-1] for c in cells]
    return header, cells


def p_method(b: Board) -> str:
    """How the board's p-values were adjusted, as the p column's header says: "Holm, sequential", or ""."""
    corrected = [CORRECTION_NAMES[b.correction]] if b.family > 1 and b.correction != "none" else []
    return ", ".join([*corrected, *(["sequential"] if b.looks else [])])


def summary(b: Board) -> list[str]:
    """The lines above a board: the noise, the corrections, the equivalence margin and what verdicts mean."""
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
    if b.family > 1:
        lines.append(f"p: {multiplicity.DESCRIBED[b.correction].format(m=b.family)}; a verdict needs p < {b.alpha:g}")
    if b.looks:
        lines.append(
            f"sequential: orch more-seeds looked after every run from {b.looks[0]} to {b.looks[1]} per arm, so each "
            f"p is the chance that a null arm shows one as small at any look, and each CI is at its arm's level; "
            f"over all looks a null intervention is called better or worse with probability α = {b.alpha:g}"
        )
    if b.noise:
        lines.append(
            "noise by source: "
            + ", ".join(f"{vary} σ = {_f(v['sigma'])} (n={v['n']})" for vary, v in sorted(b.noise.items()))
        )
    if b.target is not None:
        lines.append(
            f"mean < {b.target:g}: the arm's mean test loss is below {b.target:g} by a one-sided t-test at "
            f"p < {b.target_alpha:g} (the speed-run records' rule); 'no' may mean too few runs"
        )
    if b.rows:
        lines += legend(b)
    return lines


def legend(b: Board) -> list[str]:
    """What the numbers and verdicts mean, at this board's settings."""
    lines = [
        "improvement = baseline − intervention test loss (positive: lower loss); paired (k): a paired t-test on "
        "the k seeds both share, else Welch's t-test"
    ]
    if b.sesoi is not None:
        lines.append(
            f"better / worse: the improvement is not zero (p < {b.alpha:g}); equivalent: it lies within ±{b.sesoi:.4g}"
            f" (δ from {b.sesoi_source}; TOST at the arm's level); trivial: better or worse, but within ±δ; "
            "undecided: neither, so far"
        )
    else:
        lines.append(
            f"better / worse: the improvement is not zero (p < {b.alpha:g}); undecided: the runs cannot tell an "
            "effect from none — set a smallest effect that matters (--sesoi 0.01, or sesoi= in the experiment) "
            "to tell 'no effect beyond δ' (equivalent) from 'too few runs' (undecided)"
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
            "pairs",
            "p_adjusted",
            "p_equivalence",
            "trivial",
            "p_target",
            "below_target",
            "p_improvement",
            "p_improvement_low",
            "p_improvement_high",
        ]
        w.writerow(["experiment", "arm", *cols])
        for b in boards:
            for r in b.rows:
                w.writerow([b.experiment, r.arm, *[getattr(r, c) for c in cols]])
            for f in b.failed:
                failed = dict(n=0, verdict=f["state"], pending=0, imported=False)
                w.writerow([b.experiment, f["arm"], *[failed.get(c, "") for c in cols]])
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
    colour = {
        stats.BETTER: "green",
        stats.WORSE: "red",
        stats.EQUIVALENT: "cyan",
        stats.UNDECIDED: "yellow",
        stats.UNVERIFIED: "dim",
    }
    for b in boards:
        t = Table(
            title=b.experiment, title_justify="left", caption="\n".join(summary(b)) or None, caption_justify="left"
        )
        header, all_cells = columns(b)
        for h in header:
            t.add_column(h, justify="left" if h in ("intervention", "verdict", "sum of parts") else "right")
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

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
    """What the numbers and verdicts mean, at this board's settings: two lines."""
    verdicts = f"verdicts at p < {b.alpha:g}" + (
        f" ({multiplicity.DESCRIBED[b.correction].format(m=b.family)})" if b.family > 1 else ""
    )
    if b.sesoi is not None:
        meaning = (
            f"better/worse: improvement not zero; equivalent: within ±{b.sesoi:.4g} (δ: {b.sesoi_source}; TOST); "
            "trivial: better/worse but within ±δ; undecided: neither yet"
        )
    else:
        meaning = (
            "better/worse: improvement not zero; undecided: cannot tell an effect from none yet (give a smallest "
            "effect that matters, --sesoi 0.01, to tell 'no effect beyond δ' (equivalent) from 'too few runs')"
        )
    return [
        "improvement = baseline − intervention test loss (> 0: lower loss); paired (k): paired t-test on the k "
        "seeds both share, else Welch",
        f"{verdicts}: {meaning}",
    ]


def render(boards: list[Board], fmt: str = "rich", console=None, stats_columns: bool = False) -> str | None:
    """Markdown, blog (markdown in the blog series' shape; `stats_columns` adds CI, p and verdict), CSV or
    JSON as text; rich prints to `console` (default: the terminal) itself and returns None."""
    if fmt == "json":
        return json.dumps(
            [
                {**{k: v for k, v in asdict(b).items() if k != "rows"}, "rows": [asdict(r) for r in b.rows]}
                for b in boards
            ],
            indent=2,
        )
    if fmt == "csv":
        return _csv(boards)
    if fmt == "markdown":
        return _markdown(boards)
    if fmt == "blog":
        return "\n\n".join(_blog(b, stats_columns) for b in boards) + "\n"
    _rich(boards, console)
    return None


CSV_COLUMNS = [
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


def _csv(boards: list[Board]) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["experiment", "arm", *CSV_COLUMNS])
    for b in boards:
        for r in b.rows:
            w.writerow([b.experiment, r.arm, *[getattr(r, c) for c in CSV_COLUMNS]])
        for f in b.failed:
            failed = dict(n=0, verdict=f["state"], pending=0, imported=False)
            w.writerow([b.experiment, f["arm"], *[failed.get(c, "") for c in CSV_COLUMNS]])
    return out.getvalue()


def _failures(b: Board) -> list[str]:
    return [f"{f['arm']} (seed {f['seed']}, run {f['run']}): {f['state']} {f['detail']}".rstrip() for f in b.failed]


def _markdown(boards: list[Board]) -> str:
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
            parts += [f"- {line}" for line in _failures(b)]
        parts.append("")
    return "\n".join(parts)


def _blog(b: Board, stats_columns: bool) -> str:
    """The blog series' table: the baseline first, then the interventions from the highest test loss to the
    lowest (so the improvements grow down the table), numbers right-aligned, three decimals."""
    base = [r for r in b.rows if r.arm == BASELINE and r.mean is not None]
    arms = sorted((r for r in b.rows if r.arm != BASELINE and r.mean is not None), key=lambda r: -r.mean)
    header = ["", "Test set loss", "Improvement vs baseline"]
    align = ["---", "---:", "---:"]
    if stats_columns:
        header += [
            f"{100 * (1 - b.alpha):.4g}% CI" if not p_method(b) else "CI",
            f"p ({p_method(b) or 'raw'})",
            "verdict",
        ]
        align += ["---:", "---:", "---"]
    lines = [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|"]
    for r in base + arms:
        improvement = "-" if r.arm == BASELINE or r.improvement is None else f"{r.improvement:.3f}"
        cells = [r.arm, f"{r.mean:.3f}", improvement]
        if stats_columns:
            ci = f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]" if r.ci_low is not None else ""
            cells += [
                ci,
                "" if r.p_adjusted is None else _p(r.p_adjusted),
                "" if r.arm == BASELINE else r.verdict or "",
            ]
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


VERDICT_COLOURS = {
    stats.BETTER: "green",
    stats.WORSE: "red",
    stats.EQUIVALENT: "cyan",
    stats.UNDECIDED: "yellow",
    stats.UNVERIFIED: "dim",
}


def _rich(boards: list[Board], console=None) -> None:
    """A table per board: the full columns where they fit the terminal, else a compact layout (mean without
    its spread, the interval beside the improvement, the test named in the legend) that fits 80 columns, else
    (long names) a narrow one without the interval. An intervention's name is never truncated."""
    from rich.console import Console
    from rich.measure import Measurement

    console = console or Console()
    for b in boards:
        for layout in ("full", "compact", "narrow"):
            table = _rich_table(b, layout)
            if Measurement.get(console, console.options.update(max_width=10_000), table).maximum <= console.width:
                break
        console.print(table)
        for line in _failures(b):
            console.print(f"  [red]not ranked[/red] {line}")


def _rich_table(b: Board, layout: str):
    from rich import box
    from rich.table import Table

    lines = summary(b)
    compact = layout != "full"
    if compact:
        tests = sorted({f"paired ({r.pairs})" if r.test == "paired" else r.test for r in b.rows if r.test})
        if tests:
            lines.append(
                "tests: " + ", ".join(tests) + f"; {'intervals and ' if layout == 'narrow' else ''}every column: "
                "--format markdown"
            )
    t = Table(
        title=b.experiment,
        title_justify="left",
        caption="\n".join(lines) or None,
        caption_justify="left",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        pad_edge=not compact,
        padding=(0, 0) if layout == "narrow" else (0, 1),
    )
    header, all_cells = columns(b)
    width = max([len(h) for h in header[:1]] + [len(c[0]) for c in all_cells])
    if compact:
        keep = [0, 1, 2, 3, 5, 6] + ([7] if b.target is not None else [])
        header = [header[i] for i in keep]
        header[2], header[3] = "loss", "improvement [CI]" if layout == "compact" else "improv."
        if layout == "narrow":
            header[4] = "p"  # the legend names the correction
        rows = []
        for r, c in zip(b.rows, all_cells):
            loss = "—" if r.mean is None else f"{r.mean:.4f}"
            improvement = c[3]
            if r.ci_low is not None:
                interval = f" [{r.ci_low:+.3f}, {r.ci_high:+.3f}]" if layout == "compact" else ""
                improvement = f"{r.improvement:+.3f}{interval}"
            cells = [c[0], str(r.n), loss, improvement, c[5].split(" ")[0], c[6]]
            if b.target is not None:
                cells.append(c[7].split(" ")[0])
            rows.append(cells)
        all_cells = rows
    for i, h in enumerate(header):
        if i == 0:
            t.add_column(h, no_wrap=True, min_width=width)
        else:
            t.add_column(h, justify="left" if h in ("verdict", "sum of parts") else "right")
    verdict_at = header.index("verdict")
    for r, cells in zip(b.rows, all_cells):
        if r.verdict in VERDICT_COLOURS:
            cells[verdict_at] = f"[{VERDICT_COLOURS[r.verdict]}]{cells[verdict_at]}[/]"
        t.add_row(*cells, style="bold" if r.arm == BASELINE else None)
    return t

"""`orch table`: the improvement-vs-baseline leaderboard, in the shape of the blog series' table.

Arms are ranked by mean test loss over their finished runs; each row shows the number of runs, mean ± std
(sample std over seeds and repeats) and the improvement vs the baseline's mean (positive = lower loss =
better). Runs that failed or diverged are listed below the ranking and never ranked; queued and running runs
are counted so a half-finished study says so.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from orchestrator import queue
from orchestrator.specs import BASELINE


@dataclass
class Row:
    experiment: str
    arm: str
    n: int
    mean: float | None
    std: float | None
    improvement: float | None
    losses: list[float] = field(default_factory=list)
    pending: int = 0


@dataclass
class Board:
    experiment: str
    rows: list[Row]
    failed: list[dict]
    baseline: Row | None


def build(runs: list[tuple[str, str, object]]) -> list[Board]:
    """Group (experiment, arm, run) triples into one board per experiment."""
    by_exp: dict[str, dict[str, list]] = {}
    for exp, arm, run in runs:
        by_exp.setdefault(exp, {}).setdefault(arm, []).append(run)
    boards = []
    for exp, arms in sorted(by_exp.items()):
        rows, failed = [], []
        for arm, rs in arms.items():
            losses = [r.test_loss for r in rs if r.state == queue.SUCCEEDED and r.test_loss is not None]
            pending = sum(r.state in queue.ACTIVE for r in rs)
            for r in rs:
                if r.state in (queue.FAILED, queue.DIVERGED):
                    detail = (r.result or {}).get("diverged_step")
                    failed.append({"arm": arm, "run": r.id, "seed": r.seed, "state": r.state,
                                   "detail": f"diverged at step {detail}" if detail else _last_line(r.error)})
            arr = np.asarray(losses, dtype=float)
            rows.append(Row(exp, arm, len(losses), float(arr.mean()) if len(arr) else None,
                            float(arr.std(ddof=1)) if len(arr) > 1 else None, None, losses, pending))
        baseline = next((r for r in rows if r.arm == BASELINE), None)
        for r in rows:
            if baseline and baseline.mean is not None and r.mean is not None:
                r.improvement = baseline.mean - r.mean
        rows.sort(key=lambda r: (r.mean is None, r.mean if r.mean is not None else 0.0))
        boards.append(Board(exp, rows, failed, baseline))
    return boards


def _last_line(text: str | None) -> str:
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:120] if lines else ""


def _fmt(x: float | None, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _cells(r: Row) -> list[str]:
    improvement = "—" if r.arm == BASELINE else _fmt(r.improvement, signed=True)
    return [r.arm, str(r.n) + (f" (+{r.pending} pending)" if r.pending else ""), _fmt(r.mean, 6),
            _fmt(r.std), improvement]


HEADER = ["run", "n", "test loss (mean)", "std", "improvement vs baseline"]


def render(boards: list[Board], fmt: str = "rich") -> str | None:
    """Markdown, CSV or JSON as text; rich prints to the terminal itself and returns None."""
    if fmt == "json":
        return json.dumps([{"experiment": b.experiment, "rows": [asdict(r) for r in b.rows], "failed": b.failed}
                           for b in boards], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(["experiment", "arm", "n", "mean", "std", "improvement", "pending"])
        for b in boards:
            for r in b.rows:
                w.writerow([b.experiment, r.arm, r.n, r.mean, r.std, r.improvement, r.pending])
            for f in b.failed:
                w.writerow([b.experiment, f["arm"], 0, "", "", "", f["state"]])
        return out.getvalue()
    if fmt == "markdown":
        parts = []
        for b in boards:
            parts.append(f"### {b.experiment}\n")
            parts.append("| " + " | ".join(HEADER) + " |")
            parts.append("|" + "---|" * len(HEADER))
            parts += ["| " + " | ".join(_cells(r)) + " |" for r in b.rows]
            if b.failed:
                parts.append("\nNot ranked:\n")
                parts += [f"- {f['arm']} (seed {f['seed']}, run {f['run']}): {f['state']} {f['detail']}".rstrip()
                          for f in b.failed]
            parts.append("")
        return "\n".join(parts)
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for b in boards:
        t = Table(title=b.experiment, title_justify="left")
        for h in HEADER:
            t.add_column(h, justify="left" if h == "run" else "right")
        for r in b.rows:
            style = "bold" if r.arm == BASELINE else None
            t.add_row(*_cells(r), style=style)
        console.print(t)
        for f in b.failed:
            console.print(f"  [red]not ranked[/red] {f['arm']} (seed {f['seed']}, run {f['run']}): "
                          f"{f['state']} {f['detail']}")
    return None

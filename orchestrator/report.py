"""`orch report`: one experiment as a page to read and pass around — curves, effects and the leaderboard.

    out_dir/index.html          self-contained: the PNGs are inlined as base64 data URIs, so the page still
                                works when mailed or moved alone
    out_dir/train_loss.png      training loss vs tokens: per arm the mean over seeds, a band from min to max
    out_dir/val_loss.png        validation loss vs tokens, the same way
    out_dir/improvement.png     each intervention's improvement vs the baseline with its CI (1 − α, or
                                sequential), by verdict
    out_dir/expert_load.png     only with mixture-of-experts arms: each expert's share of the routing and the
                                saturation over training (trainer/moe.py's moe/* metrics)

The numbers are orchestrator/table.py's, so the page and `orch table` never disagree. Curves come from each
run's metrics.jsonl (trainer/rundir.py); imported runs have only a result, and are left out of the plots.
Under the leaderboard, each arm's greedy completion of its first sample prompt (its samples.json, trainer/sample.py).
With a Tracker the files also go to MLflow, as artifacts of a run named "report" in the MLflow experiment
"EXPERIMENT/reports" (tracking.report_experiment), apart from the training runs.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

import numpy as np

from orchestrator import noise, queries, stats, table_render
from orchestrator import table as tbl
from orchestrator.specs import BASELINE
from orchestrator.states import RunState
from trainer.rundir import read_metrics
from trainer.sample import read_samples

VERDICT_COLOURS = {
    stats.BETTER: "#2e7d32",
    stats.WORSE: "#c62828",
    stats.EQUIVALENT: "#1565c0",
    stats.UNDECIDED: "#9e9e9e",
    stats.UNVERIFIED: "#cfcfcf",
}
PLOTS = {
    "train_loss.png": "Training loss",
    "val_loss.png": "Validation loss",
    "improvement.png": "Improvement vs baseline",
}


def write_report(
    engine,
    experiment: str,
    out_dir: Path,
    options: tbl.Options | None = None,
    tracker=None,
    runs_dir: Path | None = None,
) -> Path:
    """Write index.html and its PNGs for `experiment` into out_dir; return the path of index.html."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker node or in CI; Agg renders PNGs anywhere
    # The noise studies of this experiment (`orch noise`) feed its board's summary, as in `orch table`.
    triples = queries.runs_of(engine, noise.with_studies(engine, [experiment]))
    board = next(
        (b for b in tbl.build(triples, queries.specs(engine), options=options) if b.experiment == experiment), None
    )
    if board is None:
        raise ValueError(f"no runs in experiment {experiment!r}")
    runs = [(arm, run) for exp, arm, run in triples if exp == experiment]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One colour per arm on every plot: the baseline first (always the same blue), then in leaderboard order.
    arms = sorted((r.arm for r in board.rows), key=lambda a: a != BASELINE)  # sorted() is stable
    colours = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    events = _events(runs, runs_dir)
    _curve_plot(out_dir / "train_loss.png", events, "loss", colours, smooth=True, title="Training loss")
    _curve_plot(out_dir / "val_loss.png", events, "val_loss", colours, smooth=False, title="Validation loss")
    _improvement_plot(out_dir / "improvement.png", board)
    plots = dict(PLOTS)
    if _expert_load_plot(out_dir / "expert_load.png", events, colours):
        plots["expert_load.png"] = "Expert load (mixture of experts)"

    index = out_dir / "index.html"
    samples = _greedy_samples(board, runs, runs_dir)
    index.write_text(_page(board, runs, out_dir, samples, plots), encoding="utf-8")  # σ, ±, — whatever the locale
    if tracker is not None:
        tracker.log_report(experiment, [index, *(out_dir / name for name in plots)])
    return index


# ---------------------------------------------------------------------------------------------------------
# Curves.


def _events(runs: list[tuple[str, object]], runs_dir: Path | None) -> dict[str, list[list[dict]]]:
    """arm → the metrics.jsonl events of each of its finished runs that has a run directory."""
    out: dict[str, list[list[dict]]] = {}
    for arm, run in runs:
        # Only the runs the leaderboard ranks: a failed or half-finished curve would drag the mean.
        if run.state != RunState.SUCCEEDED or (run.result or {}).get("imported"):
            continue
        # run_dir is what the worker's heartbeat recorded; it may be relative to that worker's cwd, so
        # fall back to the runs folder we were given.
        candidates = [Path(run.run_dir)] if run.run_dir else []
        candidates += [Path(runs_dir) / run.id] if runs_dir is not None else []
        run_dir = next((d for d in candidates if (d / "metrics.jsonl").exists()), None)
        if run_dir is not None:
            out.setdefault(arm, []).append(read_metrics(run_dir))
    return out


def _series(events: list[dict], key: str, smooth: bool) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((e["tokens"], e[key]) for e in events if e.get(key) is not None and "tokens" in e)
    x, y = (np.array(v, dtype=float) for v in zip(*points)) if points else (np.array([]), np.array([]))
    if smooth and len(y) > 1:
        # EMA over ~1/10 of the run's metric lines, debiased (as TensorBoard does) so the first points are
        # not pulled towards 0; the band then shows seed-to-seed spread rather than step-to-step noise.
        beta = 1 - 2 / (max(1, min(50, len(y) // 10)) + 1)
        s, out = 0.0, np.empty_like(y)
        for i, v in enumerate(y):
            s = beta * s + (1 - beta) * v
            out[i] = s / (1 - beta ** (i + 1)) if beta > 0 else v
        y = out
    return x, y


def _curve_plot(
    path: Path, events: dict[str, list[list[dict]]], key: str, colours: dict[str, str], smooth: bool, title: str
) -> None:
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state to leak between reports

    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    tops = []
    for arm in [a for a in colours if a in events]:  # baseline first, as in the legend of every plot
        series = [s for s in (_series(ev, key, smooth) for ev in events[arm]) if len(s[0])]
        if not series:
            continue
        # Seeds of an arm usually log at the same tokens, but a resumed run may not: put every seed on the
        # token grid they all cover, by linear interpolation, before taking mean, min and max.
        lo, hi = max(x[0] for x, _ in series), min(x[-1] for x, _ in series)
        grid = np.unique(np.concatenate([x for x, _ in series]))
        grid = grid[(grid >= lo) & (grid <= hi)]
        ys = np.array([np.interp(grid, x, y) for x, y in series])
        mean = ys.mean(axis=0)
        ax.plot(
            grid,
            mean,
            color=colours[arm],
            lw=1.8,
            label=f"{arm} ({len(series)} run{'s' * (len(series) > 1)})",
            marker="o" if len(grid) < 20 else None,
            ms=3,
        )
        if len(series) > 1:
            ax.fill_between(grid, ys.min(axis=0), ys.max(axis=0), color=colours[arm], alpha=0.2, lw=0)
        tops.append(mean[min(len(mean) - 1, len(mean) // 10)])
    if tops:
        # The first steps sit near ln(50257) ≈ 10.8 and would squash the part where the arms differ.
        ymin, ymax = ax.get_ylim()
        ax.set_ylim(ymin, min(ymax, max(tops) + 0.1 * (max(tops) - ymin)))
        ax.legend(
            loc="upper right",
            fontsize=9,
            title_fontsize=8,
            title="each seed EMA-smoothed over ~1/10 of its points" if smooth else None,
        )
    else:
        ax.text(
            0.5,
            0.5,
            f"no {key} curves: no finished run with a run directory (imported runs have none)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            wrap=True,
        )
        ax.set(xticks=[], yticks=[])
    ax.set(title=f"{title}: mean over seeds, band from min to max", xlabel="tokens", ylabel=key.replace("_", " "))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _expert_load_plot(path: Path, events: dict[str, list[list[dict]]], colours: dict[str, str]) -> bool:
    """Per mixture-of-experts arm, one panel: each expert's share of the routing slots over training (its
    moe/load_e<i>, the mean over layers; the mean over seeds), the fair share 1/E dashed, and on the right axis
    the saturation (the busiest expert's load over the fair share, averaged over layers: 1 = balanced).
    Returns False, writing nothing, when no arm routes."""
    from matplotlib.figure import Figure

    def keys(arm: str) -> list[str]:
        found = {k for run in events[arm] for e in run for k in e if k.startswith("moe/load_e")}
        return sorted(found, key=lambda k: int(k.removeprefix("moe/load_e")))

    def seed_mean(arm: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        series = [s for s in (_series(run, key, smooth=False) for run in events[arm]) if len(s[0])]
        lo, hi = max(x[0] for x, _ in series), min(x[-1] for x, _ in series)
        grid = np.unique(np.concatenate([x for x, _ in series]))
        grid = grid[(grid >= lo) & (grid <= hi)]
        return grid, np.mean([np.interp(grid, x, y) for x, y in series], axis=0)

    arms = [a for a in colours if a in events and keys(a)]
    if not arms:
        return False
    fig = Figure(figsize=(9, 1.5 + 3 * len(arms)), layout="constrained")
    for ax, arm in zip(fig.subplots(len(arms), 1, squeeze=False)[:, 0], arms):
        experts = keys(arm)
        for i, key in enumerate(experts):
            ax.plot(*seed_mean(arm, key), color=f"C{i % 10}", lw=1.4, label=f"expert {i}")
        ax.axhline(1 / len(experts), color="#444", ls="--", lw=1, label=f"fair share 1/{len(experts)}")
        ax.set(title=f"{arm} ({len(events[arm])} run{'s' * (len(events[arm]) > 1)})", xlabel="tokens")
        ax.set_ylabel("share of routing slots")
        ax.grid(alpha=0.3)
        right = ax.twinx()
        right.plot(*seed_mean(arm, "moe/saturation"), color="black", lw=1.8, ls=":", label="saturation (right)")
        right.set_ylabel("saturation: max load / mean load")
        lines = ax.get_legend_handles_labels()
        extra = right.get_legend_handles_labels()
        ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper right", fontsize=8, ncol=2)
    fig.suptitle("Expert load per arm: each expert's share of the routing (mean over layers and seeds)")
    fig.savefig(path, dpi=110)
    return True


def _improvement_plot(path: Path, board: tbl.Board) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = [r for r in board.rows if r.arm != BASELINE and r.improvement is not None]
    fig = Figure(figsize=(9, 1.6 + 0.5 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    if rows:
        rows = rows[::-1]  # barh draws bottom-up; keep the leaderboard's order top-down
        y = np.arange(len(rows))
        imp = np.array([r.improvement for r in rows])
        # Unverified arms (one run a side) have no interval: a bar without whiskers.
        err = np.array(
            [[r.improvement - r.ci_low, r.ci_high - r.improvement] if r.ci_low is not None else [0, 0] for r in rows]
        ).T
        ax.barh(
            y,
            imp,
            xerr=err,
            capsize=4,
            color=[VERDICT_COLOURS.get(r.verdict, "#cfcfcf") for r in rows],
            edgecolor="#444",
            lw=0.6,
        )
        ax.set_yticks(y, [r.arm for r in rows])
        # Keep 0 inside the axes with a margin, so the line at 0 shows which side of it each interval falls.
        lo, hi = min(0.0, *(imp - err[0])), max(0.0, *(imp + err[1]))
        ax.set_xlim(lo - 0.08 * (hi - lo or 1), hi + 0.08 * (hi - lo or 1))
        seen = list(dict.fromkeys(r.verdict for r in rows[::-1]))
        ax.legend(
            handles=[Patch(color=VERDICT_COLOURS.get(v, "#cfcfcf"), label=v) for v in seen], loc="best", fontsize=9
        )
    else:
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            "no intervention has a finished run beside a finished baseline yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.axvline(0, color="black", lw=1)
    ci = table_render.columns(board)[0][4]
    ax.set(
        title=f"Improvement vs baseline (test loss; > 0 = better) with {ci}",
        xlabel="baseline mean − arm mean test loss",
    )
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------
# The page.

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f4f4; } td { font-variant-numeric: tabular-nums; }
tr.baseline { font-weight: bold; } img { max-width: 100%; display: block; margin: 1em 0; }
.better { color: #2e7d32; } .worse { color: #c62828; } .equivalent { color: #1565c0; } .undecided { color: #777; }
.meta { color: #666; }
"""
# Lets a headless browser (tests/test_report.py) confirm that every plot decoded: naturalWidth is 0 for a
# broken image.
SCRIPT = """
window.addEventListener("load", () => {
  const ok = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok;
});
"""


VERDICT_CLASSES = {
    stats.BETTER: "better",
    stats.WORSE: "worse",
    stats.EQUIVALENT: "equivalent",
    stats.UNDECIDED: "undecided",
}


def _p_improvement(row: tbl.Row) -> str:
    if row.p_improvement is None:
        return ""
    return f"{row.p_improvement:.2f} [{row.p_improvement_low:.2f}, {row.p_improvement_high:.2f}]"


def _page(
    board: tbl.Board,
    runs: list[tuple[str, object]],
    out_dir: Path,
    samples: list | None = None,
    plots: dict[str, str] = PLOTS,
) -> str:
    e = html.escape
    states: dict[str, int] = {}
    for _, run in runs:
        states[run.state] = states.get(run.state, 0) + 1
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>orch report: {e(board.experiment)}"
        f"</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>{e(board.experiment)}</h1>",
        f"<p class=meta>generated {e(when)} · {len(runs)} run{'s' * (len(runs) != 1)} ("
        + ", ".join(f"{n} {e(s)}" for s, n in sorted(states.items()))
        + f") · α = {board.alpha:g}</p>",
    ]
    for name, title in plots.items():
        data = base64.b64encode((out_dir / name).read_bytes()).decode()
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")

    parts.append("<h2>Leaderboard</h2>")
    parts += [f"<p>{e(line)}</p>" for line in table_render.summary(board)]
    if board.rows:
        header, cells = table_render.columns(board)  # the same cells as `orch table --format markdown`, and
        # the probability of improvement (stats.probability_of_improvement), too wide for a terminal
        header = [*header, "P(better on a fresh seed) [95% CI]"]
        cells = [[*cs, _p_improvement(row)] for row, cs in zip(board.rows, cells)]
        parts.append(
            "<table id=leaderboard><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>"
        )
        for row, cs in zip(board.rows, cells):
            cls = VERDICT_CLASSES.get(row.verdict, "")
            cls += " baseline" if row.arm == BASELINE else ""
            parts.append(f"<tr class='{cls.strip()}'>" + "".join(f"<td>{e(c)}</td>" for c in cs) + "</tr>")
        parts.append("</tbody></table>")
    if board.failed:
        parts.append("<h3>Not ranked</h3><ul id=failed>")
        parts += [
            f"<li>{e(f['arm'])} (seed {f['seed']}, run <code>{e(f['run'])}</code>): {e(f['state'])} "
            f"{e(f['detail'] or '')}</li>"
            for f in board.failed
        ]
        parts.append("</ul>")
    parts.append(_samples_section(samples or []))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Samples: the blog series' smoke test, each arm's greedy completion of its first prompt (trainer/sample.py).


def _greedy_samples(board: tbl.Board, runs: list[tuple[str, object]], runs_dir: Path | None) -> list[tuple]:
    """(arm, seed, step, prompt, completion) per arm in leaderboard order, from its succeeded run with the
    lowest seed that wrote samples.json (runs from before orch wrote samples, and imported runs, have none)."""
    found: dict[str, tuple] = {}
    for arm, run in sorted(runs, key=lambda ar: ar[1].seed):
        if arm in found or run.state != RunState.SUCCEEDED:
            continue
        dirs = [Path(run.run_dir)] if run.run_dir else []
        dirs += [Path(runs_dir) / run.id] if runs_dir is not None else []
        samples = next((s for s in map(read_samples, dirs) if s is not None), None)
        first = samples.greedy() if samples is not None else None
        if first is not None:
            found[arm] = (arm, run.seed, samples.step, first.prompt, first.text)
    return [found[r.arm] for r in board.rows if r.arm in found]


def _samples_section(samples: list[tuple]) -> str:
    e = html.escape
    head = "<h2>Samples</h2>"
    if not samples:
        return head + "<p class=meta>No samples: no finished run here wrote samples.json.</p>"
    rows = "".join(
        f"<tr><td>{e(arm)}</td><td>{seed}</td><td>{step}</td>"
        f"<td style='white-space: pre-wrap'><b>{e(prompt)}</b>{e(text)}</td></tr>"
        for arm, seed, step, prompt, text in samples
    )
    return (
        head + "<p class=meta>Each arm's greedy completion of its first sample prompt, by its run with the lowest "
        "seed (all completions: the run's samples.json and its MLflow run; any prompt: <code>orch sample RUN "
        "--prompt TEXT</code>).</p><table id=samples><thead><tr><th>arm</th><th>seed</th><th>step</th>"
        f"<th>completion</th></tr></thead><tbody>{rows}</tbody></table>"
    )

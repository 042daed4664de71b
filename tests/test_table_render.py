"""How a leaderboard reads: at 80 columns (a pipe, a narrow terminal) a compact layout that truncates no
intervention name and wraps no row; the full layout where it fits; the blog series' markdown table."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from orchestrator import runspec, specs, submission, table_render
from orchestrator import table as tbl
from orchestrator.db import connect
from tests.test_stats import simulate

LONG = "schedule-learning-rate-cosine-with-warmup"


@pytest.fixture
def boards(tmp_path):
    eng = connect(f"sqlite:///{tmp_path / 'results.db'}")
    exp = specs.Experiment(
        name="narrow",
        seeds=3,
        sesoi=0.02,
        interventions=[
            specs.Intervention(name="effect", set={"optim.lr": 2e-3}),
            specs.Intervention(name="null", set={"optim.lr": 5e-4}),
            specs.Intervention(name=LONG, set={"optim.lr": 3e-3}),
        ],
    )
    submission.submit(eng, exp, runspec.expand(exp))
    truth = {"baseline": 3.70, "effect": 3.66, "null": 3.70, LONG: 3.62}
    simulate(eng, lambda run, arm: truth[arm])
    from orchestrator import queries

    return tbl.build(queries.runs_of(eng), queries.specs(eng))


def printed(boards, width: int) -> str:
    out = io.StringIO()
    table_render.render(boards, "rich", console=Console(file=out, width=width, color_system=None))
    return out.getvalue()


def test_at_80_columns_no_name_is_truncated_and_no_row_wraps(boards):
    text = printed(boards, 80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for r in boards[0].rows:  # each arm on one line, whole, with its verdict
        [line] = [ln for ln in lines if ln.split()[:2] == [r.arm, str(r.n)]]
        assert r.verdict in line
    assert "improv." in text and "tests: paired (3); intervals and every column" in text  # too long for [CI]
    assert "verdicts at p < 0.05 (Holm across the 3 interventions" in text


def test_short_names_keep_the_interval_at_80_columns(boards):
    for b in boards:
        b.rows = [r for r in b.rows if r.arm != LONG]
    text = printed(boards, 80)
    assert "improvement [CI]" in text and max(len(line) for line in text.splitlines()) <= 80


def test_the_full_layout_where_it_fits(boards):
    text = printed(boards, 200)
    assert "CI (at each arm's level)" in text and "paired (3)" in text and "± " in text
    assert max(len(line) for line in text.splitlines()) <= 200


def test_the_blog_table_puts_the_baseline_first_and_aligns_numbers_right(boards):
    md = table_render.render(boards, "blog")
    lines = md.strip().splitlines()
    assert lines[0] == "|  | Test set loss | Improvement vs baseline |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2].startswith("| baseline | ") and lines[2].endswith(" | - |")
    improvements = [float(line.split("|")[3]) for line in lines[3:]]
    assert improvements == sorted(improvements)  # growing down the table, as the series printed it
    with_stats = table_render.render(boards, "blog", stats_columns=True).splitlines()
    assert with_stats[0].endswith("| p (Holm) | verdict |")
    assert with_stats[-1].endswith(f"| {min(boards[0].rows, key=lambda r: r.mean).verdict} |")

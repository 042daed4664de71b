"""More seeds where the answer is open: add seeds only to arms whose verdict is still undecided and could
still be decided with more runs (stats.could_decide), and to the baseline as far as they need; new runs jump
the queue.

Looking at the verdicts after every added seed is a sequential test, so each call records its looks on the
experiment, whose verdicts from then on are calibrated for them (sequential.py). Each look judges the board
exactly as `orch table` then shows it — the same pairing, correction across arms and equivalence margin
(table.Options) — so a decision printed here is the verdict the table prints. `grow` repeats the call until
no verdict is open, waiting for the workers in between.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from sqlalchemy.engine import Engine

from orchestrator import queries, stats, submission, table_render
from orchestrator import table as tbl
from orchestrator.noise import parent, seed0_configs
from orchestrator.runspec import RunSpec, run_id, seeded
from orchestrator.specs import BASELINE, Looks, SpecError


class Round(NamedTuple):
    """One look at the verdicts: what it queued, per arm why it got more seeds or not, and how many of the
    experiment's runs were still queued or running afterwards."""

    report: submission.SubmitReport
    reasons: dict[str, str]
    active: int = 0


def more_seeds(
    engine: Engine, experiment: str, max_seeds: int, options: tbl.Options | None = None, step: int = 1
) -> Round:
    """Queue more seeds where a verdict is open and could still close (one look), judging the board with
    `options` (table.Options: α, correction, δ) as `orch table` will."""
    options = options or tbl.Options()
    if max_seeds < 2:
        raise SpecError("--max-seeds must be at least 2 (a verdict needs two runs per side)")
    spec = queries.spec(engine, experiment)
    if parent(experiment) is not None:
        raise SpecError(
            f"{experiment!r} is a noise study (baseline repeats, no interventions to decide); "
            f"add repeats with `orch noise {parent(experiment)} --repeats N`, or seeds to "
            f"{parent(experiment)!r} itself"
        )
    runs = queries.runs_of(engine, [experiment])
    if not runs:
        raise SpecError(f"experiment {experiment!r} has no runs yet")
    # This call looks at the verdicts, and may look again after every seed it adds: from now on they are
    # sequential tests (sequential.py), from the runs per arm at the first look up to max_seeds.
    done: dict[str, int] = {}
    for _, arm, r in runs:
        done[arm] = done.get(arm, 0) + tbl.finished(r)
    first = min((n for arm, n in done.items() if arm != BASELINE), default=2)
    spec.looks = Looks(first=max(2, min(first, max_seeds)), last=max_seeds).union(spec.looks)
    submission.submit(engine, spec, [], source=None)  # records the looks; submit keeps any stored ones too
    [board] = [b for b in tbl.build(runs, {experiment: spec}, options=options) if b.experiment == experiment]
    targets: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for row in board.rows:
        if row.arm == BASELINE or row.imported:
            continue
        have = row.n + row.pending
        c = stats.Comparison(
            row.n,
            row.mean,
            row.std,
            row.improvement,
            row.ci_low,
            row.ci_high,
            row.p_value,
            row.test,
            row.verdict or stats.UNVERIFIED,
            row.level or options.alpha,
            row.pairs,
            board.sesoi,
        )
        if row.pending:
            reasons[row.arm] = f"{row.pending} run(s) still pending"
        elif row.verdict in (stats.BETTER, stats.WORSE):
            how = table_render.p_method(board) or "uncorrected"
            reasons[row.arm] = f"decided: {row.verdict} (p = {row.p_adjusted:.3g} < {options.alpha:g}, {how})"
        elif row.verdict == stats.EQUIVALENT:
            reasons[row.arm] = (
                f"decided: equivalent (within ±{board.sesoi:.4g}: TOST p = {row.p_equivalence:.3g} < {row.level:.3g})"
            )
        elif have >= max_seeds:
            reasons[row.arm] = f"at --max-seeds {max_seeds}: {row.verdict}"
        elif not stats.could_decide(c, max_seeds):
            reasons[row.arm] = f"stopped: undecided, and even {max_seeds} seeds could not exclude zero" + (
                f" or show it within ±{board.sesoi:.4g}" if board.sesoi else ""
            )
        else:
            targets[row.arm] = min(max_seeds, max(2, have + step))
            reasons[row.arm] = f"open: {row.verdict}, adding seeds up to {targets[row.arm]}"
    if targets:
        base_have = next((r.n + r.pending for r in board.rows if r.arm == BASELINE), 0)
        targets[BASELINE] = max(base_have, *targets.values())
    templates = seed0_configs(engine, experiment)
    new: list[RunSpec] = []
    for arm, target in targets.items():
        if arm not in templates:
            continue
        for s in range(target):
            cfg, repeat = seeded(templates[arm], spec.vary if spec.vary != "none" else "init", s, 0, 1, source=arm)
            new.append(RunSpec(run_id(cfg, repeat), experiment, arm, cfg, repeat, spec.nodes))
    report = submission.SubmitReport()
    if new:
        spec.seeds = max(spec.seeds, *targets.values())
        report = submission.submit(engine, spec, new, source=None, priority=1)
    return Round(report, reasons, queries.active(engine, [experiment]))


def grow(
    engine: Engine,
    experiment: str,
    max_seeds: int,
    options: tbl.Options | None = None,
    until_decided: bool = False,
    poll_s: float = 10.0,
    on_round: Callable[[Round], None] | None = None,
) -> list[Round]:
    """One look, or with `until_decided` a look after each batch of added runs has finished, until no verdict
    is open or every open arm is at `max_seeds`. `on_round` hears each look before the wait that follows it
    (the workers must be running meanwhile). Returns every look."""
    if not poll_s > 0:
        raise ValueError(f"--poll must be a positive number of seconds, not {poll_s:g}")
    rounds = []
    while True:
        rounds.append(more_seeds(engine, experiment, max_seeds, options))
        if on_round is not None:
            on_round(rounds[-1])
        if not until_decided or not rounds[-1].active:
            return rounds
        while queries.active(engine, [experiment]):
            time.sleep(poll_s)

"""Planning: how many seeds each arm needs to detect a true improvement, from what the database measured
(orchestrator/plan.py: the noncentral-t sample sizes, σ and σ_d, the per-arm level)."""

from __future__ import annotations

from orchestrator import plan as plan_
from orchestrator.api.connection import check_alpha, connect
from orchestrator.api.runs import Db, known_experiments
from orchestrator.plan import ArmPower, Design, Plan, SigmaSource


def plan(
    experiment: str,
    *,
    effect: float,
    power: float = 0.8,
    alpha: float = 0.05,
    sigma: float | None = None,
    correction: str = "holm",
    db: Db = None,
) -> Plan:
    """Seeds per arm to detect a true improvement `effect` (test-loss nats) with `power`, two-sided at level
    `alpha` corrected over the board's interventions (holm | bh | none), paired (every arm on the same
    seeds) and unpaired; σ and σ_d from the experiment's finished runs and noise studies, or `sigma`; and the
    power its current run counts have for that effect."""
    check_alpha(alpha)
    plan_.check(effect, power, alpha, sigma, correction)
    engine = connect(db)
    known_experiments(engine, [experiment])
    measured = plan_.measure(engine, experiment)
    return plan_.make(measured, effect, power, alpha, sigma, correction)


__all__ = ["ArmPower", "Design", "Plan", "SigmaSource", "plan"]

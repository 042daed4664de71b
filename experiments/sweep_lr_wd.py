"""Weight decay λ × learning rate η, searched together (the series found they interact: the Cerebras λ only
made sense with the matching η and a schedule). TPE proposes, the median pruner stops runs whose validation
loss trails the median of earlier trials at the same step.

    orch sweep experiments/sweep_lr_wd.py        # with `orch worker` running anywhere on the same database
    orch sweep status lr-wd; orch sweep plot lr-wd --out sweep-plots; orch sweep confirm lr-wd --seeds 4
"""

from orchestrator.specs import LogUniform, Sweep

sweep = Sweep(
    name="lr-wd",
    preset="tiny",
    base={
        "run.steps": 40,
        "run.log_interval": 5,
        "run.checkpoint_interval": 20,
        "eval.interval": 5,
        "schedule.kind": "cosine",
        "schedule.warmup": 0.05,
        "schedule.min_lr_ratio": 0.1,
    },
    space={"optim.lr": LogUniform(low=3e-4, high=1e-2), "optim.weight_decay": LogUniform(low=1e-3, high=1.0)},
    sampler="tpe",
    pruner="median",
    trials=12,
    in_flight=2,
    seeds=1,
)

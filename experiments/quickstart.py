"""The CPU demo: a tiny baseline and four interventions, two seeds each (10 runs, a few minutes on 2 cores).

orch submit experiments/quickstart.py && orch worker --until-empty && orch table quickstart
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="quickstart",
    description="Blog-series interventions at toy scale: does each beat the baseline beyond seed noise?",
    preset="tiny",
    base={"run.steps": 40, "run.log_interval": 5, "run.checkpoint_interval": 20},
    interventions=[
        Intervention(name="no-dropout", set={"model.dropout": 0.0}),
        Intervention(name="qkv-bias", set={"model.qkv_bias": True}),
        Intervention(name="grad-clip-1.0", set={"optim.grad_clip": 1.0}),
        Intervention(
            name="lr-cosine",
            set={"optim.lr": 3e-3, "schedule.kind": "cosine", "schedule.warmup": 0.05, "schedule.min_lr_ratio": 0.1},
        ),
    ],
    seeds=2,
)

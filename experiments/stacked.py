"""Clipping + no dropout + LR schedule + wd 0.01 together (published: 3.577761, improvement 0.1138,
far below the 0.202 sum of the four parts' improvements)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="stacked",
    preset="gpt2-small",
    interventions=[
        Intervention(name="stacked", set={"optim.grad_clip": 3.5, "model.dropout": 0.0, "optim.lr": 1.4e-3,
                                          "schedule.kind": "cosine", "schedule.warmup": 0.05,
                                          "schedule.min_lr_ratio": 0.1, "optim.weight_decay": 0.01}),
    ],
)

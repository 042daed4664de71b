"""Clipping + no dropout + LR schedule + wd 0.01, each alone and stacked (published: the stack improved
0.1138, far below the 0.202 sum of its parts' improvements; `orch table stacked` shows both side by side)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="stacked",
    preset="gpt2-small",
    interventions=[
        Intervention(name="clip-3.5", set={"optim.grad_clip": 3.5}),
        Intervention(name="no-dropout", set={"model.dropout": 0.0}),
        Intervention(
            name="cosine-1.4e-3",
            set={"optim.lr": 1.4e-3, "schedule.kind": "cosine", "schedule.warmup": 0.05, "schedule.min_lr_ratio": 0.1},
        ),
        Intervention(name="wd-0.01", set={"optim.weight_decay": 0.01}),
        Intervention(name="stacked", stack=["clip-3.5", "no-dropout", "cosine-1.4e-3", "wd-0.01"]),
    ],
)

"""Part 32e: 5% linear warmup, cosine decay to 10% of a 1.4e-3 peak (DeepSeek's η_opt for this compute).

Published: 3.601917 vs baseline 3.691526.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="lr-schedule",
    preset="gpt2-small",
    interventions=[
        Intervention(
            name="cosine-1.4e-3",
            set={"optim.lr": 1.4e-3, "schedule.kind": "cosine", "schedule.warmup": 0.05, "schedule.min_lr_ratio": 0.1},
        ),
    ],
)

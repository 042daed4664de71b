"""Part 32e: the learning rate raised to 1.4e-3 (DeepSeek's η_opt for this compute), constant, then with 5%
linear warmup and cosine decay to 10% of that peak (seed repo runs 8xa100m40-update-learning-rate and
8xa100m40-schedule-learning-rate). The schedule counts steps as the seed repo's PyTorch schedulers do
(schedule.convention=torch, trainer/optim.py).

Published: 3.601917 (cosine-1.4e-3) vs baseline 3.691526.
"""

from orchestrator.specs import Experiment, Intervention

COSINE = {
    "schedule.kind": "cosine",
    "schedule.warmup": 0.05,
    "schedule.min_lr_ratio": 0.1,
    "schedule.convention": "torch",
}

experiment = Experiment(
    name="lr-schedule",
    preset="gpt2-small",
    interventions=[
        Intervention(name="lr-1.4e-3", set={"optim.lr": 1.4e-3}),
        Intervention(name="cosine-1.4e-3", set={"optim.lr": 1.4e-3, **COSINE}),
    ],
)

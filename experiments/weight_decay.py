"""Part 32f: weight decay 0.01 (GPT-2) and 0.33724 (Cerebras-derived, λ = B / (η·τ·D)), and the Cerebras λ
with the series' schedule, at the baseline's η and at 1.4e-3 (seed repo runs 8xa100m40-weight-decay-gpt2,
-weight-decay-cerebras, -weight-decay-cerebras-scheduling-learning-rate and
-weight-decay-cerebras-scheduling-and-increasing-learning-rate).

Published: 3.642940 (0.01) and 3.813856 (0.33724) vs baseline 3.691526 (0.1).
"""

from orchestrator.specs import Experiment, Intervention

# 5% warmup, cosine to 10% of the peak, counted as the seed repo's PyTorch schedulers count (trainer/optim.py).
COSINE = {
    "schedule.kind": "cosine",
    "schedule.warmup": 0.05,
    "schedule.min_lr_ratio": 0.1,
    "schedule.convention": "torch",
}

experiment = Experiment(
    name="weight-decay",
    preset="gpt2-small",
    interventions=[
        Intervention(name="wd-0.01", set={"optim.weight_decay": 0.01}),
        Intervention(name="wd-0.33724", set={"optim.weight_decay": 0.33724}),
        Intervention(name="wd-0.33724-cosine-4e-4", set={"optim.weight_decay": 0.33724, **COSINE}),
        Intervention(
            name="wd-0.33724-cosine-1.4e-3", set={"optim.weight_decay": 0.33724, "optim.lr": 1.4e-3, **COSINE}
        ),
    ],
)

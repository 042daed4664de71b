"""Part 32f: weight decay 0.01 (GPT-2) and 0.33724 (Cerebras-derived, λ = B / (η·τ·D)).

Published: 3.642940 (0.01) and 3.813856 (0.33724) vs baseline 3.691526 (0.1).
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="weight-decay",
    preset="gpt2-small",
    interventions=[
        Intervention(name="wd-0.01", set={"optim.weight_decay": 0.01}),
        Intervention(name="wd-0.33724", set={"optim.weight_decay": 0.33724}),
    ],
)

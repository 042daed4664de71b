"""Full fp32 (TF32 matmuls kept, as in the series) instead of fp16 AMP (published: 3.678968 vs 3.691526)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="fp32-vs-amp",
    preset="gpt2-small",
    interventions=[
        Intervention(name="fp32", set={"precision.amp": "fp32"}),
        Intervention(name="bf16", set={"precision.amp": "bf16"}),
    ],
)

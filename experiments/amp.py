"""Full fp32 instead of fp16 AMP (published: 3.678968 vs baseline 3.691526), and bf16.

The series' no-AMP run (seed repo run 8xa100m80-no-amp) was strict fp32: its training repo switches TF32 on
only together with AMP (ddp_train.py: set_float32_matmul_precision("high") under `if use_amp`), so `fp32`
turns TF32 off too. `fp32-tf32` keeps TF32 matmuls, to tell the two apart.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="fp32-vs-amp",
    preset="gpt2-small",
    interventions=[
        Intervention(name="fp32", set={"precision.amp": "fp32", "precision.tf32": False}),
        Intervention(name="fp32-tf32", set={"precision.amp": "fp32", "precision.tf32": True}),
        Intervention(name="bf16", set={"precision.amp": "bf16"}),
    ],
)

"""Part 32b: gradient clipping at max norm 3.5 (published: 3.678317 vs baseline 3.691526)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="gradient-clipping",
    preset="gpt2-small",
    interventions=[Intervention(name="clip-3.5", set={"optim.grad_clip": 3.5})],
)

"""Part 32d: bias on the Q, K and V projections (published: 3.669385 vs baseline 3.691526)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="qkv-bias",
    preset="gpt2-small",
    interventions=[Intervention(name="qkv-bias", set={"model.qkv_bias": True})],
)

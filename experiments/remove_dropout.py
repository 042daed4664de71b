"""Part 32c: dropout 0.1 → 0 at every site (published: 3.641282 vs baseline 3.691526)."""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="remove-dropout",
    preset="gpt2-small",
    interventions=[Intervention(name="no-dropout", set={"model.dropout": 0.0})],
)

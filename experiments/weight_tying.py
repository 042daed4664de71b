"""Part 32g: tie the output head to the token embedding (published: 3.874305 vs baseline 3.691526).

With the baseline's PyTorch-default initialisation the shared tensor starts as nn.Embedding's N(0, 1),
far larger than a Linear head's init; `tied-gpt2-init` separates that effect from tying itself.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="weight-tying",
    preset="gpt2-small",
    interventions=[
        Intervention(name="tied", set={"model.tie_weights": True}),
        Intervention(name="tied-gpt2-init", set={"model.tie_weights": True, "model.init": "gpt2"}),
    ],
)

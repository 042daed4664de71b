"""The batch size, as the seed repo's first runs varied it: the baseline trained on whichever machine was
rented, each with the largest micro-batch that fitted and no gradient accumulation, so the global batch was
8 GPUs × that micro-batch, with the learning rate left at 4e-4 and the token budget at 3,260,190,720 (rounded
up to whole steps). These were batch-size interventions, not hardware variants:

    batch-104  8xa100m40   8 × 13      batch-224  8xa100m80    8 × 28
    batch-216  8xh100m80   8 × 27      batch-512  8xb200m160   8 × 64
    batch-6    original    1 × 6: the first, single-GPU (non-DDP) run, 530,630 steps

The seed repo seeded nothing before February 2026, so those runs' initialisations were unseeded draws; here
they take the baseline's seed 42 like every other arm.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="batch-size",
    preset="gpt2-small",
    interventions=[
        Intervention(name=f"batch-{sequences}", set={"run.batch_size": sequences})
        for sequences in (104, 216, 224, 512, 6)
    ],
)

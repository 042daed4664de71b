"""The seed repo's run for a 6 GB GPU (1xgtx1660-stacked-interventions, and its clone on an RTX 3090,
1xrtx3090-stacked-interventions-1xgtx1660-clone): a GPT of 8 layers, 512 wide, 8 heads and a 512-token
context (76,933,120 parameters), trained for 20 tokens per parameter (1,538,662,400 tokens, 46,957 steps of
64 sequences: micro-batch 4 × 16 accumulation steps there), with the series' stacked interventions: clipping
at 3.5, no dropout, 5% warmup and cosine decay to 10% of 1.4e-3 (counted as the seed repo's PyTorch schedulers
count), weight decay 0.01.

The seed repo trained only `stacked` at this size; the baseline arm (the series' baseline training at the same
size) is there so that `orch table small-model` can say what the stack is worth here.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="small-model",
    preset="gpt2-small",
    base={
        "model.n_layer": 8,
        "model.n_embd": 512,
        "model.n_head": 8,
        "model.context_length": 512,
        "run.batch_size": 64,
        "run.tokens": 1_538_662_400,
    },
    interventions=[
        Intervention(
            name="stacked",
            set={
                "optim.grad_clip": 3.5,
                "model.dropout": 0.0,
                "optim.lr": 1.4e-3,
                "schedule.kind": "cosine",
                "schedule.warmup": 0.05,
                "schedule.min_lr_ratio": 0.1,
                "schedule.convention": "torch",
                "optim.weight_decay": 0.01,
            },
        ),
    ],
)

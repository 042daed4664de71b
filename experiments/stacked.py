"""Clipping + no dropout + LR schedule + wd 0.01, each alone and stacked (published: the stack improved
0.1138, far below the 0.202 sum of its parts' improvements; `orch table stacked` shows both side by side).

The seed repo's three stacks: 8xa100m40-stacked-interventions-1 (`stacked`), -2 (the same with QKV bias,
`stacked-qkv-bias`) and -3 (weight decay left at 0.1, `stacked-wd-0.1`). Its single-GPU runs
1xrtx3090-stacked-interventions and -poppy are `stacked` again: the same config, with gradient accumulation
on other hardware (micro-batch 6 × 16 steps; a micro-batch size is not part of what is trained).
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="stacked",
    preset="gpt2-small",
    interventions=[
        Intervention(name="clip-3.5", set={"optim.grad_clip": 3.5}),
        Intervention(name="no-dropout", set={"model.dropout": 0.0}),
        Intervention(
            name="cosine-1.4e-3",
            set={
                "optim.lr": 1.4e-3,
                "schedule.kind": "cosine",
                "schedule.warmup": 0.05,
                "schedule.min_lr_ratio": 0.1,
                "schedule.convention": "torch",  # as the seed repo's PyTorch schedulers count steps
            },
        ),
        Intervention(name="wd-0.01", set={"optim.weight_decay": 0.01}),
        Intervention(name="qkv-bias", set={"model.qkv_bias": True}),
        Intervention(name="stacked", stack=["clip-3.5", "no-dropout", "cosine-1.4e-3", "wd-0.01"]),
        Intervention(name="stacked-qkv-bias", stack=["stacked", "qkv-bias"]),
        Intervention(name="stacked-wd-0.1", stack=["clip-3.5", "no-dropout", "cosine-1.4e-3"]),
    ],
)

"""Mixture of experts on GPT-2 small, the shape of the seed repo's runs (gpjt/ddp-base-model-from-scratch,
runs/1xrtx3090-moe-no-balancing and runs/1xrtx3090-moe-balancing-first-cut): 6 experts per block, 2 active per
token, on its stacked-interventions recipe (no dropout, clipping at 3.5, weight decay 0.01, lr 1.4e-3 with 5%
warmup and cosine decay to a tenth), 96 sequences per step. The baseline is that recipe dense, the
`stacked` arm of experiments/stacked.py (the same runs). trainer/moe.py has the formulas.

- moe-6x2: no load balancing (the seed's moe-no-balancing).
- moe-6x2-aux: the Switch Transformer / GShard auxiliary loss at Switch's α = 0.01 (the balancing the seed's
  notebook derives and its "balancing-first-cut" run tried).
- moe-6x2-bias: DeepSeek-V3's loss-free balancing (γ = 0.001), not a seed run: the alternative without a loss term.

Differs from the seed: the router runs in float32 under fp16 autocast (Switch's selective precision) and ties break
to the lower expert index (the seed: torch.topk's unspecified pick); the seed's balancing code and α are not in
its repo (that run's model.json equals the unbalanced one's), so α and f's normalisation (over slots, not tokens:
the seed notebook's aux is k = 2 times this one) are Switch's and DeepSeek-V2's. The seed's micro-batches were
3 sequences (1 × RTX 3090, 32 accumulation steps). The trainer picks them elsewhere ('auto'), except in the aux
arm: its loss is per forward pass, so the config requires a fixed size there, and it takes the seed's 3.
"""

from orchestrator.specs import Experiment, Intervention

MOE = {"model.moe.experts": 6, "model.moe.top_k": 2}

experiment = Experiment(
    name="moe",
    preset="gpt2-small",
    base={
        "model.dropout": 0.0,
        "optim.grad_clip": 3.5,
        "optim.weight_decay": 0.01,
        "optim.lr": 1.4e-3,
        "schedule.kind": "cosine",
        "schedule.warmup": 0.05,
        "schedule.min_lr_ratio": 0.1,
        "schedule.convention": "torch",  # as the seed repo's PyTorch schedulers count steps
    },
    interventions=[
        Intervention(name="moe-6x2", set=MOE, description="6 experts, top-2, no balancing"),
        Intervention(
            name="moe-6x2-aux",
            set={**MOE, "model.moe.balance": "aux", "model.moe.aux_coef": 0.01, "run.micro_batch_size": 3},
            description="Switch/GShard auxiliary loss, α = 0.01",
        ),
        Intervention(
            name="moe-6x2-bias",
            set={**MOE, "model.moe.balance": "bias", "model.moe.bias_rate": 0.001},
            description="DeepSeek-V3 loss-free balancing, γ = 0.001",
        ),
    ],
)

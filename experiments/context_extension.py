"""A 3,072-token context: trained from scratch (the seed repo's run), or extended from the 1,024 baseline.

The seed repo's "1xrtx3090-context-extension" run is its stacked-interventions run (no dropout, clipping at
3.5, weight decay 0.01, peak LR 1.4e-3 with 5% warmup and cosine decay to 10%) at a 3,072-token context,
trained from scratch on 3,291,648,000 tokens: 96 sequences per step (micro-batch 1 × 96 accumulation steps
on one RTX 3090; run.micro_batch_size=auto finds what fits here), 11,162 steps, its budget rounded up to whole
steps as that repo does. The baseline here is the same stack at 1,024 tokens (experiments/stacked.py's
"stacked" arm, so the two files share its runs).

- ctx-3072: the seed repo's run.
- extend-3072: the baseline's final weights (run.init_from: the baseline run of the same seed, which it waits
  for), its position table stretched to 3,072 rows by linear interpolation (run.init_positions, Position
  Interpolation, Chen et al. 2023), then 1,000 steps at 3,072 tokens (PI adapted LLaMA within ~1,000 steps)
  with a fresh optimizer, at the baseline's final LR (1.4e-4) and schedule shape, on the tokens after those
  the baseline read (data.start_train_token), so it sees no token twice. Its comparison with the baseline is
  of a model trained 9% longer (3.26B + 0.29B tokens), which `orch table` does not correct for.

Every arm is tested on the same tokens (eval.test_tokens): the baseline's 3,200 × 6 × 1,024 = 19,660,800 test
tokens are 6,400 windows of 3,072, whose targets are the very same tokens, each predicted from up to 3,071
tokens before it instead of up to 1,023. (The seed repo's test_loss.py kept 3,200 × 6 sequences, 3× the
tokens, so its published number is not comparable with these.)

The dependent arm is submitted with the others; it stays queued until its baseline run has succeeded.
By hand, from any finished run: --set run.init_from=RUN_ID (or a run directory or checkpoint file).
Like every gpt2-small file, it needs FineWeb (`python -m trainer.prepare fineweb --out DIR`, data.path=DIR);
`orch submit experiments/context_extension.py --dry-run --no-check-data` shows its runs without it.
"""

from orchestrator.specs import Experiment, Intervention

STACK = {
    "optim.grad_clip": 3.5,
    "model.dropout": 0.0,
    "optim.lr": 1.4e-3,
    "schedule.kind": "cosine",
    "schedule.warmup": 0.05,
    "schedule.min_lr_ratio": 0.1,
    "schedule.convention": "torch",  # as the seed repo's PyTorch schedulers count steps (experiments/stacked.py)
    "optim.weight_decay": 0.01,
    # The test slice in tokens, the same for every arm: at 1,024 it is the preset's 3,200 × 6 sequences (so the
    # baseline keeps its run id), at 3,072 it is 6,400 windows over the very same target tokens.
    "eval.test_tokens": 3200 * 6 * 1024,
}
BASELINE_TOKENS = 33_165 * 96 * 1024  # what the baseline reads: 3,260,190,720 rounded up to whole steps
LONG = {"model.context_length": 3072}

experiment = Experiment(
    name="context-extension",
    description="3,072-token context: from scratch (seed repo) vs extended from the 1,024 baseline",
    preset="gpt2-small",
    base=STACK,
    interventions=[
        Intervention(name="ctx-3072", set={**LONG, "run.tokens": 3_291_648_000}),
        Intervention(
            name="extend-3072",
            init_from="baseline",
            set={
                **LONG,
                "run.init_positions": "interpolate",
                "run.tokens": 1000 * 96 * 3072,
                "optim.lr": 1.4e-4,
                "data.start_train_token": BASELINE_TOKENS,
            },
        ),
    ],
)

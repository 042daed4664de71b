"""Modern architecture switches on the GPT-2-small baseline, each alone and all stacked (trainer/model.py).

- rope: rotary position embeddings instead of learned positions (Su et al. 2021, RoFormer; θ = 10000).
- rmsnorm: RMSNorm instead of LayerNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization").
- swiglu: SwiGLU MLP of width 8d/3 = 2048, the GELU MLP's weight count exactly (Shazeer 2020, "GLU Variants
  Improve Transformer").
- no-bias: no bias in any linear layer or norm (PaLM, LLaMA); the baseline has no QKV bias already.
- qk-norm: RMSNorm of each head's q and k (Dehghani et al. 2023, ViT-22B; OLMo 2, Groeneveld et al. 2024).
- softcap-30: output logits 30·tanh(logits/30) (Gemma 2 Team 2024; modded-nanogpt uses 15 to 30).
- modern: all six together, the LLaMA-like stack (as the `stacked` experiment showed, expect less than the sum).

None of these models can be exported to a Hugging Face GPT-2 checkpoint: GPT-2 has none of these switches.
"""

from orchestrator.specs import Experiment, Intervention

experiment = Experiment(
    name="modern",
    preset="gpt2-small",
    interventions=[
        Intervention(name="rope", set={"model.position": "rope"}),
        Intervention(name="rmsnorm", set={"model.norm": "rmsnorm"}),
        Intervention(name="swiglu", set={"model.mlp": "swiglu"}),
        Intervention(name="no-bias", set={"model.bias": False}),
        Intervention(name="qk-norm", set={"model.qk_norm": True}),
        Intervention(name="softcap-30", set={"model.logit_softcap": 30.0}),
        Intervention(name="modern", stack=["rope", "rmsnorm", "swiglu", "no-bias", "qk-norm", "softcap-30"]),
    ],
)

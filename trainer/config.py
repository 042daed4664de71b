"""TrainConfig: the one typed description of a training run.

Everything a run does is decided here and nowhere else, so that two runs with equal configs are the same
experiment and a run's identity can be a hash of its resolved config (trainer/identity.py says what counts).
Unknown keys and impossible values are errors whose message names the key and says how to fix it: a mistake is
fixed from one line of output, before any training time is spent on it. The presets, `--set` overrides and
loading from a file are trainer/presets.py's.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ConfigError(ValueError):
    """A config that cannot run, with a message that says which key and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class MoEConfig(Section):
    """Mixture of experts in place of each block's MLP (trainer/moe.py has the formulas and their papers).
    experts=0 is the dense model, and then every other key must stay at its default."""

    experts: int = Field(0, ge=0, description="experts per block, each an MLP of model.mlp's shape; 0 = dense")
    top_k: int = Field(2, ge=1, description="experts each token is routed to (softmax over their k logits)")
    balance: Literal["none", "aux", "bias"] = Field(
        "none", description="none | aux: Switch/GShard auxiliary loss | bias: DeepSeek-V3 loss-free bias"
    )
    aux_coef: float = Field(0.01, gt=0, description="α of the auxiliary loss (Switch Transformer: 0.01)")
    bias_rate: float = Field(0.001, gt=0, description="γ, the bias update per step (DeepSeek-V3: 0.001)")
    z_loss: float = Field(0.0, ge=0, description="router z-loss coefficient (ST-MoE: 0.001); 0 = off")
    capacity_factor: float | None = Field(
        None, gt=0, description="slots per expert = factor·k·tokens/experts, the rest dropped; null = dropless"
    )

    @model_validator(mode="after")
    def _consistent(self) -> MoEConfig:
        fields, problems = type(self).model_fields, []
        changed = [k for k in fields if k != "experts" and getattr(self, k) != fields[k].default]
        if self.experts == 0:
            problems += [
                f"model.moe.{k} applies only to a mixture of experts; set model.moe.experts (e.g. 6) "
                f"or leave {k} at {fields[k].default!r}"
                for k in changed
            ]
        elif self.experts == 1:
            problems.append("model.moe.experts=1 is the dense MLP behind a router; use 0 (dense) or at least 2")
        elif self.top_k > self.experts:
            problems.append(
                f"model.moe.top_k ({self.top_k}) exceeds model.moe.experts ({self.experts}): a token cannot "
                "choose more experts than there are; lower top_k or raise experts"
            )
        if self.experts and self.top_k < 2:
            problems.append(
                "model.moe.top_k=1: the softmax over one chosen logit is always 1, so the router would get no "
                "gradient from the loss (the seed repo refuses it too); use top_k >= 2"
            )
        for key, mode in (("aux_coef", "aux"), ("bias_rate", "bias")):
            if self.experts and key in changed and self.balance != mode:
                problems.append(f"model.moe.{key} applies only with model.moe.balance={mode}; set both or neither")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelConfig(Section):
    vocab_size: int = Field(50257, ge=1, description="GPT-2 BPE has 50257 tokens")
    # The embedding and output head rounded up to a multiple of this many rows (64: 50,257 -> 50,304), so the
    # head's matmul gets tensor-core-friendly shapes (nanoGPT's "~25% faster" vocab padding). The extra rows
    # start at zero, their logits are dropped before the loss and sampling, so they never get a gradient:
    # losses are those of the unpadded model (tests/test_model.py proves it) and parameter counts exclude them.
    pad_vocab: int = Field(1, ge=1, le=4096, description="round the vocabulary up to a multiple of this (1 = off)")
    context_length: int = Field(1024, ge=2, description="tokens per sequence")
    n_embd: int = Field(768, ge=1)
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    # One dropout rate for every site; the three overrides let an intervention touch one site only.
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    dropout_embed: float | None = Field(None, ge=0.0, lt=1.0, description="after token+position embedding")
    dropout_attn: float | None = Field(None, ge=0.0, lt=1.0, description="on the attention weights")
    dropout_resid: float | None = Field(None, ge=0.0, lt=1.0, description="on each residual branch")
    qkv_bias: bool = False
    tie_weights: bool = False
    # "pytorch": nn.Linear / nn.Embedding defaults, as Raschka's model (and so the blog baseline) does.
    # "gpt2": N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer) (GPT-2 paper, section 2.3; nanoGPT).
    init: Literal["pytorch", "gpt2"] = "pytorch"
    layer_norm_eps: float = Field(1e-5, gt=0, description="epsilon of every norm: LayerNorm, RMSNorm, QK-norm")
    # Modern switches (trainer/model.py says what each does and where it comes from). Each default is GPT-2's
    # behaviour, so a config that leaves them alone is the series' model, bit for bit.
    position: Literal["learned", "rope"] = Field("learned", description="learned absolute positions, or RoPE")
    rope_base: float = Field(10000.0, gt=1, description="RoPE's θ (RoFormer: 10000); only with position=rope")
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="swiglu: hidden width 8d/3 rounded to a multiple of 64")
    # model.bias covers every linear layer and norm except the QKV projection, which has its own switch
    # (the series' baseline: biases everywhere but QKV). bias=false with qkv_bias=true is refused below:
    # "no biases anywhere" and "bias on QKV" cannot both hold.
    bias: bool = Field(True, description="biases on linear layers and LayerNorms (QKV: model.qkv_bias)")
    qk_norm: bool = Field(False, description="RMSNorm of each head's q and k before attention")
    logit_softcap: float | None = Field(None, gt=0, description="output logits become cap·tanh(logits/cap)")
    moe: MoEConfig = MoEConfig()  # mixture of experts in place of each MLP; dense by default

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}"
            )
        if not self.bias and self.qkv_bias:
            raise ValueError(
                "model.bias=false (no biases anywhere) contradicts model.qkv_bias=true; "
                "set model.qkv_bias=false, or model.bias=true for biases everywhere but where qkv_bias says"
            )
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"model.position=rope rotates pairs of dimensions, so the head width model.n_embd / "
                f"model.n_head ({self.n_embd // self.n_head}) must be even; change model.n_head"
            )
        if self.position != "rope" and self.rope_base != ModelConfig.model_fields["rope_base"].default:
            raise ValueError(
                f"model.rope_base ({self.rope_base}) applies only with model.position=rope; "
                "set model.position=rope or leave model.rope_base at 10000"
            )
        return self

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab) * self.pad_vocab

    def site_dropout(self, site: Literal["embed", "attn", "resid"]) -> float:
        override = getattr(self, f"dropout_{site}")
        return self.dropout if override is None else override


class DataConfig(Section):
    path: str = Field("data/embedded", description="a directory written by `python -m trainer.prepare`")
    # The series read FineWeb in order, never shuffled. "shuffled" permutes sequences with data.seed, so
    # data order can be varied independently of initialisation (run.seed).
    order: Literal["sequential", "shuffled"] = "sequential"
    seed: int = Field(0, ge=0, description="data-order seed; used when order='shuffled'")
    # The seed repo's train.json keys of the same names (its "dataset" is a Hugging Face id, e.g.
    # gpjt/fineweb-gpt2-tokens). The name is checked, never merely recorded: a run that names a dataset refuses
    # a directory whose meta.json says it holds another, so a stored config never claims data it did not read.
    dataset: str | None = Field(
        None,
        description="the dataset data.path must hold, as its meta.json names it ('dataset', else 'source'); "
        "checked before training; null = whatever data.path holds",
    )
    start_train_token: int = Field(0, ge=0, description="tokens of the train split skipped before training reads")
    start_val_token: int = Field(0, ge=0, description="tokens of the val split skipped before the validation slice")


class OptimConfig(Section):
    lr: float = Field(4e-4, gt=0, description="peak learning rate η")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay λ")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    # Which tensors are decayed. The series decayed everything (torch.optim.AdamW(model.parameters(), ...));
    # nanoGPT / GPT-2 practice decays only matrices.
    decay_biases: bool = True
    decay_norms: bool = True
    decay_embeddings: bool = True
    grad_clip: float | None = Field(None, gt=0, description="max global L2 grad norm; null = no clipping")
    fused: bool | None = Field(None, description="fused AdamW kernel; null = on CUDA only")


class ScheduleConfig(Section):
    kind: Literal["constant", "cosine", "linear", "wsd"] = "constant"
    warmup: float = Field(0.0, ge=0, le=1, description="fraction of steps in linear warmup (0.05 = 5%)")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in steps; overrides schedule.warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of the decay, as a fraction of optim.lr")
    decay: float = Field(0.2, gt=0, le=1, description="wsd only: fraction of steps in the final decay")
    # How a schedule counts its steps (trainer/optim.py). "orch", nanoGPT's: warmup from peak/warmup up to the
    # peak at step warmup-1, round(warmup·steps) warmup steps, the decay at min_lr on the last step. "torch",
    # the seed repo's (ddp_train.py: SequentialLR of LinearLR(start_factor=1e-5) over floor(warmup·steps)
    # steps, then CosineAnnealingLR(T_max=steps-warmup)): warmup from 1e-5·peak, the peak at step warmup,
    # min_lr one step after the last. The two differ by a step or so, enough that no run is the other's.
    convention: Literal["orch", "torch"] = Field(
        "orch", description="orch (nanoGPT's step counting) | torch (the seed repo's PyTorch schedulers)"
    )

    @model_validator(mode="after")
    def _wsd_fits(self) -> ScheduleConfig:
        if self.kind == "wsd" and self.warmup_steps is None and self.warmup + self.decay > 1:
            raise ValueError(
                f"schedule.warmup ({self.warmup}) + schedule.decay ({self.decay}) exceed the whole run; "
                "lower one so that they sum to at most 1"
            )
        if self.convention == "torch" and self.kind not in ("constant", "cosine"):
            raise ValueError(
                f"schedule.convention=torch is the seed repo's warmup + cosine, not defined for "
                f"schedule.kind={self.kind}; use kind constant or cosine, or convention orch"
            )
        return self


class PrecisionConfig(Section):
    # fp16 autocast uses a gradient scaler; bf16 needs none; fp32 is "full fp32, no AMP".
    amp: Literal["fp32", "fp16", "bf16"] = "fp16"
    tf32: bool = Field(True, description="TF32 tensor-core matmuls for fp32 ops (CUDA only)")
    compile: bool = Field(False, description="torch.compile the model")


class EvalConfig(Section):
    interval: int = Field(0, ge=0, description="validation loss every N steps; 0 = only at the end")
    val_sequences: int = Field(512, ge=1)
    # The blog's test set: 3,200 batches × 6 sequences × 1,024 tokens of the held-out split.
    test_sequences: int | None = Field(3200 * 6, ge=1, description="test windows of model.context_length tokens")
    # A longer context keeps the test *tokens*, not the sequence count: n windows of T tokens predict tokens
    # 1 … n·T of the test split, so runs with equal n·T are scored on the same targets whatever their context
    # (the seed repo's test_loss.py kept 3,200 × 6 sequences, 3× the tokens at 3,072). experiments/ set it.
    test_tokens: int | None = Field(
        None, ge=1, description="the test slice in tokens (a multiple of model.context_length); replaces test_sequences"
    )
    batch_size: int = Field(
        16,
        ge=1,
        description="sequences per forward pass per device (16 × 1024 × 50257 fp32 logits = 3.3 GB); "
        "past 1,024 tokens a sequence counts as context_length/1024 of them, so the logits never outgrow that",
    )
    # Evaluation precision is fixed independently of training precision, so an AMP-vs-fp32 intervention
    # changes how the model was trained, not how it is measured.
    amp: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _one_test_slice(self) -> EvalConfig:
        if (self.test_sequences is None) == (self.test_tokens is None):
            raise ValueError("set exactly one of eval.test_sequences and eval.test_tokens (set the other to null)")
        return self


class RunConfig(Section):
    seed: int = Field(42, ge=0, description="initialisation and dropout seed")
    batch_size: int = Field(96, ge=1, description="sequences per optimizer step, across all devices")
    micro_batch_size: int | Literal["auto"] = Field(
        "auto", description="sequences per device per forward pass; 'auto' finds the largest that fits"
    )
    # The series' train.json "min_train_tokens"; its training repo (ddp_train.py, load_dataset) trains the
    # fewest whole steps that reach it, so 3,260,190,720 tokens are 33,165 steps of 98,304 (3,260,252,160).
    tokens: int | None = Field(
        3_260_190_720, ge=1, description="training-token budget, rounded up to whole steps (sets the step count)"
    )
    steps: int | None = Field(None, ge=1, description="optimizer steps; use instead of run.tokens")
    log_interval: int = Field(10, ge=1, description="steps between metric lines (each costs a device sync)")
    checkpoint_interval: int = Field(1000, ge=0, description="steps between checkpoints; 0 = only at stops")
    keep_checkpoints: int = Field(2, ge=1)
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU; null = known GPUs only")
    # Starting from another run (trainer/init_from.py has the rules): its weights only, from its final state;
    # a fresh optimizer, step 0 and this run's own seeds. Interrupted, this run resumes from its own checkpoint.
    init_from: str | None = Field(
        None,
        description="start from another run's weights: its run directory (newest checkpoint of a succeeded run), "
        "a checkpoint file, or through orch a run id (resolved to its directory; the run waits for it to succeed)",
    )
    # How a learned position table grows to a longer context (a shorter one keeps the first rows):
    # "interpolate", Position Interpolation (Chen et al. 2023), keeps every position inside the range the source
    # was trained on; "tile" (Longformer's copy, Beltagy et al. 2020) keeps every local offset but repeats
    # absolute positions. model.position=rope has no table: nothing to extend.
    init_positions: Literal["interpolate", "tile"] = Field(
        "interpolate", description="longer context from run.init_from: interpolate (the table stretched) | tile"
    )
    init_sha256: str | None = Field(
        None,
        pattern="^[0-9a-f]{64}$",
        description="sha256 of the checkpoint file run.init_from names (orch submit pins a path's with it); "
        "a file that no longer matches is refused",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> RunConfig:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("set exactly one of run.tokens and run.steps (set the other to null)")
        if isinstance(self.micro_batch_size, int) and self.micro_batch_size < 1:
            raise ValueError("run.micro_batch_size must be a positive integer or 'auto'")
        if self.init_from is None:
            for key in ("init_positions", "init_sha256"):
                if getattr(self, key) != RunConfig.model_fields[key].default:
                    raise ValueError(
                        f"run.{key} applies only with run.init_from; set run.init_from or leave run.{key} out"
                    )
        return self


# The blog series judged each model by a smoke-test completion of this prompt (Raschka's book, ch. 4-5).
DEFAULT_PROMPT = "Every effort moves you"


class SampleConfig(Section):
    """Completions written to samples.json at the end of a successful run (trainer/sample.py): per prompt one
    greedy completion and `count` sampled ones. They change no training number: they come after the test
    evaluation and draw from a torch.Generator of their own, never from the training RNG."""

    prompts: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: [DEFAULT_PROMPT], description="prompts to complete; [] = no samples"
    )
    tokens: int = Field(40, ge=1, description="new tokens per completion (fewer if <|endoftext|> comes first)")
    temperature: float = Field(1.0, gt=0, description="of the sampled completions (the greedy one has none)")
    top_k: int | None = Field(None, ge=1, description="sample among the k likeliest tokens only; null = all")
    count: int = Field(2, ge=0, description="sampled completions per prompt, besides the greedy one")
    seed: int = Field(0, ge=0, description="a prompt's i-th sampled completion draws from seed + i")


class TrainConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _context_fits(self) -> TrainConfig:
        T, tokens = self.model.context_length, self.eval.test_tokens
        if tokens is not None and tokens % T:
            low, high = tokens // T * T, -(-tokens // T) * T
            raise ValueError(
                f"eval.test_tokens ({tokens}) must be a multiple of model.context_length ({T}), so that whole "
                f"windows tile it: try {low or high} or {high}, or a multiple of every context you compare"
            )
        if self.model.position == "rope" and self.run.init_positions != "interpolate":
            raise ValueError(
                "run.init_positions extends a learned position table; model.position=rope has none (its "
                "rotations hold at any length): leave run.init_positions out"
            )
        return self

    @model_validator(mode="after")
    def _moe_objective_fixed(self) -> TrainConfig:
        moe = self.model.moe
        switches = {"balance=aux": moe.balance == "aux", "capacity_factor": moe.capacity_factor is not None}
        per_pass = [name for name, on in switches.items() if on]
        if moe.experts and per_pass and self.run.micro_batch_size == "auto":
            raise ValueError(
                f"model.moe.{' and model.moe.'.join(per_pass)} act on each forward pass of run.micro_batch_size "
                "sequences, so 'auto' (the largest that fits the GPU) would make what is trained depend on the "
                "hardware under one run id: set run.micro_batch_size (the seed repo's MoE runs used 3)"
            )
        return self

    def test_windows(self) -> int:
        """Windows of model.context_length tokens in the fixed test slice (eval.test_sequences or test_tokens)."""
        if self.eval.test_tokens is not None:
            return self.eval.test_tokens // self.model.context_length
        return self.eval.test_sequences

    def total_steps(self) -> int:
        if self.run.steps is not None:
            return self.run.steps
        # Rounded up, as the series' repo does: a budget is a minimum, never cut short by a partial step.
        return -(-self.run.tokens // (self.run.batch_size * self.model.context_length))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """The config as it identifies a run (run ids, resume checks): see trainer.identity.LATER_KEYS."""
        from trainer.identity import without_later_keys  # here, not at the top: trainer.identity imports this module

        return without_later_keys(self.model_dump(mode="json"))

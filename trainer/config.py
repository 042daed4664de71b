"""TrainConfig: the one typed description of a training run.

Everything a run does is decided here and nowhere else, so that two runs with equal configs are the same
experiment and a run's identity can be a hash of its resolved config. Unknown keys and impossible values are
errors whose message names the key and says how to fix it: a mistake is fixed from one line of output,
before any training time is spent on it.

Presets:
- `gpt2-small`: the blog series' baseline exactly (its run "8xa100m40-baseline"): GPT-2-small
  shape (163M parameters, untied), dropout 0.1, no QKV bias, PyTorch's default initialisation (the series'
  model is Raschka's, which never re-initialises), 96 × 1024-token sequences per step as 12 per GPU on 8 GPUs,
  3,260,190,720 tokens, AdamW lr 4e-4 wd 0.1 on every parameter, constant LR, no clipping, fp16 AMP + TF32,
  seed 42, test loss on 3,200 × 6 sequences.
- `tiny`: the same code path at a size that trains in seconds on a laptop CPU, for demos and tests.
"""

from __future__ import annotations

import difflib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run, with a message that says which key and how to fix it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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

    @model_validator(mode="after")
    def _wsd_fits(self) -> ScheduleConfig:
        if self.kind == "wsd" and self.warmup_steps is None and self.warmup + self.decay > 1:
            raise ValueError(
                f"schedule.warmup ({self.warmup}) + schedule.decay ({self.decay}) exceed the whole run; "
                "lower one so that they sum to at most 1"
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
    test_sequences: int = Field(3200 * 6, ge=1)
    batch_size: int = Field(
        16, ge=1, description="sequences per forward pass per device (16 × 1024 × 50257 fp32 logits = 3.3 GB)"
    )
    # Evaluation precision is fixed independently of training precision, so an AMP-vs-fp32 intervention
    # changes how the model was trained, not how it is measured.
    amp: Literal["fp32", "bf16", "fp16"] = "fp32"


class RunConfig(Section):
    seed: int = Field(42, ge=0, description="initialisation and dropout seed")
    batch_size: int = Field(96, ge=1, description="sequences per optimizer step, across all devices")
    micro_batch_size: int | Literal["auto"] = Field(
        "auto", description="sequences per device per forward pass; 'auto' finds the largest that fits"
    )
    tokens: int | None = Field(3_260_190_720, ge=1, description="training-token budget; sets the step count")
    steps: int | None = Field(None, ge=1, description="optimizer steps; use instead of run.tokens")
    log_interval: int = Field(10, ge=1, description="steps between metric lines (each costs a device sync)")
    checkpoint_interval: int = Field(1000, ge=0, description="steps between checkpoints; 0 = only at stops")
    keep_checkpoints: int = Field(2, ge=1)
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU; null = known GPUs only")

    @model_validator(mode="after")
    def _one_budget(self) -> RunConfig:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("set exactly one of run.tokens and run.steps (set the other to null)")
        if isinstance(self.micro_batch_size, int) and self.micro_batch_size < 1:
            raise ValueError("run.micro_batch_size must be a positive integer or 'auto'")
        return self


class TrainConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    eval: EvalConfig = EvalConfig()
    run: RunConfig = RunConfig()

    def total_steps(self) -> int:
        if self.run.steps is not None:
            return self.run.steps
        steps = self.run.tokens // (self.run.batch_size * self.model.context_length)
        if steps < 1:
            raise ConfigError(
                f"run.tokens ({self.run.tokens}) is less than one step of "
                f"{self.run.batch_size} × {self.model.context_length} tokens; raise run.tokens"
            )
        return steps

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def identity(self) -> dict[str, Any]:
        """The config as it identifies a run (run ids, resume checks): see LATER_KEYS."""
        return without_later_keys(self.model_dump(mode="json"))


# Keys added after run ids were first handed out, each with the value that means "as before". A config that
# holds that value identifies a run as if the key did not exist, so a new switch changes no stored run's id
# and a checkpoint written before the key existed still resumes (tests/test_config.py pins both).
LATER_KEYS: dict[str, Any] = {
    "model.pad_vocab": 1,
    "model.position": "learned",
    "model.rope_base": 10000.0,
    "model.norm": "layernorm",
    "model.mlp": "gelu",
    "model.bias": True,
    "model.qk_norm": False,
    "model.logit_softcap": None,
}


def without_later_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict (a model_dump, or one stored by an older orch) minus LATER_KEYS at their neutral value."""
    data = json.loads(json.dumps(data))  # deep copy
    for dotted, neutral in LATER_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            del node[leaf]
    return data


def same_run(stored: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether a stored config (config.json, a checkpoint's) describes the same run as `cfg`."""
    return isinstance(stored, dict) and without_later_keys(stored) == cfg.identity()


# ---------------------------------------------------------------------------------------------------------
# Presets, overrides and loading.

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {},  # the defaults above are the blog baseline
    "tiny": {
        "model": {"context_length": 64, "n_embd": 64, "n_layer": 2, "n_head": 4, "init": "gpt2"},
        "optim": {"lr": 1e-3},
        "precision": {"amp": "fp32", "tf32": False},
        "eval": {"val_sequences": 32, "test_sequences": 128, "batch_size": 32},
        "run": {
            "batch_size": 16,
            "micro_batch_size": "auto",
            "tokens": None,
            "steps": 100,
            "log_interval": 5,
            "checkpoint_interval": 25,
        },
    },
}


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(name: str) -> dict[str, Any]:
    """The preset as a plain nested dict, ready for overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return _merge(TrainConfig().model_dump(mode="json"), PRESETS[name])


def parse_value(text: str) -> Any:
    """`--set` values are JSON where they parse (numbers, true/false, null, lists), else plain strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# Keys that are alternatives: setting one (to a value) clears the other unless both are set together,
# so `--set run.steps=40` works on a preset whose budget is given in tokens.
ALTERNATIVES = {"run.steps": "run.tokens", "run.tokens": "run.steps"}


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply {"optim.lr": 1e-3, ...} to a nested dict, refusing keys that do not exist."""
    data = json.loads(json.dumps(data))  # deep copy
    for dotted, other in ALTERNATIVES.items():
        if overrides.get(dotted) is not None and other not in overrides:
            overrides = {**overrides, other: None}
    for dotted, value in overrides.items():
        node, parts = data, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                choices = list(node) if isinstance(node, dict) else []
                raise ConfigError(
                    f"unknown config key {dotted!r}: {where} has no {part!r}" + _did_you_mean(part, choices)
                )
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return data


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid: {', '.join(choices)})" if choices else ""


def validate(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build a TrainConfig, turning Pydantic's errors into one message per bad key with its fix."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid {source}:\n" + "\n".join(_explain(err) for err in exc.errors())) from None


def _explain(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section = TrainConfig.model_fields.get(str(err["loc"][0]))
        choices = (
            list(section.annotation.model_fields) if len(err["loc"]) > 1 and section else list(TrainConfig.model_fields)
        )
        return f"  {loc}: unknown key" + _did_you_mean(str(err["loc"][-1]), choices) + "; remove or rename it"
    msg = err["msg"].removeprefix("Value error, ")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"  {loc or 'config'}: {msg}{got}"


def load(
    path: str | None = None, preset_name: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A config from a JSON file or a preset, with dotted overrides applied on top."""
    if (path is None) == (preset_name is None):
        raise ConfigError("give exactly one of a config file (--config) and a preset (--preset)")
    if path is not None:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        data = _merge(TrainConfig().model_dump(mode="json"), data)
    else:
        data = preset(preset_name)
    data = apply_overrides(data, overrides or {})
    return validate(data, source=path or f"preset {preset_name!r}")

"""GPT-2 with every architectural intervention of the blog series as a config switch.

The structure is Raschka's GPTModel ("Build a Large Language Model (from Scratch)", ch. 4), which the series
trained: learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP of width 4·d, an untied output
head without bias. Q, K and V are one fused (d → 3d) projection, which is the same function and the same
default initialisation as three separate (d → d) layers (each has fan-in d), but one matmul.

Modern switches (trainer/config.py, model section), each off by default, so that the defaults are the series'
GPT-2 and build it from the same RNG draws in the same order:
- model.position=rope: rotary position embeddings (Su et al. 2021, RoFormer) on q and k instead of learned
  absolute positions; no position table, so attention scores depend on relative position only.
- model.norm=rmsnorm: RMSNorm (Zhang & Sennrich 2019) in place of every LayerNorm: no mean subtraction, no bias.
- model.mlp=swiglu: the SwiGLU feed-forward layer (Shazeer 2020, "GLU Variants Improve Transformer").
- model.bias=false: no bias in any linear layer or norm (PaLM, LLaMA); the QKV bias keeps its own switch.
- model.qk_norm=true: RMSNorm of each head's q and k before attention (Dehghani et al. 2023, ViT-22B;
  OLMo 2, 2024), which bounds the attention logits.
- model.logit_softcap=C: output logits C·tanh(logits/C) (Gemma 2, 2024: C=30; modded-nanogpt: 15 to 30).
- model.moe.experts=E: a mixture of E experts of the MLP's shape in place of each MLP (trainer/moe.py); with
  model.moe.balance=bias its routing bias is a buffer, in the state dict with the parameters.
Nothing here is state outside parameters: RoPE's angles are computed in each forward pass from the positions,
so checkpoints, resumes and DDP ranks see exactly the tensors the dense model has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.moe import MoE


class RMSNorm(nn.LayerNorm):
    """y = x / sqrt(mean(x²) + eps) · g over the last dimension (Zhang & Sennrich 2019): LayerNorm without the
    mean subtraction and without a bias. A subclass of nn.LayerNorm so that code which finds norms by type
    (trainer/optim.py's decay_norms) finds this one too. Computed in float32 and returned in the input's dtype,
    as autocast runs LayerNorm, so that q and k stay in v's dtype for attention."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight, self.eps).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm of the residual stream (ln1, ln2, ln_f): model.norm, with a bias only if model.bias."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)


def rope_angles(T: int, head_dim: int, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles, each (T, head_dim/2) float32: position t turns pair i by t·base^(-2i/head_dim)
    (RoFormer eq. 15). Recomputed in every forward pass (T·head_dim/2 values, negligible next to one matmul)
    rather than cached, so the model holds no state besides its parameters."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, n_head, T, head_dim) with each pair (x[i], x[i + head_dim/2]) rotated by its angle, in float32.

    The half-split pairing of GPT-NeoX and LLaMA; RoFormer pairs neighbours (x[2i], x[2i+1]), which is the same
    function up to a fixed permutation of q's and k's dimensions. A rotation keeps every norm, and the score
    q_m·k_n depends on m and n only through m − n."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # Raschka's out_proj has a bias
        self.attn_dropout = cfg.site_dropout("attn")
        # QK-norm: RMSNorm over each head's head_dim of q and of k, with a gain per dimension shared by the
        # heads (the form of Qwen3 and Gemma 3; OLMo 2 norms the full d-wide q and k, modded-nanogpt has no
        # gain). |q̂|, |k̂| ≈ sqrt(head_dim)·g, so the attention logits stay bounded however the weights grow.
        head_dim = cfg.n_embd // cfg.n_head
        self.q_norm = RMSNorm(head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(head_dim, cfg.layer_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # after the norm, as OLMo 2 and modded-nanogpt do: the rotation keeps it
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


def swiglu_hidden(d: int) -> int:
    """SwiGLU's hidden width h for model width d: 8d/3 rounded (half up) to a multiple of 64.

    The GELU MLP has two d×4d matrices, 8d² weights; SwiGLU has three d×h matrices, 3dh weights, so h = 8d/3
    gives the same count (Shazeer 2020 shrinks d_ff by 2/3 for this reason; LLaMA rounds it up to 256).
    8d/3 is a multiple of 64 exactly when d is a multiple of 24: gpt2-small (d=768) gets h=2048 and exactly the
    GELU MLP's 4,718,592 weights per layer. Otherwise the difference is 3dh − 8d² weights per layer: tiny
    (d=64) gets h=192, 36,864 against 32,768 (+4,096). Biases (model.bias) are 2h + d against 5d:
    +1,024 per layer for gpt2-small (+12,288 in all, 0.0075% of 163M), +128 per layer for tiny.
    """
    return 64 * max(1, (d + 12) // 24)  # round(8d/3 / 64) = round(d/24), halves rounded up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = swiglu_hidden(cfg.n_embd) if self.swiglu else 4 * cfg.n_embd
        # SwiGLU(x) = (silu(x·W1) ⊙ x·W3)·W2. W1 and W3 are one fused (d → 2h) layer, as Q, K and V are: the same
        # function and the same default initialisation (fan-in d) as two layers. fc.weight[:h] is W1, [h:] W3.
        self.fc = nn.Linear(cfg.n_embd, 2 * hidden if self.swiglu else hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            a, gate = self.fc(x).chunk(2, dim=-1)
            return self.proj(F.silu(a) * gate)
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg)
        # model.moe.experts > 0: a mixture of MLPs of this shape (trainer/moe.py); 0 draws exactly as before
        self.mlp = MoE(cfg, lambda: MLP(cfg)) if cfg.moe.experts else MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.site_dropout("resid"))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln1(x), rope))
        return x + self.resid_dropout(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # model.position=rope: no position table (and no draw for one), positions enter as rotations of q and k.
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd) if cfg.position == "learned" else None
        self.emb_dropout = nn.Dropout(cfg.site_dropout("embed"))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.init == "gpt2":
            self.apply(_gpt2_init)
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):  # the two projections that write into the residual stream
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.padded_vocab_size > cfg.vocab_size:
            # Padded only now, after every initial draw, so the seed gives the unpadded model's exact weights.
            for module in (self.tok_emb, self.head):
                module.weight = nn.Parameter(_zero_rows(module.weight.data, cfg.padded_vocab_size))
            self.tok_emb.num_embeddings = self.head.out_features = cfg.padded_vocab_size
        if cfg.tie_weights:
            # One tensor, two uses: the head reads the embedding matrix (Press & Wolf 2017; GPT-2).
            # Under "pytorch" init that tensor keeps nn.Embedding's N(0, 1), as Raschka's book does.
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds model.context_length={self.cfg.context_length}")
        rope = None
        if self.pos_emb is not None:
            pos = torch.arange(T, device=idx.device)
            x = self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))
        else:
            x = self.emb_dropout(self.tok_emb(idx))
            rope = rope_angles(T, self.cfg.n_embd // self.cfg.n_head, self.cfg.rope_base, idx.device)
        for block in self.blocks:
            x = block(x, rope)
        logits = self.head(self.ln_f(x))
        # model.pad_vocab: the padding's logits are dropped, so no softmax, loss or sample ever sees them.
        if self.cfg.padded_vocab_size > self.cfg.vocab_size:
            logits = logits[..., : self.cfg.vocab_size]
        if self.cfg.logit_softcap is not None:
            # Soft-capping (Gemma 2: 30; modded-nanogpt: 15 to 30): smooth, monotone, |logit| < cap, so no
            # logit can run away; near zero it is the identity (slope 1). In the logits' dtype, as Gemma 2 does.
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def num_params(self, active: bool = False) -> int:
        """Distinct parameters (a tied tensor counts once): 163,009,536 for the untied gpt2-small preset.
        The zero rows of model.pad_vocab are not counted: they are never trained and never read.
        active=True: those one token uses, which differ only with a mixture of experts (top_k of its experts)."""
        padding = (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.n_embd
        inactive = sum(b.mlp.inactive_params() for b in self.blocks if isinstance(b.mlp, MoE)) if active else 0
        return sum(p.numel() for p in self.parameters()) - padding * (1 if self.cfg.tie_weights else 2) - inactive

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention scores.

        PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's estimate_mfu: 6·N + 12·L·d·T, where N counts
        the weights that take part in matmuls — every parameter except the embedding lookups, but including
        the output head, which is a 50257-wide matmul even when tied. Model FLOPs of the unpadded vocabulary:
        what model.pad_vocab adds is work the model does not need, so it must not raise MFU. With a mixture of
        experts N counts the active weights: the router and top_k experts per layer (not the inactive ones).
        """
        cfg = self.cfg
        positions = self.pos_emb.weight.numel() if self.pos_emb is not None else 0  # RoPE has no table
        lookups = cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_weights else 1) + positions
        n_matmul = self.num_params(active=True) - lookups
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.context_length


def _zero_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` (V, d) with zero rows appended up to (rows, d)."""
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def _gpt2_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32, whatever precision produced the logits."""
    # reshape, not view: the logits of a padded vocabulary are a slice, not contiguous
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))

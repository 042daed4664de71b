"""GPT-2 with every architectural intervention of the blog series as a config switch.

The structure is Raschka's GPTModel ("Build a Large Language Model (from Scratch)", ch. 4), which the series
trained: learned position embeddings, pre-LayerNorm blocks, tanh-GELU MLP of width 4·d, an untied output
head without bias. Q, K and V are one fused (d → 3d) projection, which is the same function and the same
default initialisation as three separate (d → d) layers (each has fan-in d), but one matmul.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)  # Raschka's out_proj has a bias
        self.attn_dropout = cfg.site_dropout("attn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.site_dropout("resid"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.attn(self.ln1(x)))
        return x + self.resid_dropout(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.emb_dropout = nn.Dropout(cfg.site_dropout("embed"))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
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
        pos = torch.arange(T, device=idx.device)
        x = self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        # model.pad_vocab: the padding's logits are dropped, so no softmax, loss or sample ever sees them.
        return logits[..., : self.cfg.vocab_size] if self.cfg.padded_vocab_size > self.cfg.vocab_size else logits

    def num_params(self) -> int:
        """Distinct parameters (a tied tensor counts once): 163,009,536 for the untied gpt2-small preset.
        The zero rows of model.pad_vocab are not counted: they are never trained and never read."""
        padding = (self.cfg.padded_vocab_size - self.cfg.vocab_size) * self.cfg.n_embd
        return sum(p.numel() for p in self.parameters()) - padding * (1 if self.cfg.tie_weights else 2)

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention scores.

        PaLM (Chowdhery et al. 2022, appendix B) and nanoGPT's estimate_mfu: 6·N + 12·L·d·T, where N counts
        the weights that take part in matmuls — every parameter except the embedding lookups, but including
        the output head, which is a 50257-wide matmul even when tied. Model FLOPs of the unpadded vocabulary:
        what model.pad_vocab adds is work the model does not need, so it must not raise MFU.
        """
        cfg = self.cfg
        lookups = cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_weights else 1) + self.pos_emb.weight.numel()
        n_matmul = self.num_params() - lookups
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

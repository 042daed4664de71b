"""Mixture of experts: each block's MLP replaced by E expert MLPs, of which a router picks k per token.

model.moe (trainer/config.py) switches it on: experts=E > 0, top_k=k. Each expert has the block MLP's shape
(model.mlp: GELU 4d, or SwiGLU 8d/3), so E=6, k=2 on gpt2-small holds 6x the MLP weights and uses 2x per token.

Routing, for a token x (d wide) and router weights W_r (d x E, no bias), in float32 whatever the autocast
(Switch Transformer, Fedus et al. 2021, §2.4 "selective precision": the router's softmax is where fp16 breaks):

    z     = x·W_r                                   router logits, E of them
    S(x)  = the k experts of largest z_i + b_i      ties at the k-th place go to the lower expert index
    g_i   = exp(z_i) / Σ_{j∈S} exp(z_j),  i ∈ S      softmax over the chosen logits only (the bias b is not in it)
    y     = Σ_{i∈S} g_i · MLP_i(x)

Top-k gating is Shazeer et al. 2017 ("Outrageously Large Neural Networks"); softmax over the chosen logits
(rather than over all E, then renormalised) is Mixtral's and the seed repo's (gpjt/ddp-base-model-from-
scratch, gpt.py). torch.topk picks among equal logits in an unspecified order, so the choice is a stable sort:
of equal scores, the lowest expert index first (tests/test_moe.py pins it). With k=1 the single gate is
always 1 and the router would learn nothing from the loss, so the config refuses top_k < 2, as the seed does.

Dropless by default: every expert takes every token routed to it, in one batch per expert, so the batch
sizes depend on the data and each MoE layer reads them on the host (one device sync per layer and pass).
model.moe.capacity_factor=c caps each expert at C = ceil(c·k·N/E) of a pass's N·k routing slots (GShard,
Lepikhin et al. 2020; Switch §2.2): first choices of all tokens before second choices, then by token
position; a dropped slot adds nothing (the residual carries the token). In training only: evaluation and
sampling drop nothing, so the test loss does not depend on the eval batch. Every expert runs on every pass,
with zero rows if none came: every parameter is in every graph, as DDP requires.

Load balancing, per MoE layer and forward pass of N tokens (counts over the pass's k·N slots, before drops):

    f_i  = (slots routed to expert i) / (k·N)           Σ f_i = 1; a count, so no gradient
    P_i  = (1/N) Σ_x softmax(z(x))_i                    the mean router probability, over all E experts
    aux  = E · Σ_i f_i · P_i                             Switch Transformer eq. 4, GShard's l_aux: 1 when
                                                         both are uniform; it pulls P (so z) towards balance
    zl   = (1/N) Σ_x (log Σ_i exp z_i(x))²              the router z-loss, ST-MoE (Zoph et al. 2022) eq. 5

  f is normalised over the k·N slots as in DeepSeek-V2's expert-level loss, so a balanced router scores 1
  whatever k; the seed notebook's and Mixtral's f count tokens (Σ f_i = k): their aux is k times this one.
  The training loss is CE + Σ_layers (α·aux if balance=aux) + (c_z·zl if z_loss > 0): one term per MoE layer
  (Switch, ST-MoE), with α = model.moe.aux_coef (Switch: 0.01), c_z = model.moe.z_loss (ST-MoE: 0.001).
  Each pass's terms are its own (per micro-batch and rank), as in Switch; the logged loss stays the CE alone.

  balance=bias is DeepSeek-V3's auxiliary-loss-free balancing (DeepSeek-AI 2024, §2.1.2; Wang et al. 2024):
  a bias b_i per expert is added to the scores for the choice only, and after each optimizer step

    b_i ← b_i + γ · sign(mean_j c_j − c_i)              γ = model.moe.bias_rate (DeepSeek-V3: 0.001)

  where c are the step's slot counts summed over all its micro-batches and all DDP ranks (all-reduced, in
  integers), so every rank holds the same b. b is a persistent buffer: checkpoints carry it, resume is bitwise.

Metrics (one metrics.jsonl line per logging window; MLflow gets the same names): moe/load_e<i>, the fraction of
routing slots expert i took over the window (mean over layers: expert i of one layer is unrelated to expert i of
another); moe/saturation, per layer the busiest expert's load over the fair share 1/E (max load / mean load:
1 balanced, E/k when k experts take every token), averaged over layers, so a collapse in any layer shows;
moe/aux_loss and moe/z_loss, the mean over layers and passes of aux and zl above (unscaled, whatever the balance
mode); moe/dropped, the fraction of slots dropped, with a capacity factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig, MoEConfig


@dataclass
class Routing:
    """What one MoE layer's last forward pass routed: counts for the metrics and the bias, losses with grads."""

    counts: torch.Tensor  # (E,) int64: routing slots assigned to each expert, before any capacity drop
    dropped: torch.Tensor  # () int64: slots dropped by the capacity limit
    aux: torch.Tensor  # () float32: E·Σ f_i·P_i, differentiable through P
    z: torch.Tensor  # () float32: the router z-loss, differentiable


def choose(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E) scores -> (N, k) expert indices, highest score first; of equal scores the lower index first.
    A stable descending sort keeps equal elements in index order, which torch.topk does not promise."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def balance_loss(logits: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """E·Σ f_i·P_i (Switch Transformer eq. 4) for (N, E) float32 logits and (E,) slot counts."""
    n, e = logits.shape
    f = counts.to(logits.dtype) / (k * n)
    return e * (f * torch.softmax(logits, dim=-1).mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ (logsumexp z)² over (N, E) logits (ST-MoE eq. 5)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class MoE(nn.Module):
    """The mixture that stands in a block for its MLP: (B, T, d) -> (B, T, d). After each forward pass,
    `routing` holds what it routed (Balancer reads it); nothing else is state but the parameters and, with
    balance=bias, the bias buffer."""

    def __init__(self, cfg: ModelConfig, expert: Callable[[], nn.Module]):
        super().__init__()
        moe = cfg.moe
        self.k, self.capacity_factor = moe.top_k, moe.capacity_factor
        # Router first, then the experts in order: the draws of the seed repo's MixtureOfExperts.
        self.router = nn.Linear(cfg.n_embd, moe.experts, bias=False)
        self.experts = nn.ModuleList(expert() for _ in range(moe.experts))
        # Persistent, so the state dict (checkpoints, DDP's buffer broadcast) carries it; zeros: no preference.
        if moe.balance == "bias":
            self.register_buffer("score_bias", torch.zeros(moe.experts))
        else:
            self.score_bias = None
        self.routing: Routing | None = None

    def inactive_params(self) -> int:
        """Parameters a token does not use: E − k of the experts."""
        return (len(self.experts) - self.k) * sum(p.numel() for p in self.experts[0].parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = x.reshape(B * T, d)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(h.float(), self.router.weight.float())  # (N, E) float32
        scores = logits.detach() if self.score_bias is None else logits.detach() + self.score_bias
        idx = choose(scores, self.k)  # (N, k)
        gates = torch.softmax(logits.gather(1, idx), dim=-1)  # (N, k), over the chosen logits, without the bias
        y, counts, dropped = self._dispatch(h, idx, gates)
        self.routing = Routing(counts, dropped, balance_loss(logits, counts, self.k), z_loss(logits))
        return y.view(B, T, d)

    def _dispatch(
        self, h: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ_j gates[:, j]·expert_{idx[:, j]}(h) for (N, d) h, one batch per expert; also the slot counts and
        the dropped slots. Slot s = j·N + t is token t's j-th choice; sorting the slots by expert (stably)
        groups each expert's tokens, first choices before second ones."""
        N, k = idx.shape
        E = len(self.experts)
        expert_of = idx.t().reshape(-1)  # (k·N,)
        order = torch.argsort(expert_of, stable=True)
        # scatter_add rather than bincount: the same counts, but a fixed output shape, so torch.compile keeps it
        # in the graph; the one graph break left is the host read of the batch sizes below.
        counts = expert_of.new_zeros(E).scatter_add_(0, expert_of, torch.ones_like(expert_of))
        kept = counts
        if self.capacity_factor is not None and self.training:  # evaluation and sampling route every token
            capacity = math.ceil(self.capacity_factor * k * N / E)
            first = torch.cumsum(counts, 0) - counts  # where each expert's slots start in `order`
            place = torch.arange(k * N, device=h.device) - first[expert_of[order]]
            order, kept = order[place < capacity], counts.clamp(max=capacity)
        sizes = kept.tolist()  # the host sync: each expert's batch size
        outs = [expert(rows) for expert, rows in zip(self.experts, h[order % N].split(sizes))]
        ys = torch.cat(outs)
        slots = ys.new_zeros(k * N, h.shape[1]).index_copy(0, order, ys)  # each slot written once: exact
        y = (slots.view(k, N, -1) * gates.t().unsqueeze(-1).to(ys.dtype)).sum(0)
        return y, counts, counts.sum() - kept.sum()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def penalty(model: nn.Module, cfg: MoEConfig) -> torch.Tensor:
    """What the last forward pass adds to the training loss: Σ_layers α·aux (balance=aux) + c_z·zl (z_loss > 0);
    a zero tensor (no term, no graph) when neither is on."""
    terms = []
    for layer in moe_layers(model):
        if cfg.balance == "aux":
            terms.append(cfg.aux_coef * layer.routing.aux)
        if cfg.z_loss > 0:
            terms.append(cfg.z_loss * layer.routing.z)
    return torch.stack(terms).sum() if terms else torch.zeros((), device=next(model.parameters()).device)


class Balancer:
    """The training loop's side of the mixture: after each micro-batch, its routing (record); after each
    optimizer step, the global loads and the loss-free bias update (after_step); at each sync point, the
    window's metrics (window_metrics). Device tensors throughout: nothing here waits for the device but the
    metrics. Between two sync points only; a checkpoint, always taken at a sync point, needs none of it."""

    def __init__(self, model: nn.Module, cfg: MoEConfig, device: torch.device):
        self.cfg, self.layers = cfg, moe_layers(model)
        L, E = len(self.layers), cfg.experts
        self.step_counts = torch.zeros(L, E, dtype=torch.long, device=device)
        self.counts = torch.zeros(L, E, dtype=torch.long, device=device)  # the window's, summed over ranks
        self.sums = torch.zeros(3, L, device=device)  # this rank's aux, z-loss and dropped slots, summed
        self.passes = 0  # this rank's forward passes in the window

    @classmethod
    def of(cls, model: nn.Module, device: torch.device) -> Balancer | None:
        """None for a dense model."""
        cfg = model.cfg.moe
        return cls(model, cfg, device) if cfg.experts else None

    def record(self) -> None:
        """After a micro-batch's forward pass: its routing, detached, into the step's and the window's sums."""
        routings = [layer.routing for layer in self.layers]
        self.step_counts += torch.stack([r.counts for r in routings])
        self.sums += torch.stack(
            [torch.stack([r.aux.detach(), r.z.detach(), r.dropped.to(r.aux.dtype)]) for r in routings], dim=1
        )
        self.passes += 1

    @torch.no_grad()
    def after_step(self, world: int) -> None:
        """After the optimizer step: the step's slot counts over all ranks (a collective), the bias update."""
        if world > 1:
            dist.all_reduce(self.step_counts)  # integers: every rank gets the same sums, so the same bias
        if self.cfg.balance == "bias":
            # sign(mean − c_i) = sign(Σ_j c_j − E·c_i): exact in integers, no rounding can split ranks
            E = self.cfg.experts
            direction = torch.sign(self.step_counts.sum(1, keepdim=True) - E * self.step_counts)
            for layer, row in zip(self.layers, direction):
                layer.score_bias.add_(row.to(layer.score_bias.dtype), alpha=self.cfg.bias_rate)
        self.counts += self.step_counts
        self.step_counts.zero_()

    def window_metrics(self, world: int) -> dict[str, float]:
        """The window's moe/* metrics (a collective under DDP, and a device sync); then a new window."""
        if world > 1:
            dist.all_reduce(self.sums)
        passes = self.passes * world
        load = self.counts / self.counts.sum(1, keepdim=True).clamp(min=1)  # (L, E): fractions of slots
        E = self.cfg.experts
        out = {f"moe/load_e{i}": v for i, v in enumerate(load.mean(0).tolist())}
        out["moe/saturation"] = float((load.max(1).values * E).mean())
        aux, z, dropped = self.sums.sum(1).tolist()
        out["moe/aux_loss"] = aux / (passes * len(self.layers))
        out["moe/z_loss"] = z / (passes * len(self.layers))
        if self.cfg.capacity_factor is not None:
            out["moe/dropped"] = dropped / max(1, int(self.counts.sum()))
        self.counts.zero_()
        self.sums.zero_()
        self.passes = 0
        return out

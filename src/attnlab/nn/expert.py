"""SHRP Expert Attention: each head an expert, top-1 usage-driven routing, deterministic pruning.

Su et al., "SHRP: Specialized Head Routing and Pruning for Efficient Encoder Compression" (arXiv 2512.20635).
Only the abstract was available: every formula here is INFERRED (ours; see ``shrp`` in ``docs/mechanisms.md``) and
configurable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_padding_mask, check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_causal, check_float, check_int, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["ExpertAttention", "PrunedAttention"]

ROUTERS = ("sequence", "prefix", "token")


class ExpertAttention(nn.Module):
    """Expert Attention (SHRP): the heads are experts, each token uses the one its router picks.

    Su et al., "SHRP: Specialized Head Routing and Pruning for Efficient Encoder Compression",
    arXiv 2512.20635 (abstract: "treats each attention head as an independent expert, followed by a
    lightweight shared expander feed-forward network ... unified Top-1 usage-driven mechanism ...
    dynamic routing during training and deterministic pruning at deployment"). The equations below
    are inferred (no paper body or code):

    - expert ``E_h(X) = softmax(Q_h K_h^T / sqrt(d_h)) V_h``, ``[N, d_h]``;
    - router ``g = softmax(W_r pool(X))`` over the H heads, ``h* = argmax g`` (top-1);
    - ``Y = ST(g_{h*}) * Expand(E_{h*}(X))`` with ``Expand(z) = W_2 GELU(W_1 z)``, ``R^{d_h} -> R^{dim}``,
      one expander shared by the heads (it replaces ``W_O``); ``ST`` is the straight-through gate:
      value 1 forward, gradient of ``g_{h*}`` backward (so pruning changes no output);
    - usage ``u_h``: exponential moving average (``usage_momentum``) of the fraction of routing
      decisions that picked ``h`` in each training batch (sums to 1); ``selections`` counts them;
    - ``self.aux_loss = H * sum_h u_h * mean(g_h)`` after each training forward (weight it by 0.01).

    ``pool`` is chosen by ``router``: "sequence" (mean over the real tokens of each sequence, one
    expert per sequence; bidirectional only), "prefix" (running mean over tokens ``<= t``, causal) or
    "token" (``x_t`` itself). Default: "sequence", or "prefix" when ``causal``.

    Args:
        dim: model width. heads: number of experts H.
        head_dim: ``d_h`` (default ``dim // heads``).
        expander_hidden: hidden width of the shared expander (default ``dim``).
        router: see above. usage_momentum: EMA momentum of the usage statistics.
        causal: causal attention inside every expert (needs router "prefix" or "token").

    Shapes: ``x [B, N, dim] -> [B, N, dim]``; ``key_padding_mask [B, N]`` boolean, True = real token.
    """

    def __init__(self, dim: int, heads: int, *, head_dim: int | None = None, expander_hidden: int | None = None,
                 router: Literal["sequence", "prefix", "token"] | None = None, usage_momentum: float = 0.99,
                 causal: bool = False) -> None:
        super().__init__()
        check_int("head_dim", head_dim, minimum=1, allow_none=True)
        check_int("expander_hidden", expander_hidden, minimum=1, allow_none=True)
        check_float("usage_momentum", usage_momentum, minimum=0.0, maximum=1.0)
        check_causal(causal)
        if dim <= 0 or heads <= 0:
            raise ValueError(f"dim={dim} and heads={heads} must be positive")
        head_dim = dim // heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"head_dim={head_dim} must be positive (dim={dim}, heads={heads})")
        router = ("prefix" if causal else "sequence") if router is None else router
        if router not in ROUTERS:
            raise ValueError(f"router={router!r} is not one of {ROUTERS}")
        if causal and router == "sequence":
            raise ValueError("router='sequence' pools the whole sequence, which a causal layer may not see; "
                             "use router='prefix' or 'token'")
        if not 0.0 <= usage_momentum < 1.0:
            raise ValueError(f"usage_momentum={usage_momentum} must be in [0, 1)")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.router_kind, self.usage_momentum = router, usage_momentum
        self.expander_hidden = dim if expander_hidden is None else expander_hidden
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.router = nn.Linear(dim, heads, bias=False) if heads > 1 else None  # W_r
        self.expander = nn.Sequential(nn.Linear(head_dim, self.expander_hidden), nn.GELU(),
                                      nn.Linear(self.expander_hidden, dim))
        self.register_buffer("usage", torch.full((heads,), 1.0 / heads))
        self.register_buffer("selections", torch.zeros(heads, dtype=torch.long))  # routing decisions per head
        self.aux_loss: torch.Tensor | None = None

    def pooled(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The router input: ``[B, 1, dim]`` ("sequence") or ``[B, N, dim]`` ("prefix", "token")."""
        if self.router_kind == "token":
            return x
        weight = (x.new_ones(x.shape[:2]) if key_padding_mask is None else key_padding_mask.to(x.dtype))[..., None]
        if self.router_kind == "sequence":
            return (x * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True)
        return (x * weight).cumsum(dim=1) / weight.cumsum(dim=1).clamp_min(1.0)  # running mean over s <= t

    def route(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities ``g [B, R, H]`` and the chosen head ``h* [B, R]`` (``R`` = 1 or N)."""
        pooled = self.pooled(x, key_padding_mask)
        if self.router is None:
            probs = pooled.new_ones(*pooled.shape[:2], 1, dtype=compute_dtype(x.dtype))
        else:
            probs = torch.softmax(self.router(pooled).to(compute_dtype(x.dtype)), dim=-1)  # (B, R, H)
        return probs, probs.argmax(dim=-1)

    def experts(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every expert's output ``E_h(X)``: ``[B, H, N, d_h]``."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return softmax_attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``; updates ``usage`` and sets ``aux_loss`` in training mode."""
        x = check_sequence("x", x, self.dim)
        if key_padding_mask is not None:
            check_padding_mask("key_padding_mask", key_padding_mask, x.shape[0], x.shape[1], x.device)
        probs, chosen = self.route(x, key_padding_mask)  # (B, R, H), (B, R)
        onehot = F.one_hot(chosen, self.heads).to(probs.dtype)  # (B, R, H)
        gate = (probs * onehot).sum(dim=-1, keepdim=True)  # (B, R, 1)
        gate = gate - gate.detach() + 1.0  # straight-through: value 1, gradient of g_{h*}
        heads = self.experts(x, key_padding_mask)  # (B, H, N, d_h)
        selected = torch.einsum("brh,bhnd->bnd", onehot.to(heads.dtype), heads) if chosen.shape[1] == 1 else \
            torch.einsum("bnh,bhnd->bnd", onehot.to(heads.dtype), heads)  # (B, N, d_h)
        out = self.expander(selected) * gate.to(x.dtype)  # (B, N, dim)
        if self.training:
            with torch.no_grad():
                fraction = onehot.reshape(-1, self.heads).mean(dim=0).to(self.usage.dtype)
                self.usage.mul_(self.usage_momentum).add_(fraction, alpha=1.0 - self.usage_momentum)
                self.selections.add_(onehot.reshape(-1, self.heads).sum(dim=0).long())
            mean_gate = probs.reshape(-1, self.heads).mean(dim=0)
            self.aux_loss = self.heads * (self.usage.to(mean_gate.dtype) * mean_gate).sum()
        else:
            self.aux_loss = None
        return out

    def kept_heads(self, keep: int | Sequence[int] | None = None, *, min_usage: float = 0.0) -> list[int]:
        """The heads :meth:`prune` keeps, in their original order.

        ``keep`` an int: the ``keep`` most used heads (ties: lower index first); a sequence: those
        heads; ``None``: the heads training routed to at least once (``selections > 0``) whose usage
        is at least ``min_usage``: the unused heads go.
        """
        if keep is None:
            if int(self.selections.sum()) == 0:
                raise ValueError("keep=None prunes the heads training never routed to, but this layer has no "
                                 "routing statistics yet: train it first or pass keep=")
            return [h for h in range(self.heads) if self.selections[h] > 0 and self.usage[h] >= min_usage]
        if isinstance(keep, int):
            if not 0 <= keep <= self.heads:
                raise ValueError(f"keep={keep} must be between 0 and heads={self.heads}")
            order = sorted(range(self.heads), key=lambda h: (-float(self.usage[h]), h))
            return sorted(order[:keep])
        heads = sorted(set(int(h) for h in keep))
        if any(not 0 <= h < self.heads for h in heads):
            raise ValueError(f"keep={list(keep)} names heads outside 0..{self.heads - 1}")
        return heads

    @torch.no_grad()
    def prune(self, keep: int | Sequence[int] | None = None, *, min_usage: float = 0.0
              ) -> ExpertAttention | PrunedAttention:
        """A smaller layer with only the kept heads (see :meth:`kept_heads`); this layer is unchanged.

        Deterministic: the same usage statistics give the same layer. On inputs whose routing picks a
        kept head, its output equals this layer's (the straight-through gate is 1 and the argmax over
        the kept heads' logits is the argmax over all). One kept head drops the router; no kept head
        returns :class:`PrunedAttention` (outputs zeros: the block keeps only its residual).
        """
        kept = self.kept_heads(keep, min_usage=min_usage)
        if not kept:
            return PrunedAttention(self.dim)
        smaller = ExpertAttention(self.dim, len(kept), head_dim=self.head_dim, expander_hidden=self.expander_hidden,
                                  router=self.router_kind, usage_momentum=self.usage_momentum, causal=self.causal)
        smaller = smaller.to(device=self.qkv.weight.device, dtype=self.qkv.weight.dtype)
        index = torch.tensor(kept, device=self.qkv.weight.device)
        weight = rearrange(self.qkv.weight, "(three h d) c -> three h d c", three=3, h=self.heads)
        smaller.qkv.weight.copy_(rearrange(weight[:, index], "three h d c -> (three h d) c"))
        if smaller.router is not None:
            smaller.router.weight.copy_(self.router.weight[index])
        smaller.expander.load_state_dict(self.expander.state_dict())
        usage = self.usage[index]
        smaller.usage.copy_(usage / usage.sum() if usage.sum() > 0 else torch.full_like(usage, 1 / len(kept)))
        smaller.selections.copy_(self.selections[index])
        return smaller


class PrunedAttention(nn.Module):
    """What :meth:`ExpertAttention.prune` returns when no head is kept: ``x [B, N, dim] -> 0``.

    SHRP (arXiv 2512.20635): a layer whose heads are all pruned leaves only the residual path.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(check_sequence("x", x, self.dim))


register(Mechanism(
    name="shrp",
    op=None,
    reference=None,
    layer=ExpertAttention,
    family="routing",
    paper="SHRP: Specialized Head Routing and Pruning for Efficient Encoder Compression",
    arxiv="2512.20635",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^2 d H) + O(N d_h dim) expander",
    check=CheckConfig(layer_configs=({"router": "token"}, {"router": "prefix"})),
))

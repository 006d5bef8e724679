"""MoH: Mixture-of-Head attention, shared heads plus top-k routed heads per token.

Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842, eq. 5-7
(the weighted head summation ``y_t = W_O concat_i(g_{t,i} head_i(x)_t)``, the two-stage gate and the
load-balance loss), transcribed from the official code (SkyworkAI/MoH, ``MoH-ViT``/``MoH-DiT``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_bool, check_causal, check_int, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["MoHAttention", "MoHGates", "moh_load_balance_loss"]


class MoHGates(NamedTuple):
    """The gates of one forward pass.

    gates: ``[B, N, H]`` weight of every head for every token (0 for routed heads not selected).
    router_probs: ``[B, N, E]`` softmax of the router over the ``E = H - shared_heads`` routed heads
        (``None`` when no head is routed).
    selected: ``[B, N, E]`` 1 on the top-k routed heads of each token (``None`` when none is routed).
    stage_weights: ``[B, N, 2]`` the two-stage weights ``[alpha_1, alpha_2] = 2 softmax(W_0 x)``
        (``None`` unless there are both shared and routed heads).
    """

    gates: torch.Tensor
    router_probs: torch.Tensor | None
    selected: torch.Tensor | None
    stage_weights: torch.Tensor | None


def moh_load_balance_loss(router_probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``L_b = E * sum_i P_i f_i`` with ``P_i = mean_t p_{t,i}`` and ``f_i = mean_t selected_{t,i}``.

    MoH (arXiv 2410.11842), eq. 7 (official code: ``mean(me * ce) * E^2``). ``router_probs`` and
    ``selected`` are ``[..., E]``; the mean runs over every token. The paper weights it by 0.01.
    """
    E = router_probs.shape[-1]
    P = router_probs.reshape(-1, E).mean(dim=0)  # (E,)
    f = selected.reshape(-1, E).to(router_probs.dtype).mean(dim=0)  # (E,)
    return E * (P * f).sum()


class MoHAttention(nn.Module):
    """Mixture-of-Head attention: shared heads always on, ``routed_heads_per_token`` of the rest per token.

    Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv 2410.11842, eq. 5-7.
    Heads ``0 .. shared_heads-1`` are shared, the other ``E = heads - shared_heads`` are routed.
    Per token ``x_t`` (bias-free linear routers, as in the official code):

    - routed: ``p = softmax(W_r x_t)``, ``mask = topk(p, k)``, ``g_r = k (p * mask) / sum(p * mask)``;
    - shared: ``g_s = shared_heads * softmax(W_s x_t)`` (all ones when ``shared_heads == 1``);
    - two stages (both kinds present): ``[a1, a2] = 2 softmax(W_0 x_t)``, ``g_s *= a1``, ``g_r *= a2``;
    - ``y_t = W_O concat_i(g_{t,i} head_i(x)_t)`` where ``head_i`` is softmax attention.

    In training, ``self.aux_loss`` holds the load-balance loss ``E * sum_i P_i f_i`` of the last
    forward (add ``0.01 * aux_loss`` to the objective, the paper's weight); ``None`` in eval mode.
    The code multiplies the gates by the head counts and by 2 (mean gate about 1); that is what is
    implemented (the paper's formula without those factors is not confirmed, see the spec).

    Args:
        dim: model width C, divisible by ``heads``.
        heads: all heads H (shared + routed).
        shared_heads: ``h_s`` heads every token uses (default ``heads // 2``).
        routed_heads_per_token: ``k`` routed heads each token selects (default ``(heads - h_s) // 2``,
            at least 1 when there are routed heads). ``k = 0`` needs ``shared_heads == heads``.
        causal: causal softmax attention.
        qkv_bias: biases in the q, k, v projection (the output projection has one, as in the code).
        qk_norm: LayerNorm over each head's q and k (the DiT code's option).

    Shapes: ``x [B, N, dim] -> [B, N, dim]``.
    """

    def __init__(self, dim: int, heads: int, *, shared_heads: int | None = None,
                 routed_heads_per_token: int | None = None, causal: bool = False, qkv_bias: bool = False,
                 qk_norm: bool = False) -> None:
        super().__init__()
        check_int("shared_heads", shared_heads, minimum=0, allow_none=True)
        check_int("routed_heads_per_token", routed_heads_per_token, minimum=0, allow_none=True)
        check_bool("qkv_bias", qkv_bias)
        check_bool("qk_norm", qk_norm)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        shared = heads // 2 if shared_heads is None else shared_heads
        if not 0 <= shared <= heads:
            raise ValueError(f"shared_heads={shared} must be between 0 and heads={heads}")
        routed = heads - shared
        k = (max(1, routed // 2) if routed else 0) if routed_heads_per_token is None else routed_heads_per_token
        if not 0 <= k <= routed:
            raise ValueError(f"routed_heads_per_token={k} must be between 0 and heads - shared_heads = {routed}")
        if routed and k == 0:
            raise ValueError(f"routed_heads_per_token=0 leaves the {routed} routed heads unused; "
                             f"set shared_heads={heads} or routed_heads_per_token >= 1")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads
        self.shared_heads, self.routed_heads, self.routed_heads_per_token = shared, routed, k
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.router_routed = nn.Linear(dim, routed, bias=False) if routed else None  # W_r ("wg")
        self.router_shared = nn.Linear(dim, shared, bias=False) if shared > 1 else None  # W_s ("wg_1")
        self.router_stage = nn.Linear(dim, 2, bias=False) if (routed and shared) else None  # W_0 ("wg_0")
        self.aux_loss: torch.Tensor | None = None

    def head_gates(self, x: torch.Tensor) -> MoHGates:
        """The gates of every head for ``x [B, N, dim]`` (see :class:`MoHGates`), in float32/float64."""
        x = check_sequence("x", x, self.dim)
        dtype = compute_dtype(x.dtype)
        B, N, _ = x.shape
        parts: list[torch.Tensor] = []
        probs = selected = stage = None
        if self.shared_heads > 1:
            shared = torch.softmax(self.router_shared(x).to(dtype), dim=-1) * self.shared_heads  # (B, N, h_s)
        else:
            shared = x.new_ones(B, N, self.shared_heads, dtype=dtype) * self.shared_heads
        if self.routed_heads:
            probs = torch.softmax(self.router_routed(x).to(dtype), dim=-1)  # (B, N, E)
            top = torch.topk(probs, self.routed_heads_per_token, dim=-1).indices
            selected = F.one_hot(top, self.routed_heads).sum(dim=-2).to(dtype)  # (B, N, E)
            routed = probs * selected
            denominator = routed.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).eps)
            routed = routed / denominator * self.routed_heads_per_token
            if self.shared_heads:
                stage = torch.softmax(self.router_stage(x).to(dtype), dim=-1) * 2  # (B, N, 2)
                shared = shared * stage[..., :1]
                routed = routed * stage[..., 1:]
            parts = [shared, routed]
        else:
            parts = [shared]
        return MoHGates(torch.cat(parts, dim=-1), probs, selected, stage)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``; sets ``self.aux_loss`` in training mode."""
        routing = self.head_gates(x)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)  # (B, H, N, d)
        heads = softmax_attention(self.q_norm(q), self.k_norm(k), v, causal=self.causal)  # (B, H, N, d)
        gated = heads * rearrange(routing.gates, "b n h -> b h n 1").to(heads.dtype)  # (B, H, N, d)
        if self.training:
            if routing.router_probs is not None:
                self.aux_loss = moh_load_balance_loss(routing.router_probs, routing.selected)
            else:
                self.aux_loss = x.new_zeros((), dtype=compute_dtype(x.dtype))
        else:
            self.aux_loss = None
        return self.proj(rearrange(gated, "b h n d -> b n (h d)"))


register(Mechanism(
    name="moh",
    op=None,
    reference=None,
    layer=MoHAttention,
    family="routing",
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention",
    arxiv="2410.11842",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^2 d H) + O(N C H) routing",
    check=CheckConfig(layer_configs=({"shared_heads": 2, "routed_heads_per_token": 1},
                                     {"shared_heads": 1, "routed_heads_per_token": 2},
                                     {"shared_heads": 0, "routed_heads_per_token": 2},
                                     {"shared_heads": 4, "routed_heads_per_token": 0},
                                     {"shared_heads": 2, "routed_heads_per_token": 1, "qk_norm": True})),
))

"""LAMA: low-rank multi-head attention pooling with a global context vector.

Mehta, Rangwala & Ramakrishnan, "Low Rank Factorization for Compact Multi-Head Self-Attention",
arXiv 1912.00835, eq. 3.13 ("LAMA + ctx"), as the third-party port JohnGiorgi/
compact-multi-head-self-attention-pytorch (``modules/lama.py``) computes it (no official code).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_padding_mask, check_sequence
from attnlab.ops.validation import check_causal, check_int, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["LowRankAttentionPooling", "lama_layer_inputs"]


class LowRankAttentionPooling(nn.Module):
    """Pool a sequence into ``heads`` vectors with low-rank bilinear affinities to its mean.

    Mehta et al., "Low Rank Factorization for Compact Multi-Head Self-Attention", arXiv 1912.00835,
    eq. 3.13 (LAMA + ctx). With ``c = mean_j h_j`` (over the real tokens) and per head ``k``
    factors ``U_k, V_k in R^{dim x rank}``:

    ``f_{k,j} = 1^T tanh(U_k^T c ⊙ V_k^T h_j)`` (rank 1: ``tanh((P_k . c)(Q_k . h_j))``, the code),
    ``f_{:,j} <- f_{:,j} / ||f_{:,j}||_2`` (across heads), ``a_k = softmax_j(f_{k,:})``,
    ``M = A H``: one pooled vector per head. ``rank > 1`` is the paper's general low-rank bilinear form,
    inferred (the code uses rank 1, the default). ``out_features`` flattens ``M`` and applies
    ``Linear(heads * dim, out_features)`` (the code's optional output layer).

    Shapes: ``x [B, N, dim]``, ``key_padding_mask [B, N]`` (True = real token) ->
    ``[B, heads, dim]`` (or ``[B, out_features]``). Not causal: the context vector sees the whole sequence.
    """

    def __init__(self, dim: int, heads: int, *, rank: int = 1, out_features: int | None = None,
                 causal: bool = False) -> None:
        super().__init__()
        check_int("rank", rank, minimum=1)
        check_int("out_features", out_features, minimum=1, allow_none=True)
        check_causal(causal)
        if causal:
            raise NotImplementedError("LAMA defines no causal form (its context vector is the mean of the sequence)")
        if dim <= 0 or heads <= 0 or rank <= 0:
            raise ValueError(f"dim={dim}, heads={heads} and rank={rank} must be positive")
        self.dim, self.heads, self.rank = dim, heads, rank
        self.context_factors = nn.Parameter(torch.randn(heads, dim, rank) * dim**-0.5)  # U (P in the code)
        self.token_factors = nn.Parameter(torch.randn(heads, dim, rank) * dim**-0.5)  # V (Q in the code)
        self.output = nn.Linear(heads * dim, out_features) if out_features is not None else None

    def attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooling weights ``A [B, heads, N]`` (rows sum to 1, 0 on padding)."""
        x = check_sequence("x", x, self.dim)
        B, N, _ = x.shape
        if key_padding_mask is not None:
            check_padding_mask("key_padding_mask", key_padding_mask, B, N, x.device)
        dtype = compute_dtype(x.dtype)
        h = x.to(dtype)
        real = x.new_ones(B, N, dtype=dtype) if key_padding_mask is None else key_padding_mask.to(dtype)  # (B, N)
        context = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True)  # (B, dim)
        U, V = self.context_factors.to(dtype), self.token_factors.to(dtype)
        c_proj = torch.einsum("bc,kcr->bkr", context, U)  # (B, heads, rank)
        h_proj = torch.einsum("bnc,kcr->bknr", h, V)  # (B, heads, N, rank)
        f = torch.tanh(c_proj[:, :, None, :] * h_proj).sum(-1)  # (B, heads, N)
        f = f / f.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)  # L2 across heads
        if key_padding_mask is not None:
            f = f.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        return torch.softmax(f, dim=-1)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, dim] -> [B, heads, dim]`` (``[B, out_features]`` with an output layer)."""
        A = self.attention(x, key_padding_mask)  # (B, heads, N)
        pooled = torch.einsum("bkn,bnc->bkc", A, x.to(A.dtype)).to(x.dtype)  # (B, heads, dim)
        if self.output is None:
            return pooled
        return self.output(rearrange(pooled, "b k c -> b (k c)"))


def lama_layer_inputs(layer: LowRankAttentionPooling, *, batch: int, length: int, dim: int, dtype: torch.dtype,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Inputs of the layer-level suite: ``x [B, N, dim]`` pooled to ``[B, heads, dim]``."""
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    return {"x": x}, (batch, layer.heads, dim)


register(Mechanism(
    name="lama",
    op=None,
    reference=None,
    layer=LowRankAttentionPooling,
    family="pooling",
    paper="Low Rank Factorization for Compact Multi-Head Self-Attention",
    arxiv="1912.00835",
    supports_causal=False,
    supports_bidirectional=True,
    complexity="O(N dim heads rank)",
    role="pooling",
    check=CheckConfig(layer_configs=({}, {"rank": 3}), layer_inputs=lama_layer_inputs),
))

"""``TensorAttention``: a sequence layer around :func:`attnlab.ops.tensor_attention`."""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.tensor import IMPLS, tensor_attention
from attnlab.ops.validation import check_bool, check_causal, check_impl, check_int, check_scale
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["TensorAttention"]


class TensorAttention(nn.Module):
    """Multi-head third-order (Kronecker) self-attention, ``x [B, N, dim] -> [B, N, dim]``.

    Alman & Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention
    to Kronecker Computation", arXiv 2310.04064: ``Att = D^{-1} exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2)``.
    Five projections of ``x`` give ``q, k1, k2, v1, v2 [B, H, N, d]`` (``d = dim // heads``); the
    heads are concatenated and projected back. The projections (the paper defines the attention
    on given matrices) and the default ``scale = d ** -0.5`` are inferred; both are configurable.

    Args:
        dim: model width, divisible by ``heads``.
        heads: heads H.
        causal: (inferred) query ``i`` sees key pairs with ``max(j1, j2) <= i``.
        scale: score scale; ``None`` gives ``d ** -0.5`` (the paper's definition uses 1).
        impl: "chunked" (exact, O(N^3 d) time, memory bounded by query blocks), "auto" ("taylor"
            where :func:`attnlab.ops.tensor.taylor_error_bound` says it is exact to the working
            precision, else "chunked"), "reference"
            (exact, O(N^3) memory per head) or "taylor" (the polynomial method, O(N r d) with
            ``r = C(d + degree, degree)``).
        degree: Taylor degree for ``impl="taylor"``.
        bias: biases in the projections.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, scale: float | None = None, degree: int = 8,
                 bias: bool = False, impl: Literal["auto", "reference", "chunked", "taylor"] = "auto") -> None:
        super().__init__()
        check_int("degree", degree, minimum=1)
        check_bool("bias", bias)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        check_impl(impl, IMPLS)
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads
        self.scale = check_scale(scale, self.head_dim)
        self.impl, self.degree = impl, degree
        self.to_qkv = nn.Linear(dim, 5 * dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``."""
        x = check_sequence("x", x, self.dim)
        q, k1, k2, v1, v2 = rearrange(self.to_qkv(x), "b n (five h d) -> five b h n d", five=5, h=self.heads)
        out = tensor_attention(q, k1, k2, v1, v2, causal=self.causal, scale=self.scale, degree=self.degree,
                               impl=self.impl)  # (B, H, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


register(Mechanism(
    name="tensor",
    op=None,  # attnlab.ops.tensor_attention takes (q, k1, k2, v1, v2): tested in tests/test_tensor_attention.py
    reference=None,
    layer=TensorAttention,
    family="higher-order",
    paper="How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker Computation",
    arxiv="2310.04064",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^3 d) exact; O(N C(d+g,g) d) Taylor",
    check=CheckConfig(length=7, head_dim=4, heads=2,
                      layer_configs=({}, {"impl": "reference"}, {"impl": "taylor", "degree": 4})),
    role="mixer",
))

"""``DynamicMaskAttention``: the Doge attention layer with a learned dynamic mask (DMA).

Shi et al., "Trainable Dynamic Mask Sparse Attention" (arXiv 2508.02124); layer as in flash-dmattn's
``examples/modeling/modeling_doge.py`` (``DogeAttention``): the per-key bias is computed from the
values, ``bias[b, h, j] = A_h * softplus(dt_proj(flatten_heads(V))[b, j, h])`` with ``A`` initialised
to 0, and :func:`attnlab.ops.dynamic_mask_attention` does the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.ops.dynamic_mask import dynamic_mask_attention, dynamic_mask_attention_reference
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.validation import check_causal, check_float, check_int
from attnlab.registry import BenchShape, CheckConfig, Mechanism, register

__all__ = ["DynamicMaskAttention"]


class DynamicMaskAttention(nn.Module):
    """Self-attention ``x [B, N, dim] -> [B, N, dim]`` with a value-dependent dynamic key mask.

    ``dt = dt_proj(V)`` with ``dt_proj: Linear(H_kv * d -> H_kv)``; ``key_bias = A * softplus(dt)``
    ``[B, H_kv, N]``; each query keeps the ``k_budget`` causal keys of largest bias (DMA, arXiv
    2508.02124; ``DogeAttention`` of flash-dmattn). Not included here: the per-head q/k RMSNorm and
    RoPE of the Doge model (models add their own positions).

    Args:
        dim: model width, divisible by ``heads``.
        heads: query heads H.
        causal: causal masking (Doge is causal; non-causal keeps the top keys over the whole sequence).
        k_budget: keys kept per query (Doge config default 2048).
        kv_heads: key/value heads (default ``heads``).
        a_init: initial value of ``A`` (0 in the paper's code: the bias, and with it the selection
            among allowed keys, starts flat; any other value is this library's option).
        bias: biases in the q/k/v/out projections.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, k_budget: int = 2048,
                 kv_heads: int | None = None, a_init: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        check_int("k_budget", k_budget, minimum=1)
        check_int("kv_heads", kv_heads, minimum=1, allow_none=True)
        check_float("a_init", a_init)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads <= 0 or heads % kv_heads != 0:
            raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
        if isinstance(k_budget, bool) or not isinstance(k_budget, int) or k_budget < 1:
            raise ValueError(f"k_budget must be a positive int, got k_budget={k_budget!r}")
        self.dim, self.heads, self.kv_heads, self.causal = dim, heads, kv_heads, causal
        self.head_dim = dim // heads
        self.k_budget = k_budget
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=bias)
        self.dt_proj = nn.Linear(kv_heads * self.head_dim, kv_heads)
        self.A = nn.Parameter(torch.full((kv_heads,), float(a_init)))
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def key_bias(self, v: torch.Tensor) -> torch.Tensor:
        """``A * softplus(dt_proj(V))``: ``v [B, H_kv, M, d] -> [B, H_kv, M]``."""
        dt = self.dt_proj(rearrange(v, "b h m d -> b m (h d)"))  # (B, M, H_kv)
        return rearrange(self.A * F.softplus(dt), "b m h -> b h m")  # (B, H_kv, M)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, dim={self.dim}], got {tuple(x.shape)}")
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)
        k, v = rearrange(self.to_kv(x), "b m (two h d) -> two b h m d", two=2, h=self.kv_heads)  # (B, H_kv, N, d)
        key_bias = self.key_bias(v)  # (B, H_kv, N)
        out = dynamic_mask_attention(q, k, v, key_bias=key_bias, k_budget=self.k_budget,
                                     causal=self.causal)  # (B, H, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _check_key_bias(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, length, generator=generator, dtype=torch.float64)


def _bench_options(shape: BenchShape) -> dict[str, object]:
    """A fixed random key bias ``[B, H_kv, N]`` (standing in for the layer's ``A softplus(dt_proj(V))``) and a
    budget of 512 keys per query (the paper's long-context setting), in the benchmark's device and dtype."""
    generator = torch.Generator().manual_seed(2)
    key_bias = torch.randn(shape.batch, shape.kv_heads, shape.length, generator=generator)  # (B, H_kv, N)
    return {"key_bias": key_bias.to(shape.device, shape.dtype), "k_budget": min(512, shape.length)}


register(Mechanism(
    name="dynamic_mask",
    op=dynamic_mask_attention,
    reference=dynamic_mask_attention_reference,
    layer=DynamicMaskAttention,
    family="sparse",
    paper="Trainable Dynamic Mask Sparse Attention",
    arxiv="2508.02124",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N w d + N M)",
    bench_options=_bench_options,
    # key_bias has the key length, so the op checks run at N = M = 8 (gradcheck too); a fixed random
    # bias [1, 1, M] broadcasts over batch and heads. The layer checks use A != 0 (with the paper's
    # A = 0 no gradient reaches dt_proj at initialisation).
    check=CheckConfig(length=8, key_length=8, gradcheck_length=8,
                      options={"key_bias": _check_key_bias(8, 0), "k_budget": 3},
                      bf16_options={"key_bias": _check_key_bias(512, 1), "k_budget": 64},
                      layer_configs=({"k_budget": 3, "a_init": 0.5},)),
))

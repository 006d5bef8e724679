"""Efficient attentive probing (EP): learned queries pool frozen tokens, each into its own value chunk.

Psomas et al., "Attention, Please! Revisiting Attentive Probing for Masked Image Modeling"
(arXiv 2506.10178; code billpsomas/efficient-probing, ``poolings/ep.py::EfficientProbing`` and
``probe_heads.py``).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_padding_mask, check_sequence
from attnlab.ops.validation import check_bool, check_int, check_scale
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["EfficientProbe"]


class EfficientProbe(nn.Module):
    """Efficient probing: ``M`` learned queries, no query/key projections, one value chunk per query.

    Psomas et al., arXiv 2506.10178 (``EfficientProbing`` of the official code), with ``X [B, N, C]``
    the frozen tokens, ``Q [M, C]`` the learned queries and ``W_v: C -> C / d_out``:

        A = softmax(scale * Q X^T)                     # (M, N), keys are the raw tokens
        V = X W_v, split into M contiguous chunks V^(m) of width C / (d_out M)
        out = concat_m(A_m V^(m))                       # (C / d_out): query m pools only chunk m

    With ``num_classes`` the probe head of the code follows:
    ``BatchNorm1d(C / d_out, affine=False, eps=1e-6)`` then ``Linear(C / d_out, num_classes)``.

    Args:
        dim: token width C, divisible by ``d_out * num_queries``.
        num_queries: M (default 32, ``--ep_queries``).
        num_classes: ``None`` returns the pooled ``[B, C / d_out]`` vector; an int adds the probe head
            and returns logits ``[B, num_classes]``.
        d_out: width reduction of the values (default 1).
        qkv_bias: bias of ``W_v`` (default False).
        scale: score scale, default ``C ** -0.5`` (the code's ``head_dim ** -0.5`` with one head).
    """

    def __init__(self, dim: int, *, num_queries: int = 32, num_classes: int | None = None, d_out: int = 1,
                 qkv_bias: bool = False, scale: float | None = None) -> None:
        super().__init__()
        check_int("num_queries", num_queries, minimum=1)
        check_int("num_classes", num_classes, minimum=1, allow_none=True)
        check_int("d_out", d_out, minimum=1)
        check_bool("qkv_bias", qkv_bias)
        for name, value in (("dim", dim), ("num_queries", num_queries), ("d_out", d_out)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if dim % (d_out * num_queries) != 0:
            raise ValueError(
                f"dim={dim} must be divisible by d_out * num_queries = {d_out} * {num_queries} (each query pools "
                f"its own chunk of the {dim // d_out if dim % d_out == 0 else dim / d_out} value channels)"
            )
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes <= 0):
            raise ValueError(f"num_classes must be None or a positive int, got num_classes={num_classes!r}")
        self.dim, self.num_queries, self.d_out = dim, num_queries, d_out
        self.out_dim = dim // d_out
        self.scale = check_scale(scale, dim)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)  # (M, C)
        self.to_v = nn.Linear(dim, self.out_dim, bias=qkv_bias)
        self.head: nn.Module | None = None
        if num_classes is not None:
            self.head = nn.Sequential(nn.BatchNorm1d(self.out_dim, affine=False, eps=1e-6),
                                      nn.Linear(self.out_dim, num_classes))

    def attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention of each query over the tokens, ``[B, M, N]`` (rows sum to 1)."""
        scores = torch.einsum("mc,bnc->bmn", self.queries * self.scale, x)  # (B, M, N)
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def pool(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` -> pooled ``[B, C / d_out]`` (no probe head)."""
        x = check_sequence("x", x, self.dim)
        if key_padding_mask is not None:
            check_padding_mask("key_padding_mask", key_padding_mask, x.shape[0], x.shape[1], x.device)
        attn = self.attention(x, key_padding_mask)  # (B, M, N)
        v = rearrange(self.to_v(x), "b n (m c) -> b m n c", m=self.num_queries)  # (B, M, N, C / (d_out M))
        pooled = torch.einsum("bmn,bmnc->bmc", attn, v)  # query m pools chunk m
        return rearrange(pooled, "b m c -> b (m c)")

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, C]`` (``key_padding_mask [B, N]``, True = real token) -> ``[B, C / d_out]``, or
        logits ``[B, num_classes]`` when the probe head is present."""
        pooled = self.pool(x, key_padding_mask)
        return pooled if self.head is None else self.head(pooled)


def _build_probe(dim: int, heads: int, *, causal: bool = False, **config: object) -> EfficientProbe:
    if causal:
        raise NotImplementedError("efficient probing defines no causal form (it pools a whole sequence)")
    return EfficientProbe(dim, **config)  # type: ignore[arg-type]


def _probe_inputs(layer: EfficientProbe, *, batch: int, length: int, dim: int, dtype: torch.dtype,
                  generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    width = layer.out_dim if layer.head is None else layer.head[-1].out_features
    return {"x": x}, (batch, width)


register(Mechanism(
    name="efficient_probe",
    op=None,
    reference=None,
    layer=EfficientProbe,
    family="pooling",
    paper="Attention, Please! Revisiting Attentive Probing for Masked Image Modeling",
    arxiv="2506.10178",
    supports_causal=False,
    supports_bidirectional=True,
    complexity="O(M N C)",
    check=CheckConfig(layer_configs=({"num_queries": 8}, {"num_queries": 4, "d_out": 2}),
                      layer_build=_build_probe, layer_inputs=_probe_inputs),
    role="probe",
))

"""MODA duplex alignment: visual keys mapped into the text key space before attention.

Zhang et al., "MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion
Understanding", ICML 2025, arXiv 2507.04635 (code KwaiVGI/MODA
``moda/model/language_model/modeling_llama_local_moda.py::LlamaAttention.forward``).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_bool, check_causal, check_float
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["DuplexAlignmentAttention", "duplex_align"]


def _unit_keys(k: torch.Tensor, eps: float) -> torch.Tensor:
    shifted = k + eps  # the code's phi(k) + 1e-6 with phi = identity
    return shifted / shifted.norm(dim=-1, keepdim=True)


def _basis(keys: torch.Tensor, values: torch.Tensor, member: torch.Tensor, *, prefix: bool) -> torch.Tensor:
    """Row-normalised Gram ``G = sum_{t in member} k̂_t^T v_t`` per head: ``[B, H, d, d]``, or per position
    ``[B, H, N, d, d]`` over the members up to that position when ``prefix``."""
    weighted = keys * member[:, None, :, None].to(keys.dtype)  # (B, H, N, d), non-members zeroed
    if prefix:
        gram = torch.cumsum(torch.einsum("bhnd,bhne->bhnde", weighted, values), dim=2)  # (B, H, N, d, d)
    else:
        gram = torch.einsum("bhnd,bhne->bhde", weighted, values)  # (B, H, d, d)
    # no member yet -> G = 0 (the code divides 0 by 0 there)
    return gram / gram.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)


def duplex_align(k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, target: torch.Tensor, *,
                 ratio: torch.Tensor, fuse: nn.Linear, prefix: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Keys of the ``target`` tokens aligned to the ``source`` modality (MODA's V-aligner, as shipped).

    MODA code: ``K̂ = (K + eps) / ||K + eps||`` row-wise; ``G = K̂_s^T V_s`` row-normalised;
    ``K_t <- W_fuse(K_t + ratio ⊙ K̂_t G)``. ``k, v [B, H, N, d]``; ``source, target [B, N]`` boolean
    (e.g. text and visual flags). Keys outside ``target`` are returned unchanged. With ``prefix``
    (inferred, causal) the basis of position ``j`` uses only the source tokens at positions ``<= j``.
    """
    unit = _unit_keys(k, eps)  # (B, H, N, d)
    gram = _basis(unit, v, source, prefix=prefix)
    if prefix:
        aligned = torch.einsum("bhnd,bhnde->bhne", unit, gram)  # (B, H, N, d)
    else:
        aligned = torch.einsum("bhnd,bhde->bhne", unit, gram)
    fused = fuse(k + ratio * aligned)  # (B, H, N, d)
    return torch.where(target[:, None, :, None], fused, k)


class DuplexAlignmentAttention(nn.Module):
    """Causal multi-head attention whose visual keys are first aligned to the text key space (MODA).

    MODA, arXiv 2507.04635, duplex alignment (as shipped in the official code): with the text
    "basis" ``G_t = K̂_t^T V_t`` (row-normalised; ``K̂`` the unit-norm keys), the visual keys become
    ``K_v <- W_fuse(K_v + r_v ⊙ K̂_v G_t)`` with ``r_v ∈ R^d`` (zero-initialised) and ``W_fuse`` a
    ``d x d`` linear without bias shared by the heads; then attention proceeds as usual.
    ``duplex=True`` adds the symmetric path (``K_t <- W_fuse_t(K_t + r_t ⊙ K̂_t G_v)``, commented out in
    the code), computed from the keys before either update.

    Differences from the code, all configurable:
    - ``fuse_init="identity"`` (default, inferred) starts ``W_fuse`` at the identity so the layer
      starts as standard attention; ``"random"`` keeps ``nn.Linear``'s default init as in the code.
    - ``alignment="global"`` (the code) builds ``G_t`` from every text token, including text that
      comes after a visual key: under causal masking this lets outputs depend on later text tokens.
      ``alignment="prefix"`` (inferred) uses only text tokens at or before each visual key's position,
      which keeps the layer causal.
    - The code applies RoPE before the alignment; this layer has no position encoding of its own.
    - The adaptive masked attention of the paper is not in the released code and is not implemented.

    ``forward(x [B, N, dim], visual_mask [B, N], text_mask=None) -> [B, N, dim]``; boolean masks,
    ``text_mask`` defaults to ``~visual_mask``.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, duplex: bool = False,
                 alignment: Literal["global", "prefix"] = "global",
                 fuse_init: Literal["identity", "random"] = "identity", bias: bool = False,
                 eps: float = 1e-6) -> None:
        super().__init__()
        check_float("eps", eps, minimum=0.0, strict_minimum=True)
        check_bool("duplex", duplex)
        check_bool("bias", bias)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if alignment not in ("global", "prefix"):
            raise ValueError(f"alignment={alignment!r} is not one of 'global', 'prefix'")
        if fuse_init not in ("identity", "random"):
            raise ValueError(f"fuse_init={fuse_init!r} is not one of 'identity', 'random'")
        self.dim, self.heads, self.causal, self.duplex = dim, heads, causal, duplex
        self.alignment, self.eps = alignment, eps
        self.head_dim = d = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.ratio_v = nn.Parameter(torch.zeros(d))
        self.fuse_v = nn.Linear(d, d, bias=False)
        self.ratio_t = nn.Parameter(torch.zeros(d)) if duplex else None
        self.fuse_t = nn.Linear(d, d, bias=False) if duplex else None
        if fuse_init == "identity":
            with torch.no_grad():
                for fuse in (self.fuse_v, self.fuse_t):
                    if fuse is not None:
                        fuse.weight.copy_(torch.eye(d))

    def _flags(self, name: str, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean tensor [B, N], got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"{name} must have shape [B, N] = {list(x.shape[:2])}, got {tuple(mask.shape)}")
        return mask

    def forward(self, x: torch.Tensor, visual_mask: torch.Tensor, text_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        x = check_sequence("x", x, self.dim)
        visual = self._flags("visual_mask", visual_mask, x)
        text = ~visual if text_mask is None else self._flags("text_mask", text_mask, x)
        if bool((visual & text).any()):
            raise ValueError("visual_mask and text_mask overlap: a token is either visual or text")
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.to_q, self.to_k, self.to_v))
        prefix = self.alignment == "prefix"
        keys = duplex_align(k, v, text, visual, ratio=self.ratio_v, fuse=self.fuse_v, prefix=prefix, eps=self.eps)
        if self.duplex:
            assert self.ratio_t is not None and self.fuse_t is not None
            from_visual = duplex_align(k, v, visual, text, ratio=self.ratio_t, fuse=self.fuse_t, prefix=prefix,
                                       eps=self.eps)
            keys = torch.where(text[:, None, :, None], from_visual, keys)
        out = softmax_attention(q, keys, v, causal=self.causal)  # (B, H, N, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def _build(dim: int, heads: int, *, causal: bool = False, **config: object) -> DuplexAlignmentAttention:
    layer = DuplexAlignmentAttention(dim, heads, causal=causal, **config)  # type: ignore[arg-type]
    with torch.no_grad():  # leave the zero/identity start so that the checks see the alignment path
        layer.ratio_v.normal_(0.0, 0.5)
        if layer.ratio_t is not None:
            layer.ratio_t.normal_(0.0, 0.5)
    return layer


def _inputs(layer: DuplexAlignmentAttention, *, batch: int, length: int, dim: int, dtype: torch.dtype,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, 1: 1 + length // 2] = True  # a text token, an image, then text (as in LLaVA prompts)
    return {"x": x, "visual_mask": visual}, (batch, length, dim)


register(Mechanism(
    name="moda_duplex",
    op=None,
    reference=None,
    layer=DuplexAlignmentAttention,
    family="cross-attention",
    paper="MODA: MOdular Duplex Attention for Multimodal Perception, Cognition, and Emotion Understanding",
    arxiv="2507.04635",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^2 d + N d^2)",
    # the suite's no-look-ahead check needs the causal-safe "prefix" basis (see the class docstring)
    check=CheckConfig(layer_configs=({"alignment": "prefix"}, {"alignment": "prefix", "duplex": True}),
                      layer_build=_build, layer_inputs=_inputs),
    role="cross",
))

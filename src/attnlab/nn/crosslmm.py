"""CrossLMM: pooled visual tokens in the LLM, gated cross-attention back to the original visual tokens.

Yan et al., "CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention
Mechanisms", arXiv 2505.17020, Sec. 3.1-3.3 and Fig. 3 (there is no official code).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from attnlab.nn.attention import Attention
from attnlab.nn.dcal import _Projections
from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_bool, check_causal, check_float, check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["merge_visual_tokens", "PooledVisualCrossAttention"]


def merge_visual_tokens(frames: torch.Tensor, *, output_size: int = 3,
                        mode: Literal["avg", "max"] = "avg") -> torch.Tensor:
    """Token merge of CrossLMM (Sec. 3.1): pool each frame's token grid to ``output_size x output_size``.

    ``frames [B, F, h, w, D]`` (e.g. 27 x 27 SigLIP tokens) -> ``[B, F * output_size**2, D]``
    (3 x 3 = 9 tokens per frame in the paper), frame-major then row-major. The paper says
    "bilinear pooling"; average pooling is the default here (inferred), ``mode="max"`` the alternative.
    The MLP projector that follows is the model's, not part of this function.
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 5:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must have shape [B, F, h, w, D], got {shape}")
    if output_size <= 0 or output_size > min(frames.shape[2], frames.shape[3]):
        raise ValueError(f"output_size={output_size} must be in [1, min(h, w)={min(frames.shape[2:4])}]")
    if mode not in ("avg", "max"):
        raise ValueError(f"mode={mode!r} is not one of 'avg', 'max'")
    B, Fr, h, w, D = frames.shape
    grid = frames.reshape(B * Fr, h, w, D).permute(0, 3, 1, 2)  # (B F, D, h, w)
    pool = F.adaptive_avg_pool2d if mode == "avg" else F.adaptive_max_pool2d
    pooled = pool(grid, output_size)  # (B F, D, s, s)
    return pooled.permute(0, 2, 3, 1).reshape(B, Fr * output_size * output_size, D)


class PooledVisualCrossAttention(nn.Module):
    """CrossLMM's dual cross-attention layer on ``I = [V_pooled; T]``, with the original tokens ``V``.

    Yan et al., arXiv 2505.17020, Sec. 3.2-3.3:

        I' = LN(SelfAttn(I) + I)
        I'[:L_v]  += tanh(g_v2v) * Attn(W_q I'[:L_v],  W_k V, W_v V)     # visual-to-visual
        I'[L_v:]  += tanh(g_t2v) * Attn(W_q I'[L_v:],  W_k V, W_v V)     # text-to-visual

    One set of cross-attention projections (``W_q, W_k, W_v`` and the output projection) serves both
    branches, as the paper's notation reads; the gates ``g`` are separate learned scalars
    initialised to ``gate_init = 0`` (inferred), so the layer starts as its self-attention sublayer.
    The paper inserts the layer every K LLM layers (K = 4 by default, inferred).

    Args:
        dim, heads: width and heads of the LLM.
        causal: causal self-attention sublayer (the LLM's); the cross-attention reads all of ``V``.
        visual_length: ``L_v``, the number of pooled visual tokens at the start of ``I`` (can be given
            per call instead).
        gate_init: initial value of both gates' ``g``.
        bias: biases in the projections.

    ``forward(x [B, L_v + L_t, dim], visual [B, N_v, dim], visual_length=None) -> [B, L_v + L_t, dim]``.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, visual_length: int | None = None,
                 gate_init: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        check_int("visual_length", visual_length, minimum=1, allow_none=True)
        check_float("gate_init", gate_init)
        check_bool("bias", bias)
        check_causal(causal)
        self.dim, self.heads, self.causal = dim, heads, causal
        self.visual_length = visual_length
        self.self_attention = Attention(dim, heads, causal=causal, bias=bias)
        self.norm = nn.LayerNorm(dim)
        self.cross = _Projections(dim, heads, bias)
        self.gate_v2v = nn.Parameter(torch.tensor(float(gate_init)))
        self.gate_t2v = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, x: torch.Tensor, visual: torch.Tensor, visual_length: int | None = None) -> torch.Tensor:
        x = check_sequence("x", x, self.dim)
        visual = check_sequence("visual", visual, self.dim)
        if visual.shape[0] != x.shape[0]:
            raise ValueError(f"visual must have the batch size of x (B={x.shape[0]}), got {tuple(visual.shape)}")
        length = self.visual_length if visual_length is None else visual_length
        if length is None:
            raise ValueError("visual_length (the number of pooled visual tokens at the start of x) is not set")
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= x.shape[1]:
            raise ValueError(f"visual_length must be an int in [0, N={x.shape[1]}], got visual_length={length!r}")
        mixed = self.norm(self.self_attention(x) + x)  # I', (B, L, dim)
        k, v = self.cross.keys_values(visual)  # (B, H, N_v, d)
        attended = self.cross.output(softmax_attention(self.cross.queries(mixed), k, v))  # (B, L, dim)
        is_visual = torch.arange(x.shape[1], device=x.device) < length  # (L,)
        gate = torch.where(is_visual, torch.tanh(self.gate_v2v), torch.tanh(self.gate_t2v))  # (L,)
        return mixed + gate[None, :, None].to(mixed.dtype) * attended


def _build(dim: int, heads: int, *, causal: bool = False, **config: object) -> PooledVisualCrossAttention:
    config.setdefault("visual_length", 3)
    config.setdefault("gate_init", 0.5)  # non-zero so that the checks reach the cross-attention weights
    return PooledVisualCrossAttention(dim, heads, causal=causal, **config)  # type: ignore[arg-type]


def _inputs(layer: PooledVisualCrossAttention, *, batch: int, length: int, dim: int, dtype: torch.dtype,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    x = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    visual = torch.randn(batch, 2 * length, dim, generator=generator, dtype=torch.float64).to(dtype)
    return {"x": x, "visual": visual}, (batch, length, dim)


register(Mechanism(
    name="crosslmm",
    op=None,
    reference=None,
    layer=PooledVisualCrossAttention,
    family="cross-attention",
    paper="CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms",
    arxiv="2505.17020",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    complexity="O(L^2 d + L N_v d)",
    check=CheckConfig(layer_build=_build, layer_inputs=_inputs),
    role="cross",
))

"""SegVG Triple Alignment: object queries, text and visual tokens updated by one joint attention.

Kang et al., "SegVG: Transferring Object Bounding Box to Segmentation for Visual Grounding",
ECCV 2024, arXiv 2407.03200 (code WeitaiKang/SegVG ``models/vl_transformer.py::Triple_Alignment_MHA``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.validation import check_float, check_int, check_tensor
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["TripleAlignmentAttention", "TripleAlignmentOutput"]


class TripleAlignmentOutput(NamedTuple):
    """The three updated streams, in the order the reference code returns them."""

    visual: torch.Tensor  # (B, N_v, dim)
    text: torch.Tensor  # (B, L, text_dim)
    objects: torch.Tensor  # (B, N_o, dim)


class _Modality(nn.Module):
    """Pre-LN and q/k/v input projections of one stream, output projection back to its width."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, dim)
        self.to_k = nn.Linear(width, dim)
        self.to_v = nn.Linear(width, dim)
        self.to_out = nn.Linear(dim, width)

    def qkv(self, x: torch.Tensor, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        normed = self.norm(x)
        with_pos = normed if pos is None else normed + pos
        return self.to_q(with_pos), self.to_k(with_pos), self.to_v(normed)


class TripleAlignmentAttention(nn.Module):
    """Tri-MHA: one multi-head self-attention over ``[objects; text; visual]``, per-modality weights.

    SegVG, arXiv 2407.03200 (Triple Alignment; ``Triple_Alignment_MHA`` of the official code). Each
    stream is layer-normed, projected to q, k, v of width ``dim`` by its own linears (text from
    ``text_dim``); the position embeddings are added before the q and k projections of the objects
    and the visual tokens (not to the values, not to text). The joint attention is scaled dot
    product with key padding; each stream's output is projected back by its own linear (text back
    to ``text_dim``), dropped out and added to the stream's input (residual).

    Masks follow attnlab's convention, True = real token (the code's masks are True = padding).
    The code's "DropKey" adds ``bernoulli(0.1) * -1e-12`` to the scores, which changes nothing; real
    DropKey (inferred) is the option ``drop_key``: in training, each score is dropped (``-1e12``)
    with that probability. Default 0 reproduces the code.

    Args:
        dim: width of the object and visual streams (256 in SegVG); heads: 8 in SegVG.
        text_dim: width of the text stream (768, BERT).
        dropout: dropout on each projected output (0.1 in the code).
        drop_key: DropKey ratio in training (inferred; 0 = the code's behaviour).
    """

    def __init__(self, dim: int = 256, heads: int = 8, *, text_dim: int = 768, dropout: float = 0.1,
                 drop_key: float = 0.0) -> None:
        super().__init__()
        check_int("text_dim", text_dim, minimum=1)
        check_float("dropout", dropout, minimum=0.0, maximum=1.0)
        check_float("drop_key", drop_key, minimum=0.0, maximum=1.0)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if text_dim <= 0:
            raise ValueError(f"text_dim must be positive, got text_dim={text_dim}")
        if not 0.0 <= drop_key < 1.0:
            raise ValueError(f"drop_key must be in [0, 1), got drop_key={drop_key}")
        self.dim, self.heads, self.text_dim, self.drop_key = dim, heads, text_dim, drop_key
        self.head_dim = dim // heads
        self.objects = _Modality(dim, dim)
        self.text = _Modality(text_dim, dim)
        self.visual = _Modality(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _mask(self, name: str, mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[:2]
        if mask is None:
            return torch.ones(B, N, dtype=torch.bool, device=x.device)
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean tensor (True = real token), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"{name} must have shape [B, N] = {[B, N]}, got {tuple(mask.shape)}")
        return mask

    def _pos(self, name: str, pos: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if pos is None:
            return None
        check_tensor(name, pos)
        if tuple(pos.shape) not in (tuple(x.shape), tuple(x.shape[1:])):
            raise ValueError(
                f"{name} must have shape [B, N, dim] = {list(x.shape)} or [N, dim], got {tuple(pos.shape)}"
            )
        return pos

    def forward(self, visual: torch.Tensor, text: torch.Tensor, objects: torch.Tensor, *,
                visual_pos: torch.Tensor | None = None, object_pos: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                object_mask: torch.Tensor | None = None) -> TripleAlignmentOutput:
        """``visual [B, N_v, dim]``, ``text [B, L, text_dim]``, ``objects [B, N_o, dim]`` (+ positions
        and boolean masks, True = real token) -> :class:`TripleAlignmentOutput`."""
        visual = check_sequence("visual", visual, self.dim)
        text = check_sequence("text", text, self.text_dim)
        objects = check_sequence("objects", objects, self.dim)
        B = visual.shape[0]
        for name, x in (("text", text), ("objects", objects)):
            if x.shape[0] != B:
                raise ValueError(f"{name} must have the batch size of visual (B={B}), got {tuple(x.shape)}")
        keep = torch.cat([self._mask("object_mask", object_mask, objects), self._mask("text_mask", text_mask, text),
                          self._mask("visual_mask", visual_mask, visual)], dim=1)  # (B, N_o + L + N_v)
        if not bool(keep.any(dim=1).all()):
            raise ValueError("the masks leave a batch row without any real token to attend to")
        parts = [self.objects.qkv(objects, self._pos("object_pos", object_pos, objects)),
                 self.text.qkv(text, None),
                 self.visual.qkv(visual, self._pos("visual_pos", visual_pos, visual))]
        columns = zip(*parts, strict=True)  # the q parts, the k parts, the v parts
        q, k, v = (rearrange(torch.cat(c, dim=1), "b n (h d) -> b h n d", h=self.heads) for c in columns)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * self.head_dim**-0.5  # (B, H, T, T)
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        if self.training and self.drop_key > 0:
            dropped = torch.bernoulli(torch.full_like(scores, self.drop_key)).bool()
            scores = scores.masked_fill(dropped, -1e12)
        out = rearrange(scores.softmax(dim=-1) @ v, "b h n d -> b n (h d)")  # (B, T, dim)
        n_o, n_t = objects.shape[1], text.shape[1]
        return TripleAlignmentOutput(
            visual=visual + self.dropout(self.visual.to_out(out[:, n_o + n_t:])),
            text=text + self.dropout(self.text.to_out(out[:, n_o:n_o + n_t])),
            objects=objects + self.dropout(self.objects.to_out(out[:, :n_o])),
        )


class _AllStreams(nn.Module):
    """The layer as the layer-level checks see it: the three streams concatenated along the sequence
    (``text_dim == dim`` there), so that every stream's weights are checked, not only the visual ones."""

    def __init__(self, layer: TripleAlignmentAttention) -> None:
        super().__init__()
        self.layer = layer
        self.text_dim = layer.text_dim

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.layer(**inputs)
        return torch.cat([out.visual, out.text, out.objects], dim=1)


def _build(dim: int, heads: int, *, causal: bool = False, **config: object) -> nn.Module:
    if causal:
        raise NotImplementedError("SegVG's triple alignment is bidirectional; it defines no causal form")
    config.setdefault("dropout", 0.0)
    return _AllStreams(TripleAlignmentAttention(dim, heads, text_dim=dim, **config))  # type: ignore[arg-type]


def _inputs(layer: _AllStreams, *, batch: int, length: int, dim: int, dtype: torch.dtype,
            generator: torch.Generator) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    inputs = {"visual": draw(batch, length, dim), "text": draw(batch, 5, layer.text_dim),
              "objects": draw(batch, 3, dim), "visual_pos": draw(batch, length, dim), "object_pos": draw(batch, 3, dim)}
    return inputs, (batch, length + 5 + 3, dim)


register(Mechanism(
    name="segvg_triple",
    op=None,
    reference=None,
    layer=TripleAlignmentAttention,
    family="cross-attention",
    paper="SegVG: Transferring Object Bounding Box to Segmentation for Visual Grounding",
    arxiv="2407.03200",
    supports_causal=False,
    supports_bidirectional=True,
    supports_cross=True,
    complexity="O((N_o + L + N_v)^2 d)",
    check=CheckConfig(layer_build=_build, layer_inputs=_inputs),
    role="cross",
))

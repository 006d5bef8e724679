"""Minimal attention: collapsed or symmetric ``W_QK``, optional value/output projections, no MLP.

Bermeitinger et al., "Reducing the Transformer Architecture to a Minimum", arXiv 2410.13732. Only the
abstract was available: the claims (MLP omitted, ``W_Q W_K^T`` collapsed into one matrix, V and O
omitted, symmetric similarity with half the parameters) are the paper's; every formula below is
inferred (our reading, listed under ``minimal`` in ``docs/mechanisms.md``) and configurable.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.validation import check_bool, check_causal, check_int, check_scale, compute_dtype
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["MinimalAttention", "MinimalBlock"]

SIMILARITIES = ("qk", "collapsed", "symmetric")


class MinimalAttention(nn.Module):
    """Self-attention with the similarity forms of "Reducing the Transformer Architecture to a Minimum".

    Bermeitinger et al., arXiv 2410.13732 (abstract; formulas inferred). Per head ``h``, scores
    ``S_h = scale * X W^h X^T`` with (``scale`` default ``head_dim ** -0.5``):

    - ``similarity="qk"``: ``W^h = W_Q^h W_K^{hT}`` (two ``dim x head_dim`` matrices, the standard form);
    - ``"collapsed"``: one ``dim x dim`` matrix ``W_QK^h`` (an exact reparametrisation of "qk" when
      ``head_dim >= dim``; otherwise "qk" is its rank-``head_dim`` special case, the paper's
      "under some conditions");
    - ``"symmetric"``: ``W_S^h = W_S^{hT}``, stored as its upper triangle (``dim (dim + 1) / 2``
      parameters, "half of the parameters"), or as ``W W^T`` with ``W in R^{dim x symmetric_rank}``;
      then ``s(x_i, x_j) = s(x_j, x_i)``.

    ``value_output=True``: ``Y = W_O concat_h softmax(S_h) X W_V^h``. ``value_output=False`` drops V and
    O: ``Y = combine_h softmax(S_h) X`` with ``head_combine`` "mean" (default) or "sum" (unspecified in
    the abstract). :meth:`collapsed` turns a "qk" layer into the equal "collapsed" one.

    Shapes: ``x [B, N, dim] -> [B, N, dim]``; :meth:`scores` gives ``S [B, H, N, N]``.
    """

    def __init__(self, dim: int, heads: int, *, similarity: Literal["qk", "collapsed", "symmetric"] = "qk",
                 value_output: bool = True, causal: bool = False, head_dim: int | None = None,
                 symmetric_rank: int | None = None, head_combine: Literal["mean", "sum"] = "mean",
                 scale: float | None = None) -> None:
        super().__init__()
        check_int("head_dim", head_dim, minimum=1, allow_none=True)
        check_int("symmetric_rank", symmetric_rank, minimum=1, allow_none=True)
        check_bool("value_output", value_output)
        check_causal(causal)
        if dim <= 0 or heads <= 0:
            raise ValueError(f"dim={dim} and heads={heads} must be positive")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r} is not one of {SIMILARITIES}")
        if head_combine not in ("mean", "sum"):
            raise ValueError(f"head_combine={head_combine!r} is not 'mean' or 'sum'")
        head_dim = dim // heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"head_dim={head_dim} must be positive")
        if symmetric_rank is not None and (similarity != "symmetric" or symmetric_rank <= 0):
            raise ValueError(f"symmetric_rank={symmetric_rank} needs similarity='symmetric' and a positive rank")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, head_dim, causal
        self.similarity, self.value_output, self.head_combine = similarity, value_output, head_combine
        self.symmetric_rank = symmetric_rank
        self.scale = check_scale(scale, head_dim)
        # the product form's initial distribution, for every form
        w_q = nn.Linear(dim, heads * head_dim, bias=False).weight.detach().reshape(heads, head_dim, dim)
        w_k = nn.Linear(dim, heads * head_dim, bias=False).weight.detach().reshape(heads, head_dim, dim)
        if similarity == "qk":
            self.w_q = nn.Parameter(w_q.transpose(1, 2).contiguous())  # (H, dim, d)
            self.w_k = nn.Parameter(w_k.transpose(1, 2).contiguous())  # (H, dim, d)
        elif similarity == "collapsed":
            self.w_qk = nn.Parameter(torch.einsum("hdc,hde->hce", w_q, w_k))  # (H, dim, dim)
        elif symmetric_rank is None:
            product = torch.einsum("hdc,hde->hce", w_q, w_k)
            rows, cols = torch.triu_indices(dim, dim)
            self.register_buffer("triangle_index", torch.stack([rows, cols]), persistent=False)
            self.w_triangle = nn.Parameter(((product + product.transpose(1, 2)) / 2)[:, rows, cols])  # (H, T)
        else:
            self.w_factor = nn.Parameter(torch.randn(heads, dim, symmetric_rank) * (dim * symmetric_rank) ** -0.25)
        if value_output:
            self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
            self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def similarity_matrix(self) -> torch.Tensor:
        """``W^h`` of every head: ``[H, dim, dim]``."""
        if self.similarity == "qk":
            return torch.einsum("hcd,hed->hce", self.w_q, self.w_k)
        if self.similarity == "collapsed":
            return self.w_qk
        if self.symmetric_rank is not None:
            return torch.einsum("hcr,her->hce", self.w_factor, self.w_factor)
        rows, cols = self.triangle_index
        upper = self.w_triangle.new_zeros(self.heads, self.dim, self.dim)
        upper[:, rows, cols] = self.w_triangle  # (H, dim, dim), upper triangle
        return upper + upper.transpose(1, 2) - torch.diag_embed(torch.diagonal(upper, dim1=1, dim2=2))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``S_h = scale * X W^h X^T``: ``[B, H, N, N]`` (before any mask), float32/float64."""
        x = check_sequence("x", x, self.dim)
        dtype = compute_dtype(x.dtype)
        xf = x.to(dtype)
        if self.similarity == "qk":  # the two-matrix form, never materialising W_Q W_K^T
            q = torch.einsum("bnc,hcd->bhnd", xf, self.w_q.to(dtype))
            k = torch.einsum("bnc,hcd->bhnd", xf, self.w_k.to(dtype))
            return torch.einsum("bhnd,bhmd->bhnm", q, k) * self.scale
        W = self.similarity_matrix().to(dtype)
        return torch.einsum("bnc,hce,bme->bhnm", xf, W, xf) * self.scale

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``: one fused SDPA call, the ``N x N`` scores never stored.

        "qk": SDPA on ``q = X W_Q^h``, ``k = X W_K^h``. "collapsed"/"symmetric": the scores
        ``X W^h X^T`` are SDPA's ``q . k`` with ``q = X W^h`` (``[B, H, N, dim]``) and ``k = X``.
        The fused kernels want one width for q, k and v, so a narrower v is zero-padded (sliced off
        after). :meth:`forward_explicit` is the same computation through :meth:`scores`.
        """
        x = check_sequence("x", x, self.dim)
        dtype = compute_dtype(x.dtype)
        xf = x.to(dtype)
        B, N, _ = x.shape
        if self.similarity == "qk":
            q = torch.einsum("bnc,hcd->bhnd", xf, self.w_q.to(dtype))  # (B, H, N, d)
            k = torch.einsum("bnc,hcd->bhnd", xf, self.w_k.to(dtype))  # (B, H, N, d)
        else:
            q = torch.einsum("bnc,hce->bhne", xf, self.similarity_matrix().to(dtype))  # (B, H, N, dim)
            k = xf[:, None].expand(B, self.heads, N, self.dim)  # (B, H, N, dim)
        if self.value_output:
            v = rearrange(self.to_v(x), "b n (h d) -> b h n d", h=self.heads).to(dtype)  # (B, H, N, d)
        else:
            v = xf[:, None].expand(B, self.heads, N, self.dim)  # (B, H, N, dim)
        width = max(q.shape[-1], v.shape[-1])
        value_width = v.shape[-1]
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        out = out[..., :value_width]  # (B, H, N, d | dim)
        if self.value_output:
            return self.to_out(rearrange(out, "b h n d -> b n (h d)").to(x.dtype))
        combined = out.mean(dim=1) if self.head_combine == "mean" else out.sum(dim=1)
        return combined.to(x.dtype)

    def forward_explicit(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the ``[B, H, N, N]`` probabilities formed explicitly (the readable form)."""
        scores = self.scores(x)  # (B, H, N, N)
        N = x.shape[1]
        if self.causal:
            future = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.value_output:
            v = rearrange(self.to_v(x), "b n (h d) -> b h n d", h=self.heads).to(probs.dtype)
            out = torch.einsum("bhnm,bhmd->bhnd", probs, v)  # (B, H, N, d)
            return self.to_out(rearrange(out, "b h n d -> b n (h d)").to(x.dtype))
        mixed = torch.einsum("bhnm,bmc->bhnc", probs, x.to(probs.dtype))  # (B, H, N, dim)
        combined = mixed.mean(dim=1) if self.head_combine == "mean" else mixed.sum(dim=1)
        return combined.to(x.dtype)

    @torch.no_grad()
    def collapsed(self) -> MinimalAttention:
        """The "collapsed" layer with ``W_QK^h = W_Q^h W_K^{hT}`` and the same V, O: equal outputs."""
        if self.similarity != "qk":
            raise ValueError(f"collapsed() needs similarity='qk', this layer has similarity={self.similarity!r}")
        other = MinimalAttention(self.dim, self.heads, similarity="collapsed", value_output=self.value_output,
                                 causal=self.causal, head_dim=self.head_dim, head_combine=self.head_combine,
                                 scale=self.scale).to(self.w_q.device, self.w_q.dtype)
        other.w_qk.copy_(self.similarity_matrix())
        if self.value_output:
            other.to_v.load_state_dict(self.to_v.state_dict())
            other.to_out.load_state_dict(self.to_out.state_dict())
        return other


class MinimalBlock(nn.Module):
    """The minimal transformer block: ``x + MinimalAttention(LN(x))``, no MLP.

    Bermeitinger et al., "Reducing the Transformer Architecture to a Minimum", arXiv 2410.13732
    (the MLP block is omitted; the block layout is inferred). Options go to :class:`MinimalAttention`.
    """

    def __init__(self, dim: int, heads: int, **options: object) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MinimalAttention(dim, heads, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.norm(check_sequence("x", x, self.attention.dim)))


register(Mechanism(
    name="minimal",
    op=None,
    reference=None,
    layer=MinimalAttention,
    family="similarity",
    paper="Reducing the Transformer Architecture to a Minimum",
    arxiv="2410.13732",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^2 dim H)",
    check=CheckConfig(layer_configs=({"similarity": "qk"}, {"similarity": "collapsed"},
                                     {"similarity": "symmetric"}, {"similarity": "symmetric", "symmetric_rank": 3},
                                     {"similarity": "collapsed", "value_output": False})),
))

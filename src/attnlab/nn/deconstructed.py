"""Controlled attention variants of "Deconstructing Attention" (relaxing one design principle each).

Xue, Moosavi & Aletras, "Deconstructing Attention: Investigating Design Principles for Effective
Language Modeling", arXiv 2510.11602. Only the abstract and a third-party summary (variant names)
were available: the variants' formulas here are INFERRED (ours; see ``deconstructed`` in ``docs/mechanisms.md``) and
configurable; the "Approximate" / "Non-approximate" forms are not implemented (unknown).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.softmax import softmax_attention
from attnlab.ops.validation import check_causal, check_int, check_tensor
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["DeconstructedAttention", "VARIANTS", "variant_layers", "deconstructed_layer_inputs"]

VARIANTS = ("standard", "no_mixing", "static_embedding_qk", "fixed_sequence_qk", "random_embedding_qk")
PATTERNS = ("all", "every_k", "first_k", "last_k")


class DeconstructedAttention(nn.Module):
    """Softmax attention with one design principle relaxed, as a controlled variant (all inferred).

    Xue, Moosavi & Aletras, "Deconstructing Attention: Investigating Design Principles for Effective
    Language Modeling", arXiv 2510.11602 (abstract: token mixing, sequence-dependent activations,
    the dot-product + softmax form and the coupling of Q/K to the evolving hidden states are relaxed;
    the variant names RndEmbQK, FixedSeqQK, StaticEmbQK come from a third-party summary). The
    formulas are INFERRED, each a proposal kept configurable:

    - "standard": ``softmax(Q K^T / sqrt(d)) V`` with ``Q, K, V`` from the hidden states ``x``;
    - "no_mixing": no token mixing, ``o_i = W_O W_V x_i`` (identity attention matrix);
    - "static_embedding_qk" (StaticEmbQK): ``Q = E W_Q``, ``K = E W_K`` from the layer-0 token
      embeddings ``E`` (``embeddings=``), ``V`` from ``x``: Q/K decoupled from the evolving states;
    - "fixed_sequence_qk" (FixedSeqQK): ``Q = P W_Q``, ``K = P W_K`` from a per-position matrix ``P``
      (``[max_length, dim]``, learned, or frozen random with ``fixed_sequence="random"``): the
      attention matrix is the same for every input;
    - "random_embedding_qk" (RndEmbQK): ``Q, K`` from frozen random embeddings of the token ids
      (``token_ids=``, table ``[vocab_size, dim]`` drawn with ``random_seed``).

    All variants take the usual causal mask. Shapes: ``x [B, N, dim] -> [B, N, dim]``;
    ``embeddings [B, N, dim]``; ``token_ids [B, N]`` (int64).
    """

    def __init__(self, dim: int, heads: int, *, variant: str = "standard", causal: bool = False,
                 max_length: int = 2048, fixed_sequence: Literal["learned", "random"] = "learned",
                 vocab_size: int | None = None, random_seed: int = 0) -> None:
        super().__init__()
        check_int("max_length", max_length, minimum=1)
        check_int("vocab_size", vocab_size, minimum=1, allow_none=True)
        check_int("random_seed", random_seed)
        check_causal(causal)
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not one of {VARIANTS} (the paper's 'Approximate' and "
                             f"'Non-approximate' forms are not implemented: their formulas are unknown)")
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if fixed_sequence not in ("learned", "random"):
            raise ValueError(f"fixed_sequence={fixed_sequence!r} is not 'learned' or 'random'")
        self.dim, self.heads, self.variant, self.causal = dim, heads, variant, causal
        self.max_length = max_length
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        if variant != "no_mixing":
            self.to_q = nn.Linear(dim, dim, bias=False)
            self.to_k = nn.Linear(dim, dim, bias=False)
        generator = torch.Generator().manual_seed(random_seed)
        if variant == "fixed_sequence_qk":
            positions = torch.randn(max_length, dim, generator=generator)
            if fixed_sequence == "learned":
                self.positions = nn.Parameter(positions)
            else:
                self.register_buffer("positions", positions)
        if variant == "random_embedding_qk":
            if vocab_size is None or vocab_size <= 0:
                raise ValueError(f"variant='random_embedding_qk' needs a positive vocab_size, got {vocab_size}")
            self.vocab_size = vocab_size
            self.register_buffer("random_embeddings", torch.randn(vocab_size, dim, generator=generator))

    def qk_source(self, x: torch.Tensor, embeddings: torch.Tensor | None, token_ids: torch.Tensor | None
                  ) -> torch.Tensor:
        """What Q and K are computed from: ``[B, N, dim]`` (``[1, N, dim]`` for "fixed_sequence_qk")."""
        B, N, _ = x.shape
        if self.variant == "standard":
            return x
        if self.variant == "static_embedding_qk":
            if embeddings is None:
                raise ValueError("variant='static_embedding_qk' needs embeddings= (the layer-0 token embeddings)")
            embeddings = check_sequence("embeddings", embeddings, self.dim)
            if embeddings.shape[:2] != x.shape[:2]:
                raise ValueError(f"embeddings must have shape [B, N] = {list(x.shape[:2])} in front, got "
                                 f"{tuple(embeddings.shape)}")
            return embeddings.to(x.dtype)
        if self.variant == "fixed_sequence_qk":
            if N > self.max_length:
                raise ValueError(f"x has N={N} tokens, more than max_length={self.max_length}")
            return self.positions[None, :N].to(x.dtype)
        if token_ids is None:
            raise ValueError("variant='random_embedding_qk' needs token_ids= [B, N]")
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got {getattr(token_ids, 'dtype', type(token_ids))}")
        if tuple(token_ids.shape) != (B, N):
            raise ValueError(f"token_ids must have shape [B, N] = {[B, N]}, got {tuple(token_ids.shape)}")
        if token_ids.min() < 0 or token_ids.max() >= self.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={self.vocab_size}), got "
                             f"[{int(token_ids.min())}, {int(token_ids.max())}]")
        return self.random_embeddings[token_ids].to(x.dtype)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor, *, embeddings: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``."""
        x = check_sequence("x", x, self.dim)
        if embeddings is not None:
            check_tensor("embeddings", embeddings)
        v = self.to_v(x)  # (B, N, dim)
        if self.variant == "no_mixing":
            return self.to_out(v)
        source = self.qk_source(x, embeddings, token_ids)
        q = rearrange(self.to_q(source), "b n (h d) -> b h n d", h=self.heads)  # (B|1, H, N, d)
        k = rearrange(self.to_k(source), "b n (h d) -> b h n d", h=self.heads)
        q, k = q.expand(x.shape[0], -1, -1, -1), k.expand(x.shape[0], -1, -1, -1)
        out = softmax_attention(q, k, rearrange(v, "b n (h d) -> b h n d", h=self.heads), causal=self.causal)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


def variant_layers(num_layers: int, pattern: str = "all", k: int = 1) -> list[bool]:
    """Which of ``num_layers`` layers use the variant (True) and which keep standard attention.

    "Deconstructing Attention" (arXiv 2510.11602) applies a variant uniformly ("all") or in hybrids;
    the layer patterns are inferred (ours): "every_k" (layers ``k-1, 2k-1, ...``
    keep standard attention, the rest use the variant), "first_k" / "last_k" (the first / last ``k``
    layers use the variant).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern={pattern!r} is not one of {PATTERNS}")
    if num_layers <= 0 or k <= 0:
        raise ValueError(f"num_layers={num_layers} and k={k} must be positive")
    if pattern == "all":
        return [True] * num_layers
    if pattern == "every_k":
        return [(i + 1) % k != 0 for i in range(num_layers)]
    if pattern == "first_k":
        return [i < k for i in range(num_layers)]
    return [i >= num_layers - k for i in range(num_layers)]


def deconstructed_layer_inputs(layer: DeconstructedAttention, *, batch: int, length: int, dim: int,
                               dtype: torch.dtype, generator: torch.Generator
                               ) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Inputs of the layer-level suite: ``x``, plus ``embeddings`` or ``token_ids`` when the variant needs them."""
    inputs = {"x": torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)}
    if layer.variant == "static_embedding_qk":
        inputs["embeddings"] = torch.randn(batch, length, dim, generator=generator, dtype=torch.float64).to(dtype)
    if layer.variant == "random_embedding_qk":
        inputs["token_ids"] = torch.randint(0, layer.vocab_size, (batch, length), generator=generator)
    return inputs, (batch, length, dim)


register(Mechanism(
    name="deconstructed",
    op=None,
    reference=None,
    layer=DeconstructedAttention,
    family="softmax",
    paper="Deconstructing Attention: Investigating Design Principles for Effective Language Modeling",
    arxiv="2510.11602",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N^2 d) (no_mixing: O(N dim^2))",
    check=CheckConfig(
        layer_configs=({"variant": "standard"}, {"variant": "no_mixing"}, {"variant": "static_embedding_qk"},
                       {"variant": "fixed_sequence_qk", "max_length": 32},
                       {"variant": "random_embedding_qk", "vocab_size": 50}),
        layer_inputs=deconstructed_layer_inputs,
    ),
))

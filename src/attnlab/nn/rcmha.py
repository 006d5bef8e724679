"""RCMHA: depthwise causal convolutions on q, k, v plus Transformer-XL relative attention scores.

Sugiharto et al., "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
arXiv 2308.03429, transcribed from hermansh-id/rcmha ``rcmha/attention.py``
(``SpatialDepthWiseConvolution``, ``RelativeMultiHeadAttention``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.rcmha import relative_attention
from attnlab.ops.validation import check_causal, check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["RCMHA", "DepthwiseCausalConv"]


class DepthwiseCausalConv(nn.Module):
    """Depthwise convolution over time, causal, with one set of weights shared by all heads.

    RCMHA (arXiv 2308.03429), ``SpatialDepthWiseConvolution``: ``Conv1d(d, d, kernel_size, groups=d,
    padding=kernel_size - 1)`` on each head's ``[d, N]`` sequence, then the last ``kernel_size - 1``
    outputs are cropped, so output ``t`` sees inputs ``t - kernel_size + 1 .. t``. The weights live in
    that ``nn.Conv1d``; the forward computes the same sums over windows of the left-padded sequence.

    Shapes: ``x [B, H, N, d] -> [B, H, N, d]``.
    """

    def __init__(self, head_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size={kernel_size} must be at least 1")
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(head_dim, head_dim, kernel_size, padding=kernel_size - 1, groups=head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the cropped padded Conv1d, written as windows over the left-padded sequence (a grouped Conv1d
        # runs one slow kernel per channel on CPU): y_t = bias + sum_s w[s] x[t - kernel_size + 1 + s]
        windows = F.pad(x, (0, 0, self.kernel_size - 1, 0)).unfold(2, self.kernel_size, 1)  # (B, H, N, d, k)
        weight = self.conv.weight[:, 0, :].to(x.dtype)  # (d, k)
        return torch.einsum("bhndk,dk->bhnd", windows, weight) + self.conv.bias.to(x.dtype)


class RCMHA(nn.Module):
    """Relative Convolutional Multi-Head Attention.

    Sugiharto et al., "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language
    Modelling", arXiv 2308.03429: ``q = DWConv(W_q x)``, ``k = DWConv(W_k x)``, ``v = DWConv(W_v x)``
    (depthwise causal convolutions, :class:`DepthwiseCausalConv`; ``W_q, W_k`` without bias, ``W_v``
    with), Transformer-XL relative scores with learned tables ``R [2P, H, d]``, ``b [2P, H]``,
    ``u [H, d]`` (all initialised to 0, as in the code),
    ``S_ij = scale * ((q_i + u) . k_j + q_i . R[P + j - t_i] + b[P + j - t_i])``, softmax over keys,
    heads concatenated, ``Linear(dim, dim)``. See :func:`attnlab.ops.rcmha.relative_attention`.

    The paper's model is causal (language modelling): use ``causal=True``. ``causal=False`` (an
    extension, not in the paper) drops the attention mask; the convolutions stay causal.

    Args:
        dim: model width, divisible by ``heads``. heads: H.
        causal: mask keys after the query.
        kernel_size: of the depthwise convolutions (3 in the code).
        max_distance: ``P``, the largest relative distance the tables cover (4096 in the code).

    No attention dropout (the paper's training config uses dropout 0).

    Shapes: ``x [B, N, dim] -> [B, N, dim]``; ``memory [B, M0, dim]`` (Transformer-XL memory, earlier
    hidden states, used as extra keys/values before ``x``; the query of ``x_i`` has position ``M0 + i``).
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, kernel_size: int = 3,
                 max_distance: int = 4096) -> None:
        super().__init__()
        check_int("kernel_size", kernel_size, minimum=1)
        check_int("max_distance", max_distance, minimum=1)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if max_distance < 1:
            raise ValueError(f"max_distance={max_distance} must be positive")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = d = dim // heads
        self.max_distance = max_distance
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=True)
        self.query_conv = DepthwiseCausalConv(d, kernel_size)
        self.key_conv = DepthwiseCausalConv(d, kernel_size)
        self.value_conv = DepthwiseCausalConv(d, kernel_size)
        self.key_pos_embeddings = nn.Parameter(torch.zeros(2 * max_distance, heads, d))  # R
        self.key_pos_bias = nn.Parameter(torch.zeros(2 * max_distance, heads))  # b
        self.query_pos_bias = nn.Parameter(torch.zeros(heads, d))  # u
        self.output = nn.Linear(dim, dim)

    def _heads(self, linear: nn.Linear, conv: DepthwiseCausalConv, x: torch.Tensor) -> torch.Tensor:
        return conv(rearrange(linear(x), "b n (h d) -> b h n d", h=self.heads))  # (B, H, n, d)

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``, optionally attending to ``memory [B, M0, dim]`` first."""
        x = check_sequence("x", x, self.dim)
        source = x
        if memory is not None:
            memory = check_sequence("memory", memory, self.dim)
            if memory.shape[0] != x.shape[0]:
                raise ValueError(f"memory must have the batch size of x ({x.shape[0]}), got {memory.shape[0]}")
            source = torch.cat([memory, x], dim=1)
        if source.shape[1] > self.max_distance:
            raise ValueError(f"x (with memory) has {source.shape[1]} tokens, more than max_distance="
                             f"{self.max_distance} the relative tables cover")
        q = self._heads(self.query, self.query_conv, x)  # (B, H, N, d)
        k = self._heads(self.key, self.key_conv, source)  # (B, H, M, d)
        v = self._heads(self.value, self.value_conv, source)  # (B, H, M, d)
        weights = [self.key_pos_embeddings, self.key_pos_bias, self.query_pos_bias]
        R, b, u = (w.to(q.dtype) for w in weights)
        out = relative_attention(q, k, v, pos_embeddings=R, pos_bias=b, query_bias=u, causal=self.causal)
        return self.output(rearrange(out, "b h n d -> b n (h d)"))


register(Mechanism(
    name="rcmha",
    op=None,
    reference=None,
    layer=RCMHA,
    family="position",
    paper="RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling",
    arxiv="2308.03429",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N (N + M0) d) + O(N dim kernel) conv",
    # the relative tables must cover the sequence: the code's 4096, or the model's length when longer
    model_options=lambda seq_len: {"max_distance": max(4096, seq_len)},
    check=CheckConfig(layer_configs=({"max_distance": 64},)),
))

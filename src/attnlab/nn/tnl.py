"""``TNLAttention``: the TransNormerLLM / TNL layer around lightning attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.lightning import check_chunk_size, lightning_attention, lightning_decay_slopes
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.validation import check_bool, check_causal, check_float, check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["TNLAttention"]


class TNLAttention(nn.Module):
    """The TNL attention layer: SiLU q/k/v, lightning attention with the layer's decay, LayerNorm,
    low-rank output gate, output projection (causal only).

    "Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention"
    (arXiv 2405.17381), the layer of its ``examples/module/tnl_attn.py``; decay schedule of
    TransNormerLLM (arXiv 2307.14995)::

        q, k, v = SiLU(W_q x), SiLU(W_k x), SiLU(W_v x)            (heads of d = dim / heads)
        o = lightning_attention(q, k, v, decay=s^(l))               (no scale, no normaliser)
        o = LayerNorm(o) * sigmoid(W_g2 W_g1 x),  W_g1: dim -> gate_dim, W_g2: gate_dim -> dim
        y = W_o o

    ``x [B, N, dim] -> [B, N, dim]``.

    Args:
        dim, heads: model width and number of heads (``dim % heads == 0``).
        causal: must be True (lightning attention is causal only).
        layer_idx, num_layers: position of this layer in the stack: the decay rates are
            ``lightning_decay_slopes(heads, layer_idx=, num_layers=)`` (a buffer).
        bias: biases in the projections (default False, as in the TNL example).
        gate_dim: rank of the output gate (default the head dim ``d``, as in the example).
        chunk_size: block length of the chunked lightning form.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = True, layer_idx: int = 0, num_layers: int = 1,
                 bias: bool = False, gate_dim: int | None = None, chunk_size: int = 64, norm_eps: float = 1e-5,
                 ) -> None:
        super().__init__()
        check_int("layer_idx", layer_idx, minimum=0)
        check_int("num_layers", num_layers, minimum=1)
        check_int("gate_dim", gate_dim, minimum=1, allow_none=True)
        check_int("chunk_size", chunk_size, minimum=1)
        check_float("norm_eps", norm_eps, minimum=0.0, strict_minimum=True)
        check_bool("bias", bias)
        check_causal(causal, causal_only="TNLAttention (lightning attention has no bidirectional form)")
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        self.dim, self.heads, self.causal = dim, heads, True
        self.head_dim = dim // heads
        gate_dim = self.head_dim if gate_dim is None else gate_dim
        if isinstance(gate_dim, bool) or not isinstance(gate_dim, int) or gate_dim < 1:
            raise ValueError(f"gate_dim must be a positive int, got gate_dim={gate_dim!r}")
        self.chunk_size = check_chunk_size(chunk_size)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.gate = nn.Sequential(nn.Linear(dim, gate_dim, bias=bias), nn.Linear(gate_dim, dim, bias=bias))
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("decay", lightning_decay_slopes(heads, layer_idx=layer_idx, num_layers=num_layers))

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``."""
        x = check_sequence("x", x, self.dim)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return rearrange(F.silu(t), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = lightning_attention(q, k, v, decay=self.decay.float(), chunk_size=self.chunk_size)  # (B, H, N, d)
        o = self.norm(rearrange(o, "b h n d -> b n (h d)"))
        o = o * torch.sigmoid(self.gate(x))
        return self.out_proj(o)


register(Mechanism(
    name="tnl",
    op=None,
    reference=None,
    layer=TNLAttention,
    family="linear",
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    arxiv="2405.17381",
    supports_causal=True,
    supports_bidirectional=False,
    complexity="O(N d^2)",
    check=CheckConfig(layer_configs=({"chunk_size": 4}, {"layer_idx": 1, "num_layers": 3, "bias": True})),
    state_size=lambda heads, head_dim, value_dim: heads * head_dim * value_dim,
))

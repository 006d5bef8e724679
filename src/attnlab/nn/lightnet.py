"""``LightNetAttention``: the LightNet layer with MD-LRPE for 1-D sequences and 2-D grids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.lightnet import lightnet_attention
from attnlab.ops.lightning import check_chunk_size
from attnlab.ops.nonfinite import nonfinite_guarded_forward
from attnlab.ops.validation import check_bool, check_causal, check_float, check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["LightNetAttention", "md_lrpe", "md_lrpe_angles", "lrpe_theta"]


def lrpe_theta(heads: int, head_dim: int, axes: int = 1, *, base: float = 10000.0) -> torch.Tensor:
    """Frequencies ``theta [H, e]``, ``e = ceil(head_dim / axes)``: ``base^(-2 i / (H e))`` for
    ``i = 0 .. H e - 1`` reshaped per head, the 1-D LRPE rule of TransNormerLLM's ``Lrpe`` (Qin et al.,
    arXiv 2307.14995) applied to MD-LRPE. Inferred: LightNet does not pin its initialisation."""
    e = math.ceil(head_dim / axes)
    i = torch.arange(heads * e, dtype=torch.float64)
    return (base ** (-2.0 * i / (heads * e))).reshape(heads, e).float()


def md_lrpe_angles(theta: torch.Tensor, length: int, *, head_dim: int, shape: tuple[int, ...] | None = None
                   ) -> torch.Tensor:
    """Angles ``[H, N, d]`` of MD-LRPE: channel ``j`` of group ``g = j // e`` turns by ``theta[h, j - g e] * p_g``.

    ``shape=(n_1, ..., n_m)`` (default ``(N,)``): the last ``prod(shape)`` tokens are a grid in row-major
    order (last axis fastest) with coordinates ``(p_1, ..., p_m)``; the ``l = N - prod(shape)`` leading
    tokens (e.g. CLS) get angle 0. LightNet MD-LRPE (arXiv 2405.21022; xopes ``md_lrpe_cosine``).
    """
    shape = (length,) if shape is None else tuple(shape)
    cells = math.prod(shape)
    prefix = length - cells
    if prefix < 0:
        raise ValueError(f"grid {shape} has {cells} cells, more than the N={length} tokens")
    H, e = theta.shape
    m = len(shape)
    if e != math.ceil(head_dim / m):
        raise ValueError(f"theta must have e = ceil(d / axes) = {math.ceil(head_dim / m)} columns, got {e}")
    coords = torch.stack(torch.unravel_index(torch.arange(cells), shape), dim=-1)  # (cells, m), row-major
    group = torch.arange(head_dim) // e  # (d,): the axis each channel encodes
    within = torch.arange(head_dim) - group * e  # (d,)
    p = coords[:, group].to(theta.device, theta.dtype)  # (cells, d)
    angles = theta[:, None, within] * p[None]  # (H, cells, d)
    return F.pad(angles, (0, 0, prefix, 0))  # (H, N, d): prefix tokens at angle 0


def md_lrpe(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """``[x * cos(angle), x * sin(angle)]``: ``x [B, H, N, d] -> [B, H, N, 2d]``. For a query at ``s`` and
    a key at ``t``, ``<md_lrpe(q)_s, md_lrpe(k)_t> = sum_j q_j k_j cos(angle_s,j - angle_t,j)``, a function
    of the per-axis offset ``p_s - p_t`` only."""
    return torch.cat([x * torch.cos(angles), x * torch.sin(angles)], dim=-1)


class LightNetAttention(nn.Module):
    """The LightNet token mixer: additive linear recurrence ("one scan") with MD-LRPE, output gate, norm.

    "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet" (arXiv 2405.21022);
    layer read from the author's xmixers ``LightNetAttention``::

        q = SiLU(W_q x), k = W_k x (log-weights, no activation), v = W_v x
        o_t = sum_c phi(q_t)[c] sum_{s<=t} softmax_{s'<=t}(k_{s'}[c])_s phi_k(s)[c] v_s     (lightnet_attention)
        y = W_o RMSNorm(o * sigmoid(W_2 W_1 x))

    with MD-LRPE ``phi`` on the query and on the normalised key weights (a relative position code per
    grid axis). ``x [B, N, dim] -> [B, N, dim]``.

    Args:
        dim, heads: model width and heads.
        causal: the causal recurrence; False (default): one global sum, order-free up to the LRPE.
        grid: ``(n_1, ..., n_m)`` for multi-dimensional data: the last ``prod(grid)`` tokens are the grid
            in row-major order (leading tokens, e.g. CLS, are not encoded); ``None``: 1-D positions.
        use_lrpe: MD-LRPE on (default, as in xmixers) or off.
        lrpe_base: base of the frequencies (inferred: 10000, see :func:`lrpe_theta`; a fixed buffer).
        gate_dim: rank of the output gate (default ``heads``, our reading of xmixers).
        norm_eps: RMSNorm epsilon. chunk_size: block length of the chunked op. bias: projection biases.
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, grid: tuple[int, ...] | None = None,
                 use_lrpe: bool = True, lrpe_base: float = 10000.0, gate_dim: int | None = None,
                 norm_eps: float = 1e-5, chunk_size: int = 32, bias: bool = False) -> None:
        super().__init__()
        check_float("lrpe_base", lrpe_base, minimum=0.0, strict_minimum=True)
        check_int("gate_dim", gate_dim, minimum=1, allow_none=True)
        check_float("norm_eps", norm_eps, minimum=0.0, strict_minimum=True)
        check_int("chunk_size", chunk_size, minimum=1)
        check_bool("use_lrpe", use_lrpe)
        check_bool("bias", bias)
        check_causal(causal)
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        if grid is not None and not (isinstance(grid, tuple | list) and len(grid) >= 1 and all(
                isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
            raise ValueError(f"grid must be a tuple of positive ints (n_1, ..., n_m), got grid={grid!r}")
        gate_dim = heads if gate_dim is None else gate_dim
        if isinstance(gate_dim, bool) or not isinstance(gate_dim, int) or gate_dim < 1:
            raise ValueError(f"gate_dim must be a positive int, got gate_dim={gate_dim!r}")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.head_dim = dim // heads
        self.grid = None if grid is None else tuple(grid)
        self.use_lrpe = use_lrpe
        self.chunk_size = check_chunk_size(chunk_size)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.gate = nn.Sequential(nn.Linear(dim, gate_dim, bias=bias), nn.Linear(gate_dim, dim, bias=bias))
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        axes = 1 if self.grid is None else len(self.grid)
        self.register_buffer("theta", lrpe_theta(heads, self.head_dim, axes, base=lrpe_base))

    @nonfinite_guarded_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``; with ``grid``, ``N >= prod(grid)``."""
        x = check_sequence("x", x, self.dim)
        N = x.shape[1]
        if self.grid is not None and N < math.prod(self.grid):
            raise ValueError(f"x has N={N} tokens, fewer than the grid {self.grid} ({math.prod(self.grid)} cells)")
        q = rearrange(F.silu(self.q_proj(x)), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, d)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        if self.use_lrpe:
            angles = md_lrpe_angles(self.theta.float(), N, head_dim=self.head_dim, shape=self.grid)  # (H, N, d)
            gain = md_lrpe(torch.ones_like(angles), angles).to(x.dtype)  # (H, N, 2d): [cos, sin]
            q = md_lrpe(q, angles.to(x.dtype))  # (B, H, N, 2d)
            k = torch.cat([k, k], dim=-1)  # the same log-weight for the cos and sin channels
            o = lightnet_attention(q, k, v, causal=self.causal, key_gain=gain, chunk_size=self.chunk_size)
        else:
            o = lightnet_attention(q, k, v, causal=self.causal, chunk_size=self.chunk_size)
        o = rearrange(o, "b h n d -> b n (h d)") * torch.sigmoid(self.gate(x))
        return self.out_proj(self.norm(o))


register(Mechanism(
    name="lightnet_layer",
    op=None,
    reference=None,
    layer=LightNetAttention,
    family="linear",
    paper="You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
    arxiv="2405.21022",
    supports_causal=True,
    supports_bidirectional=True,
    complexity="O(N d^2)",
    check=CheckConfig(layer_configs=({"chunk_size": 4}, {"grid": (3, 4)}, {"use_lrpe": False})),
    state_size=lambda heads, head_dim, value_dim: heads * 2 * head_dim * (value_dim + 1),
))

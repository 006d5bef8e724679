"""``AgentAttention``: the paper's agent attention layer (agent biases + depthwise convolution on V)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from attnlab.nn.sequence_input import check_sequence
from attnlab.ops.agent import _check_grid, _check_num_agents, agent_attention, check_grid_pair
from attnlab.ops.validation import check_bool, check_causal, check_int
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["AgentAttention"]


def _bias(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.zeros(*shape))
    nn.init.trunc_normal_(p, std=0.02)
    return p


class AgentAttention(nn.Module):
    """Agent attention layer of "Agent Attention: On the Integration of Softmax and Linear Attention"
    (arXiv 2312.08874; the official ``AgentAttention`` of ``agent_deit.py``), bidirectional only::

        q, k, v = split(W_qkv x);  A = pool(q) (n agents)
        V_A = softmax(s A K^T + B1) V;  O = softmax(s Q A^T + B2) V_A        (agent_attention, s = d^-0.5)
        O[patches] += DWConv(V[patches]);  y = W_proj O

    With ``grid=(h, w)`` (images, ``N = h*w``, or ``h*w + 1`` with a leading CLS token as in DeiT):
    ``B1 = interp(an_bias [H, n, 7, 7] -> (h, w)) + ah_bias + aw_bias`` (a CLS column ``ac_bias``),
    ``B2`` likewise from ``na_bias, ha_bias, wa_bias`` (a CLS row ``ca_bias``), all ``trunc_normal(0.02)``;
    DWC is ``Conv2d(dim, dim, 3, padding=1, groups=dim)``. Without ``grid`` (1-D sequences; inferred,
    the paper is vision only): ``B1 = interp_linear(an_bias [H, n, 7] -> N)``, ``B2`` from ``na_bias``,
    and the DWC is ``Conv1d(dim, dim, 3, padding=1, groups=dim)``.

    Args:
        dim, heads: model width and heads.
        causal: must be False (``NotImplementedError``: the paper defines no causal form).
        num_agents: ``n`` (49 in the paper; with ``grid`` a perfect square).
        grid: ``(h, w)`` of the patch tokens, or ``None`` for 1-D sequences.
        qkv_bias: bias of ``W_qkv`` (False in DeiT, True in Swin).
        bias_size: resolution of the interpolated position biases (7 in the paper).
    """

    def __init__(self, dim: int, heads: int, *, causal: bool = False, num_agents: int = 49,
                 grid: tuple[int, int] | None = None, qkv_bias: bool = False, bias_size: int = 7) -> None:
        super().__init__()
        check_int("num_agents", num_agents, minimum=1)
        check_int("bias_size", bias_size, minimum=1)
        check_bool("qkv_bias", qkv_bias)
        check_causal(causal)
        if causal:
            raise NotImplementedError("AgentAttention defines no causal form (the paper and its code are "
                                      "bidirectional, for vision); use causal=False")
        if dim <= 0 or heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} must be a positive multiple of heads={heads}")
        self.dim, self.heads, self.causal = dim, heads, False
        self.head_dim = dim // heads
        self.num_agents = num_agents
        if grid is not None:
            check_grid_pair(grid)
        self.grid = None if grid is None else tuple(grid)
        n = num_agents
        if self.grid is not None:
            h, w, _ = _check_grid(self.grid, self.grid[0] * self.grid[1])
            _check_num_agents(num_agents, h * w, (h, w))
            self.an_bias, self.na_bias = _bias(heads, n, bias_size, bias_size), _bias(heads, n, bias_size, bias_size)
            self.ah_bias, self.aw_bias = _bias(heads, n, h, 1), _bias(heads, n, 1, w)
            self.ha_bias, self.wa_bias = _bias(heads, h, 1, n), _bias(heads, 1, w, n)
            self.ac_bias, self.ca_bias = _bias(heads, n, 1), _bias(heads, 1, n)
            self.dwc: nn.Module = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        else:
            _check_num_agents(num_agents, num_agents, None)
            self.an_bias, self.na_bias = _bias(heads, n, bias_size), _bias(heads, n, bias_size)
            self.dwc = nn.Conv1d(dim, dim, 3, padding=1, groups=dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_biases(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``B1 [H, n, N]`` and ``B2 [H, N, n]`` for ``length`` tokens."""
        H, n = self.heads, self.num_agents
        if self.grid is None:
            b1 = F.interpolate(self.an_bias, size=length, mode="linear")  # (H, n, N)
            b2 = F.interpolate(self.na_bias, size=length, mode="linear").transpose(1, 2)  # (H, N, n)
            return b1, b2
        h, w, prefix = _check_grid(self.grid, length)
        b1 = F.interpolate(self.an_bias, size=(h, w), mode="bilinear").reshape(H, n, h * w)
        b1 = b1 + (self.ah_bias + self.aw_bias).reshape(H, n, h * w)
        b2 = F.interpolate(self.na_bias, size=(h, w), mode="bilinear").reshape(H, n, h * w).transpose(1, 2)
        b2 = b2 + (self.ha_bias + self.wa_bias).reshape(H, h * w, n)
        if prefix:
            b1 = torch.cat([self.ac_bias, b1], dim=-1)  # CLS column
            b2 = torch.cat([self.ca_bias, b2], dim=-2)  # CLS row
        return b1, b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, N, dim] -> [B, N, dim]``."""
        x = check_sequence("x", x, self.dim)
        B, N, _ = x.shape
        if self.grid is None:
            _check_num_agents(self.num_agents, N, None)
            prefix = 0
        else:
            _, _, prefix = _check_grid(self.grid, N)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        b1, b2 = self.position_biases(N)
        o = agent_attention(q, k, v, num_agents=self.num_agents, grid=self.grid, agent_bias=b1.to(x.dtype),
                            query_bias=b2.to(x.dtype))  # (B, H, N, d)
        o = rearrange(o, "b h n d -> b n (h d)")
        patches = rearrange(v[:, :, prefix:], "b h n d -> b (h d) n")  # (B, dim, N - prefix)
        if self.grid is not None:
            local = self.dwc(patches.reshape(B, self.dim, *self.grid)).flatten(2)
        else:
            local = self.dwc(patches)
        o = torch.cat([o[:, :prefix], o[:, prefix:] + local.transpose(1, 2)], dim=1)
        return self.proj(o)


register(Mechanism(
    name="agent_layer",
    op=None,
    reference=None,
    layer=AgentAttention,
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    supports_causal=False,
    supports_bidirectional=True,
    complexity="O(N n d)",
    check=CheckConfig(layer_configs=({"num_agents": 4}, {"num_agents": 4, "grid": (3, 4)})),
))

"""Agent attention: two softmax steps through a small set of agent tokens pooled from the queries.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han et al., arXiv 2312.08874),
eq. 3 (as the official ``AgentAttention`` of ``agent_deit.py`` computes it)::

    V_A = softmax(scale * A K^T + B1) V        agent aggregation   (n x Dv)
    O   = softmax(scale * Q A^T + B2) V_A      agent broadcast     (N x Dv)

with ``n`` agents ``A`` = adaptive average pooling of the queries (over the sequence, or over an
image grid), ``scale = D ** -0.5`` in both steps. O(N n D) time and O(N n) memory per head.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.validation import (
    Sizes,
    check_causal,
    check_impl,
    check_int,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["agent_attention", "agent_attention_reference", "agent_tokens", "adaptive_pool_matrix"]

IMPLS = ("auto", "reference", "sdpa")


def adaptive_pool_matrix(length: int, size: int, *, dtype: torch.dtype = torch.float64,
                         device: torch.device | None = None) -> torch.Tensor:
    """``[size, length]`` averaging matrix of adaptive average pooling: bin ``i`` averages the inputs
    ``floor(i L / n) <= j < ceil((i + 1) L / n)`` (the rule of ``torch.nn.AdaptiveAvgPool1d``)."""
    P = torch.zeros(size, length, dtype=dtype, device=device)
    for i in range(size):
        start, stop = (i * length) // size, -((-(i + 1) * length) // size)
        P[i, start:stop] = 1.0 / (stop - start)
    return P


def check_grid_pair(grid: object) -> tuple[int, int]:
    """``grid`` must be a pair of positive ints ``(h, w)``."""
    if not (isinstance(grid, tuple | list) and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (h, w), got grid={grid!r}")
    return int(grid[0]), int(grid[1])


def _check_grid(grid: object, length: int) -> tuple[int, int, int]:
    """``grid=(h, w)`` for ``N = prefix + h * w`` tokens (prefix 0, or 1: a CLS token); returns (h, w, prefix)."""
    h, w = check_grid_pair(grid)
    prefix = length - h * w
    if prefix not in (0, 1):
        raise ValueError(f"grid=({h}, {w}) needs N = h*w = {h * w} tokens (or h*w + 1 with a leading CLS token), "
                         f"got N={length}")
    return h, w, prefix


def _check_num_agents(num_agents: int, length: int, grid: tuple[int, int] | None) -> int:
    check_int("num_agents", num_agents, minimum=1)
    if grid is None:
        if num_agents > length:
            raise ValueError(f"num_agents={num_agents} is larger than the sequence length N={length} "
                             f"(agents are pooled from the queries)")
        return num_agents
    pool = math.isqrt(num_agents)
    if pool * pool != num_agents:
        raise ValueError(f"num_agents={num_agents} must be a perfect square with grid= (agents pool to a "
                         f"sqrt(n) x sqrt(n) grid)")
    if pool > min(grid):
        raise ValueError(f"num_agents={num_agents} pools to {pool} x {pool}, larger than the grid {tuple(grid)}")
    return num_agents


def agent_tokens(q: torch.Tensor, num_agents: int, *, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Agents ``[B, H, n, D]``: adaptive average pooling of ``q [B, H, N, D]`` to ``num_agents`` tokens.

    With ``grid=(h, w)`` the ``h * w`` patch tokens (after an optional leading CLS token, which is
    excluded as in the paper's DeiT code) are pooled to ``sqrt(n) x sqrt(n)`` and flattened row-major.
    """
    N = q.shape[2]
    if grid is None:
        _check_num_agents(num_agents, N, None)
        B, H, _, D = q.shape
        pooled = F.adaptive_avg_pool1d(q.reshape(B * H, N, D).transpose(1, 2), num_agents)  # (BH, D, n)
        return pooled.transpose(1, 2).reshape(B, H, num_agents, D)
    h, w, prefix = _check_grid(grid, N)
    _check_num_agents(num_agents, N, (h, w))
    pool = math.isqrt(num_agents)
    B, H, _, D = q.shape
    patches = q[:, :, prefix:].reshape(B * H, h, w, D).permute(0, 3, 1, 2)  # (BH, D, h, w)
    pooled = F.adaptive_avg_pool2d(patches, (pool, pool))  # (BH, D, p, p)
    return pooled.flatten(2).transpose(1, 2).reshape(B, H, num_agents, D)


def _reference_agents(q: torch.Tensor, num_agents: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """The same pooling as an explicit averaging matrix (2-D: the Kronecker product of the axes' matrices)."""
    N = q.shape[2]
    if grid is None:
        _check_num_agents(num_agents, N, None)
        P = adaptive_pool_matrix(N, num_agents, dtype=q.dtype, device=q.device)  # (n, N)
        return torch.einsum("an,bhnd->bhad", P, q)
    h, w, prefix = _check_grid(grid, N)
    _check_num_agents(num_agents, N, (h, w))
    pool = math.isqrt(num_agents)
    Ph = adaptive_pool_matrix(h, pool, dtype=q.dtype, device=q.device)
    Pw = adaptive_pool_matrix(w, pool, dtype=q.dtype, device=q.device)
    P = torch.kron(Ph, Pw)  # (n, h*w): agent (a, b) averages rows of bin a and columns of bin b
    return torch.einsum("an,bhnd->bhad", P, q[:, :, prefix:])


def _check_bias(name: str, bias: torch.Tensor | None, shape: tuple[int, int, int, int], layout: str,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor broadcastable to {layout}, got {type(bias).__name__}")
    try:
        torch.broadcast_shapes(bias.shape, shape)
        if bias.ndim > 4:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(bias.shape)} does not broadcast to {layout} = "
                         f"{list(shape)}") from None
    if bias.device != device:
        raise ValueError(f"{name} is on {bias.device}, q on {device}")
    return bias.to(dtype)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_agents: int, agents: torch.Tensor | None,
             grid: tuple[int, int] | None, causal: bool, agent_bias: torch.Tensor | None,
             query_bias: torch.Tensor | None, reference: bool
             ) -> tuple[Sizes, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                        torch.Tensor | None]:
    if causal:
        raise NotImplementedError("agent attention defines no causal form (the paper and its code are "
                                  "bidirectional, for vision); use causal=False")
    sizes = check_qkv(q, k, v)
    dtype = compute_dtype(q.dtype)
    qf = q.to(dtype)
    if agents is None and reference:
        agent_q = _reference_agents(qf, num_agents, grid)
    elif agents is None:
        agent_q = agent_tokens(qf, num_agents, grid=grid)
    else:
        if not isinstance(agents, torch.Tensor) or not agents.is_floating_point():
            raise TypeError(f"agents must be a floating tensor [B, H, n, D], got {type(agents).__name__}")
        if agents.ndim != 4 or agents.shape[:2] != q.shape[:2] or agents.shape[-1] != sizes.head_dim:
            raise ValueError(f"agents must have shape [B, H, n, D] = [{sizes.batch}, {sizes.heads}, n, "
                             f"{sizes.head_dim}], got {tuple(agents.shape)}")
        if agents.device != q.device:
            raise ValueError(f"agents is on {agents.device}, q on {q.device}")
        agent_q = agents.to(dtype)
    n = agent_q.shape[2]
    B, H, N, M = sizes.batch, sizes.heads, sizes.length, sizes.key_length
    b1 = _check_bias("agent_bias", agent_bias, (B, H, n, M), "[B, H, n, M]", q.device, dtype)
    b2 = _check_bias("query_bias", query_bias, (B, H, N, n), "[B, H, N, n]", q.device, dtype)
    kf = expand_kv(k, H).to(dtype)
    vf = expand_kv(v, H).to(dtype)
    return sizes, qf, kf, vf, agent_q, b1, b2


def agent_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_agents: int = 49,
                              agents: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                              causal: bool = False, scale: float | None = None,
                              agent_bias: torch.Tensor | None = None,
                              query_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The two softmax products written out (arXiv 2312.08874, eq. 3), agents pooled by an explicit
    averaging matrix: ``V_A = softmax(s A K^T + B1) V``, ``O = softmax(s Q A^T + B2) V_A``, ``s = scale``
    (default ``D^-0.5``)."""
    check_causal(causal)
    sizes, qf, kf, vf, A, b1, b2 = _prepare(q, k, v, num_agents=num_agents, agents=agents, grid=grid,
                                            causal=causal, agent_bias=agent_bias, query_bias=query_bias,
                                            reference=True)
    scale = check_scale(scale, sizes.head_dim)
    scores1 = torch.einsum("bhad,bhmd->bham", A, kf) * scale  # (B, H, n, M)
    if b1 is not None:
        scores1 = scores1 + b1
    agent_values = torch.einsum("bham,bhme->bhae", torch.softmax(scores1, dim=-1), vf)  # (B, H, n, Dv)
    scores2 = torch.einsum("bhnd,bhad->bhna", qf, A) * scale  # (B, H, N, n)
    if b2 is not None:
        scores2 = scores2 + b2
    out = torch.einsum("bhna,bhae->bhne", torch.softmax(scores2, dim=-1), agent_values)
    return out.to(q.dtype)


@nonfinite_guarded
def agent_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_agents: int = 49,
                    agents: torch.Tensor | None = None, grid: tuple[int, int] | None = None, causal: bool = False,
                    scale: float | None = None, agent_bias: torch.Tensor | None = None,
                    query_bias: torch.Tensor | None = None,
                    impl: Literal["auto", "reference", "sdpa"] = "auto") -> torch.Tensor:
    """Agent attention: ``O = softmax(s Q A^T + B2) softmax(s A K^T + B1) V`` with ``s = scale``.

    "Agent Attention: On the Integration of Softmax and Linear Attention" (arXiv 2312.08874), eq. 3.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        num_agents: ``n``, the number of agents pooled from q (49 in the paper); must be <= N
            (with ``grid``: a perfect square whose root fits the grid).
        agents: agent tokens ``[B, H, n, D]`` to use instead of pooling (``num_agents`` is then ignored).
        grid: ``(h, w)`` when the tokens are an image (``N = h * w``, or ``h * w + 1`` with a leading CLS
            token that is not pooled): agents are a 2-D adaptive average pooling.
        causal: must be False: the paper defines no causal form (``NotImplementedError``).
        scale: ``s`` of both softmax steps (default ``D ** -0.5``, the paper's).
        agent_bias: ``B1`` broadcastable to ``[B, H, n, M]`` (the layer's agent position bias).
        query_bias: ``B2`` broadcastable to ``[B, H, N, n]``.
        impl: "sdpa" (= "auto": two ``scaled_dot_product_attention`` calls) or "reference".

    Returns:
        ``[B, H, N, Dv]`` in q's dtype.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    if impl == "reference":
        return agent_attention_reference(q, k, v, num_agents=num_agents, agents=agents, grid=grid, causal=causal,
                                         scale=scale, agent_bias=agent_bias, query_bias=query_bias)
    sizes, qf, kf, vf, A, b1, b2 = _prepare(q, k, v, num_agents=num_agents, agents=agents, grid=grid,
                                            causal=causal, agent_bias=agent_bias, query_bias=query_bias,
                                            reference=False)
    scale = check_scale(scale, sizes.head_dim)
    agent_values = F.scaled_dot_product_attention(A, kf, vf, attn_mask=b1, scale=scale)  # (B, H, n, Dv)
    out = F.scaled_dot_product_attention(qf, A, agent_values, attn_mask=b2, scale=scale)  # (B, H, N, Dv)
    return out.to(q.dtype)


register(Mechanism(
    name="agent",
    op=agent_attention,
    reference=agent_attention_reference,
    layer=None,
    family="linear",
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874",
    supports_causal=False,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N n d)",
    bench_options=lambda shape: {"num_agents": min(49, shape.length)},
    check=CheckConfig(options={"num_agents": 4}, bf16_options={"num_agents": 49}),
))

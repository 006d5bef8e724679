"""Generalized Neighborhood Attention (NATTEN) over 1-D, 2-D and 3-D token grids.

Hassani et al., "Neighborhood Attention Transformer" (arXiv 2204.07143), "Dilated Neighborhood
Attention Transformer" (arXiv 2209.15001) and "Generalized Neighborhood Attention: Multi-dimensional
Sparse Attention at the Speed of Light" (arXiv 2504.16922, strided windows). The mask rule is the one
of NATTEN's FlexAttention backend (``natten/backends/flex.py``, ``single_dim_tiling_mask``); the
multi-dimensional mask is the AND over axes of the 1-D rule, tokens flattened row-major.

1-D rule for query coordinate ``q``, key coordinate ``k`` on an axis of length ``n`` with kernel ``K``,
stride ``s`` and dilation ``d``:

- dilation groups never mix: ``q mod d == k mod d``; in group coordinates ``q' = q div d``,
  ``k' = k div d`` the group has ``n' = ceil((n - q mod d) / d)`` tokens;
- non-causal: ``left = K div 2``, ``right = K div 2 + K mod 2 - 1``; the stride group leader
  ``l = min((q' div s) s + s div 2, n' - 1)``; centre ``c = clamp(l, left, n' - 1 - right)`` (the
  window is shifted inward at the borders, never padded); attend iff ``c - left <= k' <= c + right``;
- causal: ``l = min((q' div s) s + s - 1, n' - 1)``; attend iff ``k' <= q'`` and ``l - k' < K``
  (windows are not shifted; early queries see fewer keys).

FreeSwim's inward sliding window for video tokens (Wu et al., arXiv 2511.14712) is this op on the
3-D grid ``(frames, height, width)`` with ``kernel_size = (frames, 2 d_h + 1, 2 d_w + 1)``, non-causal,
stride 1, dilation 1: NATTEN's inward shift is FreeSwim's ``d_u, d_b, d_l, d_r`` border rule.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch

from attnlab.ops.flex import auto_uses_flex, flex_masked_attention
from attnlab.ops.gathered_blocks import gathered_block_attention
from attnlab.ops.nonfinite import Reach, guard_nonfinite, index_reach
from attnlab.ops.softmax import softmax_attention_reference
from attnlab.ops.validation import check_impl, check_qkv, check_scale
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = ["neighborhood_attention", "neighborhood_attention_reference", "neighborhood_mask"]

IMPLS = ("auto", "reference", "gather", "flex")

Axes = int | Sequence[int]


class _Grid:
    """Checked per-axis parameters of a neighbourhood."""

    def __init__(self, shape: Axes, kernel_size: Axes, stride: Axes, dilation: Axes,
                 causal: bool | Sequence[bool]) -> None:
        self.shape = _as_tuple("shape", shape, None, int)
        dims = len(self.shape)
        if not 1 <= dims <= 3:
            raise ValueError(f"shape must have 1, 2 or 3 axes, got shape={self.shape}")
        if any(n < 1 for n in self.shape):
            raise ValueError(f"shape must have positive axis lengths, got shape={self.shape}")
        self.kernel = _as_tuple("kernel_size", kernel_size, dims, int)
        self.stride = _as_tuple("stride", stride, dims, int)
        self.dilation = _as_tuple("dilation", dilation, dims, int)
        self.causal = _as_tuple("causal", causal, dims, bool)
        for axis, (n, K, s, d) in enumerate(zip(self.shape, self.kernel, self.stride, self.dilation, strict=True)):
            where = f"(axis {axis} of shape {self.shape})"
            if K < 2:
                raise ValueError(f"kernel_size={K} must be >= 2 {where}: NATTEN's rule (any integer >= 2, even "
                                 f"sizes included; kernel_size * dilation at most the axis length)")
            if K > n:
                raise ValueError(f"kernel_size={K} is larger than the axis length {n} {where} (NATTEN's rule: "
                                 f"kernel_size * dilation <= axis length)")
            if d < 1:
                raise ValueError(f"dilation={d} must be >= 1 {where}")
            if K * d > n:
                raise ValueError(
                    f"kernel_size * dilation = {K} * {d} = {K * d} is larger than the axis length {n} {where}"
                )
            if not 1 <= s <= K:
                raise ValueError(f"stride={s} must be between 1 and kernel_size={K} {where}")
        self.length = math.prod(self.shape)
        # row-major flattening: coordinate of axis a = (index // step[a]) % shape[a]
        self.steps = tuple(math.prod(self.shape[a + 1:]) for a in range(dims))

    def coords(self, index: torch.Tensor) -> list[torch.Tensor]:
        return [(index // step) % n for step, n in zip(self.steps, self.shape, strict=True)]

    def allowed(self, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """The NATTEN rule on flattened indices (broadcasting), AND over axes."""
        result = None
        for a, (qc, kc) in enumerate(zip(self.coords(q_index), self.coords(k_index), strict=True)):
            ok = _axis_rule(qc, kc, self.shape[a], self.kernel[a], self.stride[a], self.dilation[a], self.causal[a])
            result = ok if result is None else result & ok
        return result

    def neighbours(self, q_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key indices ``[Q, prod(K)]`` of each query and their validity (causal windows may be short)."""
        index, valid = None, None
        coords = self.coords(q_index)
        dims = len(self.shape)
        for a, x in enumerate(coords):
            n, K, s, d = self.shape[a], self.kernel[a], self.stride[a], self.dilation[a]
            g, xp = x % d, x // d
            ng = (n - g + d - 1) // d
            if self.causal[a]:
                lead = torch.minimum(xp // s * s + (s - 1), ng - 1)
                kp = lead[:, None] - K + 1 + torch.arange(K, device=x.device)  # (Q, K)
                ok = (kp >= 0) & (kp <= xp[:, None])
            else:
                left, right = K // 2, K // 2 + K % 2 - 1
                lead = torch.minimum(xp // s * s + s // 2, ng - 1)
                centre = torch.clamp(torch.minimum(lead, ng - 1 - right), min=left)
                kp = centre[:, None] - left + torch.arange(K, device=x.device)  # (Q, K)
                ok = torch.ones_like(kp, dtype=torch.bool)
            kc = kp * d + g[:, None]  # (Q, K) key coordinates on this axis
            view = [x.shape[0]] + [1] * dims
            view[a + 1] = K
            part = (kc * self.steps[a]).reshape(view)
            ok = ok.reshape(view)
            index = part if index is None else index + part
            valid = ok if valid is None else valid & ok
        return index.reshape(x.shape[0], -1), valid.reshape(x.shape[0], -1)


def _axis_rule(qc: torch.Tensor, kc: torch.Tensor, n: int, K: int, s: int, d: int, causal: bool) -> torch.Tensor:
    """NATTEN's 1-D rule (``single_dim_tiling_mask``) on coordinates ``qc``, ``kc`` (broadcasting)."""
    gq, gk = qc % d, kc % d
    qp, kp = qc // d, kc // d
    ng = (n - gq + d - 1) // d  # tokens of the query's dilation group
    if causal:
        lead = torch.minimum(qp // s * s + (s - 1), ng - 1)
        return (gq == gk) & (kp <= qp) & (lead - kp < K)
    left, right = K // 2, K // 2 + K % 2 - 1
    lead = torch.minimum(qp // s * s + s // 2, ng - 1)
    centre = torch.clamp(torch.minimum(lead, ng - 1 - right), min=left)
    return (gq == gk) & (kp >= centre - left) & (kp <= centre + right)


def _as_tuple(name: str, value: object, dims: int | None, kind: type) -> tuple:
    items = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    for item in items:
        wrong = not isinstance(item, kind) or (kind is int and isinstance(item, bool))
        if kind is bool:
            wrong = not isinstance(item, bool)
        if wrong:
            raise TypeError(f"{name} must be a {kind.__name__} or a tuple of them, got {value!r}")
    if dims is not None:
        if len(items) == 1:
            items = items * dims
        elif len(items) != dims:
            raise ValueError(f"{name}={value!r} has {len(items)} entries, expected 1 or one per axis ({dims})")
    return items


def neighborhood_mask(shape: Axes, kernel_size: Axes, *, stride: Axes = 1, dilation: Axes = 1,
                      causal: bool | Sequence[bool] = False,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[N, N]`` mask of Generalized Neighborhood Attention (True = attend), ``N = prod(shape)``.

    NATTEN's rule (``single_dim_tiling_mask`` of its flex backend; GNA, arXiv 2504.16922), see the
    module docstring; tokens flattened row-major, the multi-dimensional mask is the AND over axes.

    Args:
        shape: grid size, an int (1-D) or a tuple of 1-3 ints.
        kernel_size, stride, dilation: an int or one per axis.
        causal: a bool or one per axis.

    Raises:
        ValueError: a kernel < 2, larger than its axis, ``kernel_size * dilation`` larger than the
            axis, or a stride outside ``[1, kernel_size]`` (the numbers are in the message).
    """
    grid = _Grid(shape, kernel_size, stride, dilation, causal)
    index = torch.arange(grid.length, device=device)
    return grid.allowed(index[:, None], index[None, :])


def neighborhood_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: Axes,
                                     shape: Axes | None = None, stride: Axes = 1, dilation: Axes = 1,
                                     causal: bool | Sequence[bool] = False,
                                     scale: float | None = None) -> torch.Tensor:
    """Dense masked softmax with :func:`neighborhood_mask` (quadratic; the oracle).

    NATTEN (arXiv 2204.07143 eq. 1 / 2504.16922): ``softmax(scale Q K^T + log(mask)) V``.
    """
    sizes = check_qkv(q, k, v)
    grid = _grid_for(sizes.length, sizes.key_length, shape, kernel_size, stride, dilation, causal)
    index = torch.arange(grid.length, device=q.device)
    mask = grid.allowed(index[:, None], index[None, :])  # (N, N)
    return softmax_attention_reference(q, k, v, scale=scale, attn_mask=mask)


def _grid_for(N: int, M: int, shape: Axes | None, kernel_size: Axes, stride: Axes, dilation: Axes,
              causal: bool | Sequence[bool]) -> _Grid:
    if N != M:
        raise ValueError(f"neighborhood attention is self-attention: k, v must have the length of q (N={N}), "
                         f"got M={M}")
    grid = _Grid((N,) if shape is None else shape, kernel_size, stride, dilation, causal)
    if grid.length != N:
        raise ValueError(f"shape={grid.shape} holds {grid.length} tokens, but q has N={N}")
    return grid


def _gather_blocks(grid: _Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of consecutive queries: the union of their neighbours ``[G, S]`` and the mask ``[G, Bq, S]``.

    Cached per grid and device (the lists depend on nothing else; every layer and step reuses them).
    """
    return _gather_blocks_cached(grid.shape, grid.kernel, grid.stride, grid.dilation, grid.causal, str(device))


@functools.lru_cache(maxsize=16)
def _gather_blocks_cached(shape: tuple, kernel: tuple, stride: tuple, dilation: tuple, causal: tuple,
                          device_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    grid = _Grid(shape, kernel, stride, dilation, causal)
    device = torch.device(device_name)
    N = grid.length
    per_query = math.prod(grid.kernel)
    Bq = min(N, max(32, min(128, per_query)) if len(grid.shape) == 1 else 64)
    G = -(-N // Bq)
    # built a few blocks at a time: the int64 (blocks, Bq, K) temporaries of the whole sequence would
    # otherwise dominate the memory of a long call (N = 16384, K = 127: ~17 MiB each)
    step = max(1, (1 << 18) // (Bq * per_query))
    parts = []
    for g0 in range(0, G, step):
        g1 = min(G, g0 + step)
        queries = torch.arange(g0 * Bq, g1 * Bq, device=device)  # (g*Bq,)
        keys, valid = grid.neighbours(queries.clamp(max=N - 1))  # (g*Bq, K)
        keys = torch.where(valid, keys, N).reshape(g1 - g0, -1).sort(dim=1).values  # sentinel N sorts last
        duplicate = torch.zeros_like(keys, dtype=torch.bool)
        duplicate[:, 1:] = keys[:, 1:] == keys[:, :-1]
        keys = keys.masked_fill(duplicate, N).sort(dim=1).values
        keys = keys[:, :int((keys < N).sum(dim=1).max())]  # (g, S_part)
        present = keys < N
        keys = keys.masked_fill(~present, 0)
        queries = queries.reshape(g1 - g0, Bq)
        allowed = grid.allowed(queries[:, :, None], keys[:, None, :]) & present[:, None, :]
        allowed &= (queries < N)[:, :, None]
        parts.append((keys, allowed))
    S = max(keys.shape[1] for keys, _ in parts)  # padding entries: key 0, never allowed
    keys = torch.cat([torch.nn.functional.pad(keys, (0, S - keys.shape[1])) for keys, _ in parts])  # (G, S)
    allowed = torch.cat([torch.nn.functional.pad(allowed, (0, S - allowed.shape[2]))
                         for _, allowed in parts])  # (G, Bq, S)
    return keys, allowed


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: _Grid, scale: float) -> torch.Tensor:
    """Compiled FlexAttention with the NATTEN rule (``_Grid.allowed``) as its mask_mod."""

    def natten_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return grid.allowed(q_idx, kv_idx)

    key = ("neighborhood", grid.shape, grid.kernel, grid.stride, grid.dilation, grid.causal)
    return flex_masked_attention(q, k, v, mask_mod=natten_mask, mask_key=key, scale=scale)


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel_size: Axes,
                           shape: Axes | None = None, stride: Axes = 1, dilation: Axes = 1,
                           causal: bool | Sequence[bool] = False, scale: float | None = None,
                           impl: Literal["auto", "reference", "gather", "flex"] = "auto") -> torch.Tensor:
    """Generalized Neighborhood Attention: each token attends to its neighbourhood on a grid.

    Hassani et al., "Neighborhood Attention Transformer" (arXiv 2204.07143, eq. 1; dilation: arXiv
    2209.15001; strides: "Generalized Neighborhood Attention", arXiv 2504.16922). The mask is NATTEN's
    (see :func:`neighborhood_mask`); the output is softmax attention over the allowed keys.

    Args:
        q: ``[B, H, N, D]``; k, v: ``[B, H_kv, N, D|Dv]`` (``H_kv`` divides ``H``), ``N == prod(shape)``.
        kernel_size, stride, dilation: an int or one per axis of ``shape``. ``kernel_size`` follows
            NATTEN's rule (its argument check accepts any integer >= 2 per axis, even sizes included
            since Generalized Neighborhood Attention: an even ``K`` sees ``K div 2`` keys before the centre
            and ``K div 2 - 1`` after; ``kernel_size * dilation`` at most the axis length; ``1 <= stride
            <= kernel_size``); anything else raises ``ValueError``, a non-int ``TypeError``.
        shape: the token grid, flattened row-major (default ``(N,)``). FreeSwim's inward window on
            video tokens is ``shape=(F, H, W)``, ``kernel_size=(F, 2 d_h + 1, 2 d_w + 1)``.
        causal: a bool or one per axis.
        scale: default ``D ** -0.5``.
        impl: "reference" (dense masked softmax, ``O(N^2)`` memory); "gather" (each block of
            queries gathers the union of its neighbours: ``O(N * K)`` memory in gathered copies of
            the keys and values, differentiable, CPU and GPU); "flex"
            (``torch.nn.attention.flex_attention`` compiled, with a cached block mask of the same
            NATTEN rule, see :mod:`attnlab.ops.flex`: fused, no gathered copies; forward and
            backward on CUDA, forward only on CPU, where it raises ``NotImplementedError`` when a
            gradient is needed); "auto" = "flex" on CUDA for float32/bfloat16/float16 (the gathered
            keys of "gather" ran out of memory on an H200 at H=16, D=128, N >= 16384, kernel 1024),
            "gather" otherwise (on CPU compiled FlexAttention has no backward and compiles for
            seconds; float64 is for checks).

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_impl(impl, IMPLS)
    if impl == "reference":
        return guard_nonfinite(lambda k, v: neighborhood_attention_reference(
            q, k, v, kernel_size=kernel_size, shape=shape, stride=stride, dilation=dilation, causal=causal,
            scale=scale), q, k, v, reach=lambda bad: _grid_reach(q, shape, kernel_size, stride, dilation, causal)(bad))
    sizes = check_qkv(q, k, v)
    grid = _grid_for(sizes.length, sizes.key_length, shape, kernel_size, stride, dilation, causal)
    scale = check_scale(scale, sizes.head_dim)
    reach = _neighbour_reach(grid, q.device)
    if impl == "auto":
        impl = "flex" if auto_uses_flex(q) else "gather"
    if impl == "flex":
        return guard_nonfinite(lambda k, v: _flex(q, k, v, grid, scale), q, k, v, reach=reach)
    key_index, allowed = _gather_blocks(grid, q.device)
    return guard_nonfinite(lambda k, v: gathered_block_attention(q, k, v, key_index=key_index, allowed=allowed,
                                                                 scale=scale), q, k, v, reach=reach)


def _neighbour_reach(grid: _Grid, device: torch.device) -> Reach:
    """Each row sees its NATTEN neighbours (the key lists are built only when a key is non-finite)."""

    def reach(bad: torch.Tensor) -> torch.Tensor:
        keys, valid = grid.neighbours(torch.arange(grid.length, device=device))  # (N, K), (N, K)
        return index_reach(keys, valid)(bad)

    return reach


def _grid_reach(q: torch.Tensor, shape: Axes | None, kernel_size: Axes, stride: Axes, dilation: Axes,
                causal: bool | Sequence[bool]) -> Reach:
    N = q.shape[2]
    return _neighbour_reach(_grid_for(N, N, shape, kernel_size, stride, dilation, causal), q.device)


def _odd_kernel(size: int, length: int) -> int:
    """The odd kernel size closest to ``size`` from below, at least 1 and at most ``length``."""
    size = max(1, min(size, length))
    return size if size % 2 else size - 1 if size > 1 else 1


register(Mechanism(
    name="neighborhood",
    op=neighborhood_attention,
    reference=neighborhood_attention_reference,
    layer=None,
    family="local",
    paper="Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light",
    arxiv="2504.16922",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=False,
    supports_gqa=True,
    complexity="O(N K d)",
    # odd kernels give symmetric neighbourhoods: a quarter of the model length (at least 3), half of the
    # benchmark length up to 127
    model_options=lambda seq_len: {"kernel_size": _odd_kernel(max(3, seq_len // 4), seq_len)},
    bench_options=lambda shape: {"kernel_size": _odd_kernel(min(shape.length // 2, 127), shape.length)},
    check=CheckConfig(options={"kernel_size": 3}, bf16_options={"kernel_size": 63}),
))

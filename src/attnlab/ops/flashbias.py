"""FlashBias: attention with a low-rank additive bias, without ever building the ``N x M`` bias.

Wu et al., "FlashBias: Fast Computation of Attention with Bias" (arXiv 2505.12044, NeurIPS 2025),
eq. of sec. 3: ``O = softmax(scale Q K^T + B) V`` with ``B = U W^T`` (``U = q_bias [N, R]``,
``W = k_bias [M, R]``, bias not scaled). Because ``scale q.k + u.w = [scale q, u] . [k, w]``, one
standard attention call on concatenated features computes it exactly (the repository README's SDPA
recipe). This module holds the op, its dense reference and exact / approximate factor builders.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from attnlab.ops.alibi import alibi_slopes
from attnlab.ops.nonfinite import guard_nonfinite
from attnlab.ops.softmax import attention_mask
from attnlab.ops.validation import (
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    check_scale,
    check_tensor,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "flashbias_attention",
    "flashbias_attention_reference",
    "alibi_slopes",
    "alibi_bias",
    "alibi_bias_factors",
    "spatial_distance_bias_factors",
    "svd_bias_factors",
    "factors_in_dtype",
]

IMPLS = ("auto", "reference", "sdpa")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _check_factors(q_bias: torch.Tensor, k_bias: torch.Tensor, B: int, H: int, Hkv: int, N: int,
                   M: int) -> tuple[int, int]:
    """Check ``q_bias [B|1, H|1, N, R]``, ``k_bias [B|1, H|H_kv|1, M, R]``; return (R, k_bias heads)."""
    check_tensor("q_bias", q_bias, ndim=4, layout="[B|1, H|1, N, R]")
    check_tensor("k_bias", k_bias, ndim=4, layout="[B|1, H|H_kv|1, M, R]")
    if q_bias.shape[0] not in (1, B) or q_bias.shape[1] not in (1, H) or q_bias.shape[2] != N:
        raise ValueError(f"q_bias must have shape [B|1, H|1, N, R] = [{B}|1, {H}|1, {N}, R], "
                         f"got {tuple(q_bias.shape)}")
    if k_bias.shape[0] not in (1, B) or k_bias.shape[1] not in (1, Hkv, H) or k_bias.shape[2] != M:
        raise ValueError(f"k_bias must have shape [B|1, H|H_kv|1, M, R] = [{B}|1, {H}|{Hkv}|1, {M}, R], "
                         f"got {tuple(k_bias.shape)}")
    if q_bias.shape[3] != k_bias.shape[3]:
        raise ValueError(f"q_bias and k_bias must have the same rank R, got q_bias R={q_bias.shape[3]} "
                         f"and k_bias R={k_bias.shape[3]}")
    if q_bias.device != k_bias.device:
        raise ValueError(f"q_bias is on {q_bias.device} but k_bias on {k_bias.device}")
    return q_bias.shape[3], k_bias.shape[1]


def flashbias_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_bias: torch.Tensor,
                                  k_bias: torch.Tensor, causal: bool = False,
                                  scale: float | None = None) -> torch.Tensor:
    """Dense ``softmax(scale Q K^T + q_bias k_bias^T) V`` (builds the ``N x M`` bias; the oracle).

    FlashBias (arXiv 2505.12044), sec. 3. Computes in float32 (float64 for float64 inputs); the
    factors are cast to that dtype. Causal queries are aligned to the end of the keys.
    """
    check_causal(causal)
    sizes = check_qkv(q, k, v)
    B, H, Hkv, N, M, D, _ = sizes
    scale = check_scale(scale, D)
    _check_factors(q_bias, k_bias, B, H, Hkv, N, M)
    if causal:
        check_causal_lengths(N, M)
    dtype = compute_dtype(q.dtype)
    kf = expand_kv(k, H).to(dtype)  # (B, H, M, D)
    vf = expand_kv(v, H).to(dtype)  # (B, H, M, Dv)
    kb = expand_kv(k_bias, H) if k_bias.shape[1] not in (1, H) else k_bias  # (B|1, H|1, M, R)
    bias = torch.einsum("bhnr,bhmr->bhnm", q_bias.to(dtype), kb.to(dtype))  # (B|1, H|1, N, M)
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(dtype), kf) * scale + bias  # (B, H, N, M)
    if causal:
        mask = attention_mask(N, M, causal=True, device=q.device)  # (N, M)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("bhnm,bhme->bhne", probs, vf).to(q.dtype)  # (B, H, N, Dv)


def flashbias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_bias: torch.Tensor,
                        k_bias: torch.Tensor, causal: bool = False, scale: float | None = None,
                        impl: Literal["auto", "reference", "sdpa"] = "auto") -> torch.Tensor:
    """``softmax(scale Q K^T + q_bias k_bias^T) V`` without building the ``N x M`` bias.

    Wu et al., "FlashBias: Fast Computation of Attention with Bias", arXiv 2505.12044, sec. 3
    (bias ``B = U W^T`` of rank R, not scaled). Fast path (the paper's SDPA recipe): one
    ``scaled_dot_product_attention`` call on ``[q * scale, q_bias]`` and ``[k, k_bias]`` with scale 1;
    the feature dim ``D + R`` is zero-padded to a multiple of 8 (what the flash backends want), and v
    is zero-padded to that width when narrower (the fused kernels need one head dim; sliced off after).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        q_bias: ``[B|1, H|1, N, R]``; k_bias: ``[B|1, H|H_kv|1, M, R]``; any floating dtype. Factors
            wider than q are cast only where q's dtype holds them exactly; the float32/float64 ALiBi
            factors of :func:`alibi_bias_factors` are rebuilt exactly in q's dtype; other wider factors
            are refused (see :func:`factors_in_dtype`): build them in q's dtype.
            Size-1 batch/head dims broadcast. A k_bias with ``H`` heads over ``H_kv < H`` key heads
            makes the fast path repeat k, v to ``H`` heads.
        causal: queries aligned to the end of the keys. For ``N == M`` SDPA's ``is_causal`` is
            used; for ``N < M`` a boolean ``[N, M]`` mask is passed (no float bias).
        scale: multiplies ``q . k`` only; default ``D ** -0.5``.
        impl: "reference" (dense bias), "sdpa" or "auto" (= "sdpa").

    Returns:
        ``[B, H, N, Dv]`` in the dtype of q.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    if impl == "reference":
        return guard_nonfinite(lambda k, v: flashbias_attention_reference(
            q, k, v, q_bias=q_bias, k_bias=k_bias, causal=causal, scale=scale), q, k, v, causal=causal)
    sizes = check_qkv(q, k, v)
    B, H, Hkv, N, M, D, _ = sizes
    scale = check_scale(scale, D)
    _check_factors(q_bias, k_bias, B, H, Hkv, N, M)
    if causal:
        check_causal_lengths(N, M)
    q_bias, k_bias = factors_in_dtype(q_bias, k_bias, q.dtype, heads=H, length=N, key_length=M)
    return guard_nonfinite(lambda k, v: _flashbias_sdpa(q, k, v, q_bias, k_bias, causal=causal, scale=scale),
                           q, k, v, causal=causal)


def _wider(dtype: torch.dtype, than: torch.dtype) -> bool:
    return torch.finfo(dtype).eps < torch.finfo(than).eps


def _alibi_slopes_of(q_bias: torch.Tensor, k_bias: torch.Tensor, heads: int, length: int,
                     key_length: int) -> torch.Tensor | None:
    """The slopes ``[H]`` when ``(q_bias, k_bias)`` are the rank-2 :func:`alibi_bias_factors` (else ``None``)."""
    if q_bias.shape[-1] != 2 or length > key_length:
        return None
    slopes = q_bias[0, :, 0, 0].to(torch.float64).expand(heads)  # (H,)
    want_q, want_k = alibi_bias_factors(heads, length, key_length, slopes=slopes.contiguous(), dtype=torch.float64,
                                        device=q_bias.device)
    close = torch.allclose(q_bias.to(torch.float64), want_q.expand_as(q_bias), rtol=1e-6, atol=0)
    if close and torch.equal(k_bias.to(torch.float64), want_k.expand_as(k_bias)):
        return slopes
    return None


def factors_in_dtype(q_bias: torch.Tensor, k_bias: torch.Tensor, dtype: torch.dtype, *, heads: int, length: int,
                     key_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bias factors in the attention dtype ``dtype``, exactly or not at all.

    For a float32/float64 ``dtype`` the factors are cast (24 or more mantissa bits: the library's own
    default factors are float32). For bfloat16/float16: factors in ``dtype`` or a narrower dtype pass; wider
    factors whose entries
    ``dtype`` holds exactly are cast; the rank-2 ALiBi factors of :func:`alibi_bias_factors` are rebuilt
    as that function's exact factors for ``dtype`` (bf16 rounding of ``[m_h, -m_h p_i] . [j, 1]``
    cancels: relative error 0.38 at N = 2048); anything else is refused, since rounding a factor can
    cancel its products' leading digits.

    Raises:
        ValueError: wider factors that would lose digits, naming ``alibi_bias_factors(..., dtype=...)``.
    """
    if dtype not in _LOW_PRECISION or not (_wider(q_bias.dtype, dtype) or _wider(k_bias.dtype, dtype)):
        return q_bias.to(dtype), k_bias.to(dtype)
    q_cast, k_cast = q_bias.to(dtype), k_bias.to(dtype)
    if torch.equal(q_cast.to(q_bias.dtype), q_bias) and torch.equal(k_cast.to(k_bias.dtype), k_bias):
        return q_cast, k_cast
    slopes = _alibi_slopes_of(q_bias, k_bias, heads, length, key_length)
    if slopes is not None:
        return alibi_bias_factors(heads, length, key_length, slopes=slopes, dtype=dtype, device=q_bias.device)
    raise ValueError(
        f"q_bias/k_bias are {q_bias.dtype}/{k_bias.dtype} but q is {dtype}: rounding the factors to {dtype} "
        f"changes the bias (their products can cancel in the leading digits). Build them in the attention "
        f"dtype, e.g. alibi_bias_factors(..., dtype={dtype}) for ALiBi, or cast them yourself "
        f"(q_bias.to({dtype}), k_bias.to({dtype})) to accept the rounding")


def _flashbias_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_bias: torch.Tensor, k_bias: torch.Tensor,
                    *, causal: bool, scale: float) -> torch.Tensor:
    """The SDPA recipe on checked inputs; factors already in q's dtype."""
    B, H, N, D = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    R, k_bias_heads = q_bias.shape[-1], k_bias.shape[1]
    if k_bias_heads == H and Hkv != H:  # per-query-head key factors: give every query head its own keys
        k, v, Hkv = expand_kv(k, H), expand_kv(v, H), H
    pad = (-(D + R)) % 8
    zeros = q.new_zeros(()).expand(B, max(H, Hkv), max(N, M), pad)  # no memory: padding by broadcast
    q_cat = torch.cat([q * scale, q_bias.expand(B, H, N, R), zeros[:, :H, :N]], dim=-1)
    k_cat = torch.cat([k, k_bias.expand(B, Hkv, M, R), zeros[:, :Hkv, :M]], dim=-1)
    # q_cat (B, H, N, D + R + pad), k_cat (B, H_kv, M, D + R + pad): one allocation each
    Dv = v.shape[-1]
    width = q_cat.shape[-1]
    v_in = F.pad(v, (0, width - Dv)) if Dv < width else v  # fused CPU/GPU kernels want one head dim
    mask = None
    if causal and N != M:
        mask = attention_mask(N, M, causal=True, device=q.device)  # (N, M) boolean, end-aligned
    out = F.scaled_dot_product_attention(q_cat, k_cat, v_in, attn_mask=mask, is_causal=causal and mask is None,
                                         scale=1.0, enable_gqa=Hkv != H)  # (B, H, N, max(D + R + pad, Dv))
    return out[..., :Dv] if v_in is not v else out


def _slopes(heads: int, slopes: torch.Tensor | None, device: torch.device | str | None) -> torch.Tensor:
    if slopes is None:
        return alibi_slopes(heads, device=device)
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating torch.Tensor of shape [{heads}], got {slopes!r}")
    if tuple(slopes.shape) != (heads,):
        raise ValueError(f"slopes must have shape [heads] = [{heads}], got {tuple(slopes.shape)}")
    return slopes.to(torch.float64)


def _lengths(n: int, m: int | None) -> tuple[int, int]:
    m = n if m is None else m
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if n > m:
        raise ValueError(f"ALiBi queries are aligned to the end of the keys: need n <= m, got n={n}, m={m}")
    return n, m


def alibi_bias(heads: int, n: int, m: int | None = None, slopes: torch.Tensor | None = None, *,
               dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """Dense causal ALiBi bias ``[1, H, n, m]``: ``B_ij = -m_h (p_i - j)``, ``p_i = i + m - n``.

    Press et al., "Train Short, Test Long" (arXiv 2108.12409), sec. 3. For tests and baselines: the
    point of FlashBias is never to build it.
    """
    n, m = _lengths(n, m)
    s = _slopes(heads, slopes, device)
    p = torch.arange(n, dtype=torch.float64, device=device) + (m - n)
    j = torch.arange(m, dtype=torch.float64, device=device)
    return (-s[:, None, None] * (p[:, None] - j[None, :]))[None].to(dtype)


def alibi_bias_factors(heads: int, n: int, m: int | None = None, slopes: torch.Tensor | None = None, *,
                       dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors ``(q_bias, k_bias)`` of the causal ALiBi bias ``B_ij = -m_h (p_i - j)``.

    FlashBias (arXiv 2505.12044) sec. 4.1 ALiBi example, with the standard ALiBi sign (Press et al.,
    arXiv 2108.12409; the FlashBias example has the opposite sign). Queries are aligned to the end of
    the keys: ``p_i = i + m - n``.

    - float32 / float64: rank 2, ``q_bias_i = [m_h, -m_h p_i]``, ``k_bias_j = [j, 1]``
      (``q_bias [1, H, n, 2]``, ``k_bias [1, 1, m, 2]``).
    - bfloat16 / float16: ``m_h j - m_h p_i`` written as a difference of two large rounded numbers
      loses everything in an 8-bit mantissa (relative error 0.5-0.8). Instead every factor entry is
      exact: positions split as ``i = 256 a_i + b_i`` (integers below 256 are exact), slopes as
      ``m_h = hi_h + lo_h`` with ``hi = bf16(m)``, ``lo = bf16(m - hi)``, and
      ``q_bias_i = [256 hi, hi, 256 lo, lo, -a_i, -b_i, -a_i, -b_i]``,
      ``k_bias_j = [a_j, b_j, a_j, b_j, 256 hi, hi, 256 lo, lo]`` (rank 8, ``k_bias [1, H, m, 8]``).
      Every product is exact in the float32 accumulator of the attention kernel, so the scores get
      ``-(hi + lo)(p_i - j)``, the slope to about 16 bits. Needs ``m <= 65536``. (Splitting the
      positions into bf16 hi/lo parts is the exact-bf16 FlashBias recipe timed on an H200 in
      ``docs/benchmarks.md``; putting the slopes on the key side and splitting them in two is this
      implementation's choice.)

    Args:
        heads: H; n: query length; m: key length (default n); slopes: ``[H]`` (default
            :func:`alibi_slopes`); dtype: the dtype the attention runs in.
    """
    n, m = _lengths(n, m)
    s = _slopes(heads, slopes, device)  # (H,) float64
    p = torch.arange(n, dtype=torch.float64, device=device) + (m - n)  # (n,)
    j = torch.arange(m, dtype=torch.float64, device=device)  # (m,)
    if dtype not in _LOW_PRECISION:
        q_bias = torch.stack([s[:, None].expand(heads, n), -s[:, None] * p[None, :]], dim=-1)  # (H, n, 2)
        k_bias = torch.stack([j, torch.ones_like(j)], dim=-1)  # (m, 2)
        return q_bias[None].to(dtype), k_bias[None, None].to(dtype)
    if m > 65536:
        raise ValueError(f"exact {dtype} ALiBi factors split positions in two 8-bit digits: need m <= 65536, "
                         f"got m={m}")
    hi = s.to(dtype).to(torch.float64)
    lo = (s - hi).to(dtype).to(torch.float64)
    a_i, b_i = torch.div(p, 256, rounding_mode="floor"), torch.remainder(p, 256)
    a_j, b_j = torch.div(j, 256, rounding_mode="floor"), torch.remainder(j, 256)
    slope_part = torch.stack([256 * hi, hi, 256 * lo, lo], dim=-1)  # (H, 4)
    q_bias = torch.cat([slope_part[:, None, :].expand(heads, n, 4),
                        torch.stack([-a_i, -b_i, -a_i, -b_i], dim=-1)[None].expand(heads, n, 4)], dim=-1)
    k_bias = torch.cat([torch.stack([a_j, b_j, a_j, b_j], dim=-1)[None].expand(heads, m, 4),
                        slope_part[:, None, :].expand(heads, m, 4)], dim=-1)
    return q_bias[None].to(dtype), k_bias[None].to(dtype)  # (1, H, n, 8), (1, H, m, 8)


def spatial_distance_bias_factors(coords_q: torch.Tensor, coords_k: torch.Tensor,
                                  weight: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of ``B_ij = -w_i ||x_i - x_j||^2`` (rank ``C + 2`` for ``C``-dim coordinates).

    FlashBias (arXiv 2505.12044), neural-solver spatial bias: ``-||x_i - x_j||^2 =
    [2 x_i, -|x_i|^2, -1] . [x_j, 1, |x_j|^2]``; the weight multiplies the query side.

    Args:
        coords_q: ``[..., N, C]``; coords_k: ``[..., M, C]`` (same leading dims, e.g. ``[B, 1]``).
        weight: a float, or a tensor broadcastable to ``[..., N]`` (a per-token, per-head weight).

    Returns:
        ``q_bias [..., N, C + 2]``, ``k_bias [..., M, C + 2]``.
    """
    check_tensor("coords_q", coords_q)
    check_tensor("coords_k", coords_k)
    if coords_q.ndim < 2 or coords_k.ndim < 2 or coords_q.shape[-1] != coords_k.shape[-1]:
        raise ValueError(f"coords_q [..., N, C] and coords_k [..., M, C] must share C, got "
                         f"{tuple(coords_q.shape)} and {tuple(coords_k.shape)}")
    w = torch.as_tensor(weight, dtype=coords_q.dtype, device=coords_q.device)
    w = w[..., None] if w.ndim else w  # (..., N, 1)
    sq_q = coords_q.square().sum(-1, keepdim=True)  # (..., N, 1)
    sq_k = coords_k.square().sum(-1, keepdim=True)  # (..., M, 1)
    q_bias = torch.cat([2 * coords_q, -sq_q, -torch.ones_like(sq_q)], dim=-1) * w  # (..., N, C + 2)
    k_bias = torch.cat([coords_k, torch.ones_like(sq_k), sq_k], dim=-1)  # (..., M, C + 2)
    return q_bias, k_bias


def svd_bias_factors(bias: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-R factors of a dense bias by truncated SVD (Eckart-Young).

    FlashBias (arXiv 2505.12044), Swin V2 relative-position bias: ``B ~ U_R S_R V_R^T`` with
    ``q_bias = U_R S_R^(1/2)``, ``k_bias = V_R S_R^(1/2)`` (the even split is inferred; any split with the
    same product is equivalent).

    Args:
        bias: ``[..., N, M]``; rank: ``1 <= R <= min(N, M)``.

    Returns:
        ``q_bias [..., N, R]``, ``k_bias [..., M, R]`` and ``relative_error [...]``
        ``= ||B - q_bias k_bias^T||_F / ||B||_F = sqrt(sum_{r >= R} s_r^2 / sum_r s_r^2)``.
    """
    check_tensor("bias", bias)
    if bias.ndim < 2:
        raise ValueError(f"bias must have shape [..., N, M], got {tuple(bias.shape)}")
    limit = min(bias.shape[-2:])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an int in [1, min(N, M) = {limit}], got rank={rank!r}")
    u, s, vh = torch.linalg.svd(bias, full_matrices=False)  # (..., N, k), (..., k), (..., k, M)
    root = s[..., :rank].sqrt()
    q_bias = u[..., :rank] * root[..., None, :]
    k_bias = vh[..., :rank, :].transpose(-1, -2) * root[..., None, :]
    energy = s.square()
    relative_error = (energy[..., rank:].sum(-1) / energy.sum(-1).clamp_min(torch.finfo(s.dtype).tiny)).sqrt()
    return q_bias, k_bias, relative_error


def _check_factors_fixed(length: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q_bias = torch.randn(1, 1, length, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
    k_bias = torch.randn(1, 1, length, rank, generator=generator, dtype=torch.float64) / math.sqrt(rank)
    return q_bias, k_bias


_CHECK_QB, _CHECK_KB = _check_factors_fixed(8, 3, 0)
# bf16 q takes only factors that bf16 holds exactly (wider ones are refused): random ones rounded once
_BF16_QB, _BF16_KB = (x.bfloat16().double() for x in _check_factors_fixed(512, 3, 1))

register(Mechanism(
    name="flashbias",
    op=flashbias_attention,
    reference=flashbias_attention_reference,
    layer=None,
    family="biased",
    paper="FlashBias: Fast Computation of Attention with Bias",
    arxiv="2505.12044",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N M (d + R))",
    # causal ALiBi as rank-2 factors, built in the benchmark dtype (exact in bf16)
    bench_options=lambda shape: dict(zip(("q_bias", "k_bias"), alibi_bias_factors(
        shape.heads, shape.length, dtype=shape.dtype, device=shape.device), strict=True)),
    # The factors have the length of the sequence, so every check runs at N = M = 8 (gradcheck too);
    # cross-attention lengths (M != N) are tested in tests/test_flashbias.py.
    check=CheckConfig(length=8, key_length=8, gradcheck_length=8,
                      options={"q_bias": _CHECK_QB, "k_bias": _CHECK_KB},
                      bf16_options={"q_bias": _BF16_QB, "k_bias": _BF16_KB}),
    role="cross",
))

"""Tensor (third-order, Kronecker) attention: every query attends to PAIRS of keys.

Alman & Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to
Kronecker Computation", arXiv 2310.04064 (ICLR 2024). With the column-wise Kronecker product
``A ⊘ B`` (row ``(j1, j2)`` is ``A[j1] ⊙ B[j2]``), the paper's definition is

    Att = D^{-1} exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2),   D = diag(exp(Q (K1 ⊘ K2)^T) 1)

i.e. ``S[i, (j1, j2)] = sum_l Q[i, l] K1[j1, l] K2[j2, l]`` and
``out_i = sum_{j1, j2} softmax_{(j1, j2)}(S_i) (V1[j1] ⊙ V2[j2])``.

Three implementations:

- ``impl="reference"``: the definition with the ``N x M1 x M2`` score tensor materialised,
  O(N M1 M2 d) time (the naive O(n^3) algorithm of the paper).
- ``impl="chunked"``: the same exact computation over blocks of queries, with activation
  checkpointing, so that memory stays bounded in training too. ``"auto"`` is this exact form unless
  the Taylor form below is exact to the working precision for the given inputs
  (:func:`taylor_error_bound`), cheaper, and (causal) small enough.
- ``impl="taylor"``: the polynomial method. ``exp(x)`` is replaced by its degree-``g`` Taylor
  polynomial and, with ``(q . (a ⊙ b))^t = sum_{|alpha| = t} t!/alpha! q^alpha a^alpha b^alpha``,
  ``exp(S) ≈ U1 (U2 ⊘ U3)^T`` with monomial features ``U1 = q^alpha / alpha!``, ``U2 = k1^alpha``,
  ``U3 = k2^alpha`` over the multi-indices ``|alpha| <= g`` (rank ``r = C(d + g, g)``). The identity
  ``(A ⊘ B)^T (C ⊘ D) = (A^T C) ⊙ (B^T D)`` then gives
  ``num = U1 [(U2^T V1) ⊙ (U3^T V2)]``, ``den = U1 [(U2^T 1) ⊙ (U3^T 1)]``: O(N r d) time, linear
  in the length. The paper's abstract states the bounded-entry regime (entries ``o(cbrt(log n))``)
  in which such an approximation is accurate; the exact degree it uses is not in the abstract, so
  the degree here is a plain, configurable Taylor degree (inferred). Even degrees keep the
  polynomial positive, hence the denominator.

The causal form is not defined in the paper (inferred here): query ``i`` sees the pair
``(j1, j2)`` when ``max(j1, j2) <= i + M - N`` (queries aligned to the end of the keys, as in
:func:`attnlab.ops.softmax_attention`).
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from attnlab.ops.validation import check_causal_lengths, check_impl, check_scale, check_tensor, compute_dtype

__all__ = [
    "tensor_attention",
    "tensor_attention_reference",
    "tensor_attention_chunked",
    "tensor_attention_taylor",
    "column_kronecker",
    "taylor_feature_rank",
    "taylor_error_bound",
]

IMPLS = ("auto", "reference", "chunked", "taylor")
MAX_TAYLOR_RANK = 1 << 20


class TensorSizes(NamedTuple):
    batch: int
    heads: int
    length: int
    key_length_1: int
    key_length_2: int
    head_dim: int
    value_dim: int


def column_kronecker(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product ``a ⊘ b``: ``a [..., n1, d]``, ``b [..., n2, d]`` -> ``[..., n1 * n2, d]``.

    Row ``j1 * n2 + j2`` is ``a[..., j1, :] * b[..., j2, :]`` (Alman & Song, arXiv 2310.04064, Def. of ⊘).
    """
    return rearrange(a[..., :, None, :] * b[..., None, :, :], "... i j d -> ... (i j) d")


def _check_inputs(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                  v2: torch.Tensor) -> TensorSizes:
    tensors = {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}
    layouts = {"q": "[B, H, N, D]", "k1": "[B, H, M1, D]", "k2": "[B, H, M2, D]", "v1": "[B, H, M1, E]",
               "v2": "[B, H, M2, E]"}
    for name, x in tensors.items():
        check_tensor(name, x, ndim=4, layout=layouts[name])
    devices = {name: x.device for name, x in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"q, k1, k2, v1, v2 must be on one device, got {devices}")
    dtypes = {name: x.dtype for name, x in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise TypeError(f"q, k1, k2, v1, v2 must have one dtype, got {dtypes}")
    B, H, N, D = q.shape
    for name, x in tensors.items():
        if tuple(x.shape[:2]) != (B, H):
            raise ValueError(f"{name} must have the batch and heads of q (B={B}, H={H}), got shape {tuple(x.shape)}")
        if 0 in x.shape:
            raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")
    for name in ("k1", "k2"):
        if tensors[name].shape[-1] != D:
            raise ValueError(
                f"{name} must have the head dim of q (D={D}), got {name}.shape[-1]={tensors[name].shape[-1]}"
            )
    M1, M2 = k1.shape[2], k2.shape[2]
    if v1.shape[2] != M1:
        raise ValueError(f"v1 must have the length of k1 (M1={M1}), got v1.shape[2]={v1.shape[2]}")
    if v2.shape[2] != M2:
        raise ValueError(f"v2 must have the length of k2 (M2={M2}), got v2.shape[2]={v2.shape[2]}")
    E = v1.shape[-1]
    if v2.shape[-1] != E:
        raise ValueError(f"v1 and v2 must have one value dim (their rows are multiplied), got {E} and {v2.shape[-1]}")
    return TensorSizes(B, H, N, M1, M2, D, E)


def _check_causal(sizes: TensorSizes) -> None:
    if sizes.key_length_1 != sizes.key_length_2:
        raise ValueError(
            f"causal tensor attention needs k1 and k2 of one length (positions of one sequence), got "
            f"M1={sizes.key_length_1} and M2={sizes.key_length_2}"
        )
    check_causal_lengths(sizes.length, sizes.key_length_1)


def _check_degree(degree: int) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise TypeError(f"degree must be an int, got {type(degree).__name__}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got degree={degree}")


def _tensor_scale(scale: float | None, head_dim: int) -> float:
    return check_scale(scale, head_dim)


def pair_causal_mask(length: int, key_length: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[N, M, M]``: True where query ``i`` may see the pair ``(j1, j2)`` (inferred causal rule)."""
    last = torch.arange(length, device=device) + (key_length - length)  # (N,)
    j = torch.arange(key_length, device=device)
    seen = j[None, :] <= last[:, None]  # (N, M)
    return seen[:, :, None] & seen[:, None, :]


def tensor_attention_reference(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                               v2: torch.Tensor, *, causal: bool = False, scale: float | None = 1.0,
                               ) -> torch.Tensor:
    """Naive tensor attention: the ``N x M1 x M2`` scores written out (the O(n^3) algorithm).

    Alman & Song, arXiv 2310.04064, definition of tensor attention:
    ``out_i = sum_{j1, j2} softmax(S_i)[j1, j2] (v1[j1] ⊙ v2[j2])`` with
    ``S[i, j1, j2] = scale * sum_l q[i, l] k1[j1, l] k2[j2, l]``. Float32 inside (float64 for
    float64 inputs). Shapes as in :func:`tensor_attention`.
    """
    sizes = _check_inputs(q, k1, k2, v1, v2)
    scale = _tensor_scale(scale, sizes.head_dim)
    if causal:
        _check_causal(sizes)
    dtype = compute_dtype(q.dtype)
    qf, k1f, k2f, v1f, v2f = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    scores = torch.einsum("bhil,bhal,bhcl->bhiac", qf, k1f, k2f) * scale  # (B, H, N, M1, M2)
    if causal:
        allowed = pair_causal_mask(sizes.length, sizes.key_length_1, device=q.device)  # (N, M, M)
        scores = scores.masked_fill(~allowed, float("-inf"))
    flat = rearrange(scores, "b h i a c -> b h i (a c)")
    probs = rearrange(torch.softmax(flat, dim=-1), "b h i (a c) -> b h i a c", a=sizes.key_length_1)
    out = torch.einsum("bhiac,bhae,bhce->bhie", probs, v1f, v2f)  # (B, H, N, E)
    return out.to(q.dtype)


def _pair_block(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Exact tensor attention of a block of queries ``[B, H, c, D]`` (``allowed [c, M, M]`` or ``None``)."""
    scores = torch.einsum("bhil,bhal,bhcl->bhiac", q, k1, k2) * scale  # (B, H, c, M1, M2)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
    return torch.einsum("bhiac,bhae,bhce->bhie", probs, v1, v2)  # (B, H, c, E)


def tensor_attention_chunked(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                             v2: torch.Tensor, *, causal: bool = False, scale: float | None = 1.0,
                             chunk_size: int | None = None) -> torch.Tensor:
    """Exact tensor attention over blocks of queries: O(N M1 M2 d) time, bounded memory.

    The same formula as :func:`tensor_attention_reference` (Alman & Song, arXiv 2310.04064), computed
    ``chunk_size`` queries at a time (default: blocks of about 2^24 scores); in training each block
    is recomputed in the backward pass (activation checkpointing), so memory stays
    ``O(chunk_size M1 M2)`` per batch-head instead of ``O(N M1 M2)``. Shapes as in :func:`tensor_attention`.
    """
    sizes = _check_inputs(q, k1, k2, v1, v2)
    scale = _tensor_scale(scale, sizes.head_dim)
    if causal:
        _check_causal(sizes)
    B, H, N = sizes.batch, sizes.heads, sizes.length
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // (B * H * sizes.key_length_1 * sizes.key_length_2))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got chunk_size={chunk_size!r}")
    dtype = compute_dtype(q.dtype)
    qf, k1f, k2f, v1f, v2f = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    allowed = pair_causal_mask(N, sizes.key_length_1, device=q.device) if causal else None  # (N, M, M)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k1, k2, v1, v2))
    blocks = []
    for start in range(0, N, chunk_size):
        rows = slice(start, min(start + chunk_size, N))
        block_mask = None if allowed is None else allowed[rows]
        if recompute:
            block = checkpoint(_pair_block, qf[:, :, rows], k1f, k2f, v1f, v2f, block_mask, scale,
                               use_reentrant=False)
        else:
            block = _pair_block(qf[:, :, rows], k1f, k2f, v1f, v2f, block_mask, scale)
        blocks.append(block)
    return torch.cat(blocks, dim=2).to(q.dtype)  # (B, H, N, E)


@lru_cache(maxsize=32)
def _multi_indices(dim: int, degree: int) -> tuple[tuple[int, ...], ...]:
    """All ``alpha`` in ``N^dim`` with ``|alpha| <= degree``, by total degree."""
    out: list[tuple[int, ...]] = []
    for total in range(degree + 1):
        for cut in itertools.combinations(range(total + dim - 1), dim - 1):  # stars and bars
            bounds = (-1, *cut, total + dim - 1)
            out.append(tuple(bounds[i + 1] - bounds[i] - 1 for i in range(dim)))
    return tuple(out)


def taylor_feature_rank(head_dim: int, degree: int) -> int:
    """Number of monomial features ``C(head_dim + degree, degree)`` of the Taylor path."""
    return math.comb(head_dim + degree, degree)


def _monomials(x: torch.Tensor, exponents: torch.Tensor, degree: int) -> torch.Tensor:
    """``x [..., n, d]`` -> ``x^alpha [..., n, r]`` for the rows ``alpha`` of ``exponents [r, d]``."""
    powers = [torch.ones_like(x)]
    for _ in range(degree):
        powers.append(powers[-1] * x)
    table = torch.stack(powers, dim=-1)  # (..., n, d, g + 1)
    features = table[..., 0, :].index_select(-1, exponents[:, 0])  # (..., n, r)
    for l in range(1, x.shape[-1]):  # noqa: E741
        features = features * table[..., l, :].index_select(-1, exponents[:, l])
    return features


def tensor_attention_taylor(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor,
                            v2: torch.Tensor, *, causal: bool = False, scale: float | None = 1.0,
                            degree: int = 8) -> torch.Tensor:
    """Tensor attention by the polynomial method: degree-``degree`` Taylor features, linear in the length.

    Alman & Song, arXiv 2310.04064 (fast algorithm for bounded entries; the feature construction and
    the plain Taylor degree are inferred, see the module docstring):
    ``out = U1 [(U2^T V1) ⊙ (U3^T V2)] / U1 [(U2^T 1) ⊙ (U3^T 1)]`` with ``U1 = (scale q)^alpha / alpha!``,
    ``U2 = k1^alpha``, ``U3 = k2^alpha``, ``|alpha| <= degree``. Causal: prefix sums of the key
    statistics (memory ``O(M r E)`` per head). Shapes as in :func:`tensor_attention`.
    """
    sizes = _check_inputs(q, k1, k2, v1, v2)
    scale = _tensor_scale(scale, sizes.head_dim)
    _check_degree(degree)
    rank = taylor_feature_rank(sizes.head_dim, degree)
    if rank > MAX_TAYLOR_RANK:
        raise ValueError(
            f"impl='taylor' with head dim D={sizes.head_dim} and degree={degree} needs C(D + degree, degree)="
            f"{rank} features (more than {MAX_TAYLOR_RANK}); lower the degree or the head dim"
        )
    if causal:
        _check_causal(sizes)
    dtype = compute_dtype(q.dtype)
    alphas = _multi_indices(sizes.head_dim, degree)
    exponents = torch.tensor(alphas, dtype=torch.long, device=q.device)  # (r, d)
    inverse_factorial = torch.tensor([1.0 / math.prod(math.factorial(a) for a in alpha) for alpha in alphas],
                                     dtype=dtype, device=q.device)  # (r,)
    u1 = _monomials(q.to(dtype) * scale, exponents, degree) * inverse_factorial  # (B, H, N, r)
    u2 = _monomials(k1.to(dtype), exponents, degree)  # (B, H, M1, r)
    u3 = _monomials(k2.to(dtype), exponents, degree)  # (B, H, M2, r)
    v1f, v2f = v1.to(dtype), v2.to(dtype)
    if not causal:
        w1 = torch.einsum("bhar,bhae->bhre", u2, v1f)  # (B, H, r, E) = U2^T V1
        w2 = torch.einsum("bhcr,bhce->bhre", u3, v2f)  # (B, H, r, E) = U3^T V2
        num = torch.einsum("bhir,bhre->bhie", u1, w1 * w2)  # (B, H, N, E)
        den = torch.einsum("bhir,bhr->bhi", u1, u2.sum(2) * u3.sum(2))  # (B, H, N)
    else:
        offset = sizes.key_length_1 - sizes.length
        w1 = torch.cumsum(torch.einsum("bhar,bhae->bhare", u2, v1f), dim=2)[:, :, offset:]  # (B, H, N, r, E)
        w2 = torch.cumsum(torch.einsum("bhcr,bhce->bhcre", u3, v2f), dim=2)[:, :, offset:]
        n1 = torch.cumsum(u2, dim=2)[:, :, offset:]  # (B, H, N, r)
        n2 = torch.cumsum(u3, dim=2)[:, :, offset:]
        num = torch.einsum("bhir,bhire->bhie", u1, w1 * w2)
        den = torch.einsum("bhir,bhir->bhi", u1, n1 * n2)
    return (num / den[..., None]).to(q.dtype)


_AUTO_TAYLOR_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-7}  # output error bound "auto" accepts
_AUTO_TAYLOR_STATE = 1 << 26  # elements of the causal Taylor state [B, H, N, r, E] "auto" accepts


def taylor_error_bound(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, *, scale: float | None = 1.0,
                       degree: int = 8) -> float:
    """A bound on ``|taylor - exact| / max|v1 ⊙ v2|`` for these inputs (every output entry, causal or not).

    With ``X >= |S[i, j1, j2]|`` for every score, ``X = scale max_i |q_i|_2 min(max |k1|_inf max_j |k2_j|_2,
    max_j |k1_j|_2 max |k2|_inf)`` (Cauchy-Schwarz), the Lagrange remainder of the degree-``g`` Taylor
    polynomial gives ``|T_g(x) - e^x| <= X^{g+1} e^X / (g+1)!`` and ``e^x >= e^{-X}``: every weight has
    relative error at most ``eps = X^{g+1} e^{2X} / (g+1)!``; numerator and denominator are sums of
    such weights (times ``v1 ⊙ v2``, resp. 1), so an output entry is off by at most
    ``2 eps / (1 - eps)`` times ``max|v1 ⊙ v2|``. This is the bounded-entry regime of Alman & Song
    (arXiv 2310.04064), made explicit (the constants are this implementation's).
    """
    head_dim = q.shape[-1]
    scale = _tensor_scale(scale, head_dim)
    _check_degree(degree)
    dtype = compute_dtype(q.dtype)
    with torch.no_grad():
        q_norm = q.to(dtype).norm(dim=-1).max()
        k1f, k2f = k1.to(dtype), k2.to(dtype)
        pair = torch.minimum(k1f.abs().amax() * k2f.norm(dim=-1).max(), k1f.norm(dim=-1).max() * k2f.abs().amax())
        X = float(abs(scale) * q_norm * pair)
    log_eps = (degree + 1) * math.log(X) + 2 * X - math.lgamma(degree + 2) if X > 0 else -math.inf
    if log_eps >= 0:
        return math.inf
    eps = math.exp(log_eps)
    return 2 * eps / (1 - eps)


def _auto_uses_taylor(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, sizes: TensorSizes, *, causal: bool,
                      scale: float | None, degree: int) -> bool:
    """Whether "auto" may run the Taylor form: feasible, cheaper than the exact form, and within its bound."""
    rank = taylor_feature_rank(sizes.head_dim, degree)
    if rank > MAX_TAYLOR_RANK:
        return False
    exact_work = sizes.key_length_1 * sizes.key_length_2 * sizes.head_dim
    if rank * (sizes.value_dim + sizes.head_dim) >= exact_work:  # per query: features vs pairs
        return False
    if causal and sizes.batch * sizes.heads * sizes.key_length_1 * rank * sizes.value_dim > _AUTO_TAYLOR_STATE:
        return False
    tolerance = _AUTO_TAYLOR_TOLERANCE.get(compute_dtype(q.dtype), 1e-7)
    return taylor_error_bound(q, k1, k2, scale=scale, degree=degree) <= tolerance


def tensor_attention(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                     *, causal: bool = False, scale: float | None = 1.0, degree: int = 8,
                     impl: Literal["auto", "reference", "chunked", "taylor"] = "auto") -> torch.Tensor:
    """Third-order tensor attention: query ``i`` attends to every key pair ``(j1, j2)``.

    Alman & Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention
    to Kronecker Computation", arXiv 2310.04064: ``Att = D^{-1} exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2)``.
    With ``k2`` and ``v2`` all ones it is softmax attention with keys ``k1`` and values ``v1``.

    Args:
        q: queries ``[B, H, N, D]``.
        k1, v1: first keys and values ``[B, H, M1, D]``, ``[B, H, M1, E]``.
        k2, v2: second keys and values ``[B, H, M2, D]``, ``[B, H, M2, E]``.
        causal: (inferred; not in the paper) query ``i`` sees pairs with ``max(j1, j2) <= i + M - N``;
            needs ``M1 == M2 = M >= N``.
        scale: multiplies the scores; default 1 as in the paper's definition (the theory setting
            divides by ``d``: pass ``1 / D``); ``None`` gives ``D ** -0.5``.
        degree: Taylor degree of ``impl="taylor"`` (features ``C(D + degree, degree)``).
        impl: "reference" (exact, O(N M1 M2 D), all scores materialised), "chunked" (exact, the
            same cost over blocks of queries with bounded memory), "taylor" (approximate,
            O(N r E) with ``r = C(D + degree, degree)``; accurate for bounded entries) or "auto":
            "taylor" where it is exact to the working precision, i.e. :func:`taylor_error_bound` of
            these inputs is at most 1e-12 (float64) / 1e-7 (float32, bf16, f16) of ``max|v1 ⊙ v2|``,
            its features cost less than the key pairs (``r (E + D) < M1 M2 D``) and, causal, its
            prefix state ``[B, H, M, r, E]`` stays under 2^26 elements; else "chunked" (exact).

    Returns:
        ``[B, H, N, E]`` in the dtype of q.
    """
    check_impl(impl, IMPLS)
    if impl == "taylor":
        return tensor_attention_taylor(q, k1, k2, v1, v2, causal=causal, scale=scale, degree=degree)
    _check_degree(degree)
    if impl == "reference":
        return tensor_attention_reference(q, k1, k2, v1, v2, causal=causal, scale=scale)
    if impl == "auto":
        sizes = _check_inputs(q, k1, k2, v1, v2)
        if _auto_uses_taylor(q, k1, k2, sizes, causal=causal, scale=scale, degree=degree):
            return tensor_attention_taylor(q, k1, k2, v1, v2, causal=causal, scale=scale, degree=degree)
    return tensor_attention_chunked(q, k1, k2, v1, v2, causal=causal, scale=scale)

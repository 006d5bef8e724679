"""Lightning Attention-1/2: causal linear attention with a per-head exponential decay.

Sources: "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
Models" (Qin et al., arXiv 2401.04658), "TransNormerLLM: A Faster and Better Large Language Model with
Improved TransNormer" (Qin et al., arXiv 2307.14995) and "Various Lengths, Constant Speed: Efficient
Language Modeling with Lightning Attention" (TNL, Qin et al., arXiv 2405.17381).

Per head ``h`` with rate ``s_h >= 0`` and ``lambda_h = exp(-s_h)`` (no softmax, no normaliser)::

    o_t = scale * sum_{j <= t} lambda^(t - j) (q_t . k_j) v_j          (masked form, Lightning-2 eq. 1)
    S_t = lambda S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t           (recurrent form)

Forms here: :func:`lightning_attention_reference` (masked quadratic), :func:`lightning_attention_chunked`
(the Lightning-2 intra/inter-block algorithm), :func:`lightning_attention_recurrent` and
:func:`lightning_attention_step` (one token at a time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from attnlab.ops.alibi import alibi_slopes
from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.validation import (
    Sizes,
    check_bool,
    check_causal,
    check_impl,
    check_int,
    check_qkv,
    check_scale,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "lightning_attention",
    "lightning_attention_reference",
    "lightning_attention_chunked",
    "lightning_attention_recurrent",
    "lightning_attention_step",
    "lightning_decay_slopes",
]

IMPLS = ("auto", "reference", "chunked", "recurrent", "triton")

Decay = float | torch.Tensor | None


# ----------------------------------------------------------------------------------------------------
# segments: long sequences in pieces of bounded working set, the recurrent state carried between them

# Bytes of q, k and v per segment. The chunked forms hold several per-block tensors (scores, block
# states, prefix sums) of the size of their inputs; one segment at a time they stay a few MiB (in cache)
# instead of several times the whole inputs: forward memory O(segment) on top of inputs and output.
SEGMENT_BYTES = 2 << 20


def segment_length(q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> int:
    """Tokens per segment for ``q [B, H, N, D]``, ``v [..., Dv]``: about :data:`SEGMENT_BYTES` of q, k and v,
    a multiple of ``chunk_size`` (so the segments split no block the unsegmented form would keep)."""
    B, H, _, D = q.shape
    per_token = B * H * (2 * D + v.shape[-1]) * torch.finfo(compute_dtype(q.dtype)).bits // 8
    return max(1, SEGMENT_BYTES // max(per_token * chunk_size, 1)) * chunk_size


def scan_segments(step: Callable[[tuple[torch.Tensor | None, ...], Any, int], tuple[torch.Tensor, Any]],
                  inputs: Sequence[torch.Tensor | None], state: Any, *, segment: int) -> tuple[torch.Tensor, Any]:
    """Run ``step(parts, state, start) -> (out, state)`` over consecutive segments of ``segment`` tokens.

    ``inputs`` are ``[B, H, N, *]`` tensors (or ``None``) cut along dim 2; ``parts`` are their rows
    ``[start, start + segment)``; the outputs ``[B, H, n, Dv]`` are joined along dim 2. A recurrent form
    run in pieces equals one run (the state carries everything earlier rows contribute), so this is
    exact up to rounding. Under autograd each segment is checkpointed (its step is recomputed in the
    backward pass from its inputs and incoming state): memory O(segment) in both passes. Without a
    graph the segments write into one output tensor.
    """
    N = next(x for x in inputs if x is not None).shape[2]
    tensors = [x for x in inputs if x is not None]
    if isinstance(state, torch.Tensor):
        tensors.append(state)
    elif isinstance(state, tuple | list):
        tensors.extend(x for x in state if isinstance(x, torch.Tensor))
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    outputs, out = [], None
    # split once: a slice per segment would give each input a full-size gradient per segment in the
    # backward pass (O(N^2 / segment) time)
    pieces = [[None] * -(-N // segment) if x is None else x.split(segment, dim=2) for x in inputs]
    for start, parts in zip(range(0, N, segment), zip(*pieces, strict=True), strict=True):
        if recompute:
            piece, state = checkpoint(step, parts, state, start, use_reentrant=False)
            outputs.append(piece)
            continue
        piece, state = step(parts, state, start)
        if out is None:
            out = piece.new_empty(*piece.shape[:2], N, *piece.shape[3:])  # (B, H, N, Dv)
        out[:, :, start:start + piece.shape[2]] = piece
    if recompute:
        out = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return out, state


# ----------------------------------------------------------------------------------------------------
# checks shared by the linear / recurrent family


def check_decay(decay: Decay, heads: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """``decay`` (the rate ``s_h >= 0``) as a ``[H]`` tensor of ``dtype``, or ``None`` for no decay."""
    if decay is None:
        return None
    if isinstance(decay, bool) or not isinstance(decay, int | float | torch.Tensor):
        raise TypeError(f"decay must be None, a float or a tensor of shape [H={heads}], got {type(decay).__name__}")
    if isinstance(decay, torch.Tensor):
        if not decay.is_floating_point():
            raise TypeError(f"decay must be a floating tensor, got dtype {decay.dtype}")
        if decay.ndim == 0:
            decay = decay.expand(heads)
        if tuple(decay.shape) != (heads,):
            raise ValueError(f"decay must have shape [H] = [{heads}] (one rate per query head), "
                             f"got {tuple(decay.shape)}")
        rates = decay.to(device=device, dtype=dtype)
    else:
        rates = torch.full((heads,), float(decay), device=device, dtype=dtype)
    if not bool(torch.isfinite(rates).all()) or bool((rates < 0).any()):
        raise ValueError(f"decay must be finite rates s_h >= 0 (lambda_h = exp(-s_h)), got min "
                         f"{float(rates.min())} / max {float(rates.max())}")
    return rates


def check_chunk_size(chunk_size: int) -> int:
    return check_int("chunk_size", chunk_size, minimum=1)


def check_state(name: str, state: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A recurrent state tensor of exactly ``shape``."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {list(shape)}, got {type(state).__name__}")
    if not state.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {state.dtype}")
    if tuple(state.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(state.shape)}")
    if state.device != device:
        raise ValueError(f"{name} is on {state.device}, q on {device}")
    return state


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Decay, scale: float | None,
              initial_state: torch.Tensor | None) -> tuple[Sizes, torch.Tensor | None, float]:
    sizes = check_qkv(q, k, v, allow_cross=False)
    scale = check_scale(scale, sizes.head_dim)
    rates = check_decay(decay, sizes.heads, device=q.device, dtype=compute_dtype(q.dtype))
    if initial_state is not None:
        check_state("initial_state", initial_state,
                    (sizes.batch, sizes.heads, sizes.head_dim, sizes.value_dim), q.device)
    return sizes, rates, scale


def _rates(decay: torch.Tensor | None, heads: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(heads, device=device, dtype=dtype) if decay is None else decay.to(dtype)


# ----------------------------------------------------------------------------------------------------
# forms


def lightning_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                                  decay: Decay = None, scale: float | None = 1.0, chunk_size: int = 64,
                                  initial_state: torch.Tensor | None = None, return_state: bool = False,
                                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The masked quadratic form ``O = scale * ((Q K^T) * M) V``, ``M[t, j] = lambda^(t-j)`` for ``j <= t``.

    Lightning Attention-2 (arXiv 2401.04658), eq. 1 / the repo's naive ``linear_attn``; with an initial
    state ``S0`` each output adds ``scale * lambda^(t+1) q_t S0`` and the final state is
    ``lambda^N S0 + sum_j lambda^(N-1-j) k_j^T v_j``. ``chunk_size`` is accepted and ignored.
    Computes in float32 (float64 for float64 inputs); shapes as in :func:`lightning_attention`.
    """
    check_causal(causal, causal_only="lightning attention")
    sizes, rates, scale = _validate(q, k, v, decay, scale, initial_state)
    check_chunk_size(chunk_size)
    dtype = compute_dtype(q.dtype)
    B, H, N, D = q.shape
    qf = q.to(dtype)  # (B, H, N, D)
    kf = expand_kv(k, H).to(dtype)  # (B, H, N, D)
    vf = expand_kv(v, H).to(dtype)  # (B, H, N, Dv)
    s = _rates(rates, H, q.device, dtype)[:, None, None]  # (H, 1, 1)
    t = torch.arange(N, device=q.device, dtype=dtype)
    distance = t[:, None] - t[None, :]  # (N, N): t - j
    mask = torch.where(distance >= 0, torch.exp(-s * distance.clamp_min(0)), torch.zeros((), dtype=dtype,
                                                                                         device=q.device))
    scores = torch.einsum("bhtd,bhjd->bhtj", qf, kf) * mask  # (B, H, N, N)
    out = torch.einsum("bhtj,bhje->bhte", scores, vf)  # (B, H, N, Dv)
    state_weights = torch.exp(-s * (N - 1 - t))  # (H, 1, N): lambda^(N-1-j)
    state = torch.einsum("bhjd,hj,bhje->bhde", kf, state_weights[:, 0], vf)  # (B, H, D, Dv)
    if initial_state is not None:
        s0 = initial_state.to(dtype)
        q_decay = torch.exp(-s * (t + 1)[:, None])  # (H, N, 1): lambda^(t+1)
        out = out + torch.einsum("bhtd,bhde->bhte", qf * q_decay, s0)
        state = state + torch.exp(-s * N) * s0
    out = (out * scale).to(q.dtype)
    return (out, state) if return_state else out


def lightning_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None,
                                scale: float, chunk_size: int, initial_state: torch.Tensor | None,
                                return_state: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Lightning-2 block algorithm (arXiv 2401.04658, Algorithm 1), in segments of ~2 MiB of q, k, v.

    Each segment (:func:`segment_length` tokens, a multiple of ``chunk_size``) runs
    :func:`_lightning_chunked_segment` from the state the previous one returned (:func:`scan_segments`):
    the same blocks and the same result as one call, with the forward memory of one segment on top of
    the inputs and the output. Same contract as :func:`_lightning_chunked_segment`.
    """
    segment = segment_length(q, v, min(chunk_size, q.shape[2]))
    if q.shape[2] <= segment:
        return _lightning_chunked_segment(q, k, v, decay=decay, scale=scale, chunk_size=chunk_size,
                                          initial_state=initial_state, return_state=return_state)

    def step(parts: tuple, state: torch.Tensor | None, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _lightning_chunked_segment(*parts, decay=decay, scale=scale, chunk_size=chunk_size,
                                          initial_state=state, return_state=True)

    out, state = scan_segments(step, (q, k, v), initial_state, segment=segment)
    return (out, state) if return_state else out


def _lightning_chunked_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, decay: torch.Tensor | None,
                               scale: float, chunk_size: int, initial_state: torch.Tensor | None,
                               return_state: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Lightning-2 block algorithm (arXiv 2401.04658, Algorithm 1 / the ``_fwd_kernel`` of the repo).

    For block ``b`` (rows ``[start, start + m)``, local indices ``i, j``) with running state
    ``KV = S_{start-1}``::

        O_intra = ((Q_b K_b^T) * D) V_b,  D[i, j] = lambda^(i-j) for i >= j
        O_inter = diag(lambda^(i+1)) Q_b KV
        KV     <- lambda^m KV + (diag(lambda^(m-1-j)) K_b)^T V_b

    O(N * chunk_size * D + N * D * Dv) time. This is the fast-path contract a kernel shares: inputs are
    already validated by :func:`lightning_attention` (``q [B, H, N, D]``, ``k, v [B, H_kv, N, D|Dv]`` in
    their own dtype, ``decay`` ``None`` or a float ``[H]`` tensor of rates, ``scale`` a float,
    ``initial_state`` ``None`` or ``[B, H, D, Dv]``). Returns the output in q's dtype (and the final
    state in float32, float64 for float64 inputs).
    """
    dtype = compute_dtype(q.dtype)
    B, H, N, D = q.shape
    C = min(chunk_size, N)  # a chunk longer than the sequence is one chunk of N rows
    chunks = math.ceil(N / C)
    pad = chunks * C - N
    m_last = N - (chunks - 1) * C

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (B, H, N, X) -> (B, H, chunks, C, X), zero padded
        x = torch.nn.functional.pad(expand_kv(x, H).to(dtype), (0, 0, 0, pad))
        return rearrange(x, "b h (c t) x -> b h c t x", t=C)

    qc, kc, vc = blocks(q), blocks(k), blocks(v)  # (B, H, c, C, D|Dv)
    s = _rates(decay, H, q.device, dtype)[:, None]  # (H, 1)
    i = torch.arange(C, device=q.device, dtype=dtype)
    zero = torch.zeros((), device=q.device, dtype=dtype)
    distance = i[:, None] - i[None, :]  # (C, C)
    intra_mask = torch.where(distance >= 0, torch.exp(-s[:, :, None] * distance.clamp_min(0)), zero)  # (H, C, C)
    scores = torch.einsum("bhcid,bhcjd->bhcij", qc, kc) * intra_mask[:, None]  # (B, H, c, C, C)
    out = torch.einsum("bhcij,bhcje->bhcie", scores, vc)  # (B, H, c, C, Dv)

    # what each full block adds to the state, decayed to the block's last row: (diag(lambda^(C-1-j)) K_b)^T V_b
    k_decay = torch.exp(-s * (C - 1 - i))  # (H, C)
    block_kv = torch.einsum("bhcjd,hj,bhcje->bhcde", kc, k_decay, vc)  # (B, H, c, D, Dv)
    Dv = v.shape[-1]
    state = (torch.zeros(B, H, D, Dv, device=q.device, dtype=dtype) if initial_state is None
             else initial_state.to(dtype))
    if decay is None:  # lambda = 1: the states before each block are an exclusive prefix sum
        before = torch.cumsum(block_kv, dim=2) - block_kv + state[:, :, None]  # (B, H, c, D, Dv)
    else:
        block_decay = torch.exp(-s[:, 0] * C)[None, :, None, None]  # (1, H, 1, 1): lambda^C
        states = []
        for kv in block_kv.unbind(dim=2):  # one unbind: indexing in the loop would cost O(chunks^2) backward
            states.append(state)
            state = block_decay * state + kv
        before = torch.stack(states, dim=2)  # (B, H, c, D, Dv)
    q_decay = torch.exp(-s * (i + 1))  # (H, C): lambda^(i+1)
    out = out + torch.einsum("bhcid,hi,bhcde->bhcie", qc, q_decay, before)
    out = rearrange(out, "b h c t e -> b h (c t) e")[:, :, :N] * scale
    out = out.to(q.dtype)
    if not return_state:
        return out
    # final state from the state before the last (possibly partial) block: exact, no padding involved
    j = i[:m_last]
    last_decay = torch.exp(-s * (m_last - 1 - j))  # (H, m)
    final = (torch.exp(-s[:, 0] * m_last)[None, :, None, None] * before[:, :, -1]
             + torch.einsum("bhjd,hj,bhje->bhde", kc[:, :, -1, :m_last], last_decay, vc[:, :, -1, :m_last]))
    return out, final


def lightning_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                  decay: torch.Tensor | None, scale: float, chunk_size: int = 64,
                                  initial_state: torch.Tensor | None = None, return_state: bool = False,
                                  ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token by token: ``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t`` (O(N D Dv), a Python loop).

    Lightning Attention-2 (arXiv 2401.04658), the recurrence of eq. 2. Same contract as
    :func:`lightning_attention_chunked` (``chunk_size`` ignored).
    """
    H = q.shape[1]
    state = initial_state
    outs = []
    for qt, kt, vt in zip(q.split(1, dim=2), k.split(1, dim=2), v.split(1, dim=2), strict=True):
        o, state = _step(qt, kt, vt, state, decay, scale, H)
        outs.append(o)
    out = torch.cat(outs, dim=2)
    return (out, state) if return_state else out


def _step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None,
          decay: torch.Tensor | None, scale: float, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(q.dtype)
    kv = torch.einsum("bhd,bhe->bhde", expand_kv(k, heads)[:, :, 0].to(dtype),
                      expand_kv(v, heads)[:, :, 0].to(dtype))  # (B, H, D, Dv)
    if state is None:
        state = kv
    else:
        lam = 1.0 if decay is None else torch.exp(-decay.to(dtype))[None, :, None, None]
        state = lam * state.to(dtype) + kv
    out = torch.einsum("bhd,bhde->bhe", q[:, :, 0].to(dtype), state)[:, :, None] * scale  # (B, H, 1, Dv)
    return out.to(q.dtype), state


def lightning_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None,
                             *, decay: Decay = None, scale: float | None = 1.0,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one token: ``S = lambda S + k^T v``, ``o = scale * q S``.

    Args:
        q: ``[B, H, 1, D]``; k: ``[B, H_kv, 1, D]``; v: ``[B, H_kv, 1, Dv]`` (one new token).
        state: ``[B, H, D, Dv]`` from the previous step (or ``return_state=True``), ``None`` at the start.
        decay, scale: as in :func:`lightning_attention`.

    Returns:
        ``(o [B, H, 1, Dv], new_state [B, H, D, Dv])``. Calling it N times equals one
        ``lightning_attention(..., return_state=True)`` call (Lightning Attention-2, arXiv 2401.04658, eq. 2).
    """
    sizes, rates, scale = _validate(q, k, v, decay, scale, state)
    if sizes.length != 1:
        raise ValueError(f"lightning_attention_step takes one token: q must have N=1, got N={sizes.length}")
    return _step(q, k, v, state, rates, scale, sizes.heads)


@nonfinite_guarded
def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        decay: Decay = None, scale: float | None = 1.0, chunk_size: int = 64,
                        initial_state: torch.Tensor | None = None, return_state: bool = False,
                        impl: Literal["auto", "reference", "chunked", "recurrent", "triton"] = "auto",
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Lightning attention (causal only): ``o_t = scale * sum_{j<=t} lambda_h^(t-j) (q_t . k_j) v_j``.

    "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models"
    (arXiv 2401.04658), eqs. 1-2 and Algorithm 1; the TransNormerLLM decay (arXiv 2307.14995).

    Args:
        q: queries ``[B, H, N, D]``.
        k: keys ``[B, H_kv, N, D]`` (``H_kv`` divides ``H``; query head ``h`` reads head ``h // (H // H_kv)``).
        v: values ``[B, H_kv, N, Dv]``.
        causal: must be True (lightning attention is causal only).
        decay: ``None`` (no decay, ``lambda = 1``) or the per-head rate ``s_h >= 0``: a float or a tensor
            ``[H]``; ``lambda_h = exp(-s_h)``. :func:`lightning_decay_slopes` gives the paper's schedule.
        scale: multiplies ``q . k`` (default 1.0, as in the paper: no ``1/sqrt(d)``; ``None`` means ``D**-0.5``).
        chunk_size: block length of the chunked form (the repo's Triton kernel uses 64).
        initial_state: ``S0 [B, H, D, Dv]``; the first step is ``S_0 = lambda S0 + k_0^T v_0``.
        return_state: also return the final state ``S_{N-1} [B, H, D, Dv]`` (float32; float64 for float64).
        impl: "chunked" (the block algorithm), "recurrent" (token loop), "reference" (masked form) or
            "triton" (the kernels of :mod:`attnlab.kernels.lightning`: CUDA, or CPU under
            ``TRITON_INTERPRET=1``). "auto" runs "triton" on CUDA devices and "chunked" elsewhere.

    Returns:
        ``o [B, H, N, Dv]`` in q's dtype, or ``(o, final_state)`` with ``return_state=True``. Running a
        sequence in two pieces (the second with ``initial_state=`` the first's state) gives the outputs
        of one run.
    """
    check_causal(causal, causal_only="lightning attention")
    check_impl(impl, IMPLS)
    check_bool("return_state", return_state)
    if impl == "reference":
        return lightning_attention_reference(q, k, v, decay=decay, scale=scale, chunk_size=chunk_size,
                                             initial_state=initial_state, return_state=return_state)
    _, rates, scale = _validate(q, k, v, decay, scale, initial_state)
    chunk_size = check_chunk_size(chunk_size)
    if impl == "triton" or (impl == "auto" and q.is_cuda):
        from attnlab.kernels.lightning import lightning_attention_triton, triton_runs_on

        if impl == "triton" or triton_runs_on(q):
            return lightning_attention_triton(q, k, v, decay=rates, scale=scale, chunk_size=chunk_size,
                                              initial_state=initial_state, return_state=return_state)
    form = lightning_attention_recurrent if impl == "recurrent" else lightning_attention_chunked
    return form(q, k, v, decay=rates, scale=scale, chunk_size=chunk_size, initial_state=initial_state,
                return_state=return_state)


# ----------------------------------------------------------------------------------------------------
# decay schedule


def lightning_decay_slopes(heads: int, *, layer_idx: int = 0, num_layers: int = 1) -> torch.Tensor:
    """The per-head decay rates ``s_h`` of TransNormerLLM / TNL for layer ``layer_idx`` of ``num_layers``.

    ALiBi slopes ``s_h = 2^(-8 (h+1) / H)`` for ``H`` a power of two (other ``H``: the slopes of the
    closest lower power of two ``P`` followed by every other slope of ``2P``), scaled per layer by
    ``1 - l / (L - 1) + 1e-5`` (first layer strongest decay, last nearly none). TransNormerLLM
    (arXiv 2307.14995), "Lightning Attention" section; ``_build_slope_tensor`` of the lightning-attention
    repo. ``num_layers = 1`` (division by zero in the original) uses the factor ``1 + 1e-5``.

    Returns:
        float32 tensor ``[H]`` of rates, to pass as ``decay=``.
    """
    for name, value in (("heads", heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got heads={heads}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got num_layers={num_layers}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, num_layers={num_layers}), got layer_idx={layer_idx}")
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    return alibi_slopes(heads, dtype=torch.float32) * (1 - depth + 1e-5)


register(Mechanism(
    name="lightning",
    op=lightning_attention,
    reference=lightning_attention_reference,
    layer=None,
    family="linear",
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
    arxiv="2401.04658",
    supports_causal=True,
    supports_bidirectional=False,
    supports_gqa=True,
    complexity="O(N d^2) (chunked: O(N C d + N d^2))",
    impl_devices={"triton": ("cuda", "triton-interpreter")},
    # the benchmark runs the paper's per-head decay schedule (TransNormerLLM's ALiBi slopes)
    bench_options=lambda shape: {"decay": lightning_decay_slopes(shape.heads).to(shape.device)},
    check=CheckConfig(
        options={"decay": 0.3, "chunk_size": 4},
        bf16_options={"decay": 0.01, "chunk_size": 64},
    ),
    state_size=lambda heads, head_dim, value_dim: heads * head_dim * value_dim,
))

"""Triton kernels for causal lightning (linear) attention with per-head exponential decay.

"Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language
Models" (Qin et al., arXiv 2401.04658), Algorithm 1 (forward) and Algorithm 2 (backward), with the
per-head decay of "TransNormerLLM" (arXiv 2307.14995), eq. 10. For every batch element and head,
with ``lambda = exp(-s)``:

    S_t = lambda S_{t-1} + k_t^T v_t          (S_{-1} = initial_state, default 0), state [D, Dv]
    o_t = scale * q_t S_t                      = sum_{j<=t} lambda^(t-j) (scale q_t . k_j) v_j
                                                 + scale lambda^(t+1) q_t S_{-1}

The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the intra part is the
masked quadratic form ``((Q K^T) * D) V`` with ``D[i, j] = lambda^(i-j)`` for ``i >= j``; the inter
part is ``diag(lambda^(i+1)) Q S`` with ``S`` the state before the chunk, which is then carried
over by ``S <- lambda^m S + (diag(lambda^(m-1-j)) K)^T V`` (``m`` = tokens in the chunk).

One Triton kernel (:func:`_chunk_scan_kernel`) does this scan for one (batch, head, segment,
value tile). Long sequences with few heads are cut into segments that run in parallel: a first
launch of the same kernel computes each segment's own state (no outputs), a small scan in PyTorch
(:func:`_segment_initial_states`) turns those into each segment's initial state, and a second
launch computes the outputs. The backward pass is three more scans of the same kernel: ``dq`` is
the forward scan of ``(dO, V, K)``; ``dk`` and ``dv`` are scans that run backwards in time over
``(V, dO, Q)`` and ``(K, Q, dO)``; the gradient of the decay rates follows from those
(:func:`_decay_rate_grad`).

All products accumulate in float32. For 16-bit inputs the float32 intermediates that feed a
tensor-core product (the masked intra-chunk scores, the state, the decayed values of the state
update) can be split into a high and a low 16-bit part (two products instead of one), which keeps
the relative error at the 16-bit rounding of the output; ``TUNING["precise"]`` picks which (bits,
see :func:`_precision_bits`; docs/kernels.md has the measured trade-off).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

__all__ = ["lightning_attention_triton", "linear_attention_triton", "triton_runs_on", "triton_available"]

try:  # triton is an optional dependency at import time: CPU-only users may not have it.
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as error:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = error


def triton_available() -> bool:
    """Whether the ``triton`` package imported."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device.

    True for CUDA tensors when triton is installed, and for CPU tensors when ``TRITON_INTERPRET=1``
    was set before triton was imported (the interpreter runs the kernels with numpy).
    """
    if triton is None:
        return False
    if tensor.device.type == "cuda":
        return not _interpreting()
    return tensor.device.type == "cpu" and _interpreting()


if triton is not None:

    @triton.jit
    def _split_hi_lo(x, DTYPE: tl.constexpr):
        hi = x.to(DTYPE)
        lo = (x - hi.to(x.dtype)).to(DTYPE)
        return hi, lo

    @triton.jit
    def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the interpreter stores bfloat16 as raw uint16 bits and cannot multiply them, so
        # the (exact) float32 values go to the product instead; on GPUs this is False.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    @triton.jit
    def _chunk_scan_kernel(
        Q, K, V, O, S0, SN, RATE,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
        s0_b, s0_h, s0_s, sn_b, sn_h, sn_s,
        gq, gk, gv, H, N, seg_len, scale,
        DK: tl.constexpr, DV: tl.constexpr,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        REVERSE: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, S0_SHIFT: tl.constexpr,
        STORE_O: tl.constexpr, STORE_SN: tl.constexpr, SCALE_OUT: tl.constexpr,
        PRECISE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """One (value tile, segment, batch*head) of the chunked scan.

        Rows are visited in "scan order": position p of the scan is token p (forward) or token
        N-1-p (REVERSE). Q [B, H/gq, N, DK], K [B, H/gk, N, DK], V [B, H/gv, N, DV] -> O [B, H, N, DV].
        S0 / SN hold one float32 [DK, DV] state per (b, h, segment). S0_SHIFT: the initial state of
        segment 0 enters one step later (lambda^p instead of lambda^(p+1)), as the final-state
        gradient does in the backward scans. SCALE_OUT: scale multiplies the output (q . S_t);
        else it multiplies the key side (k_t^T v_t) and leaves S0 unscaled.
        """
        i_v = tl.program_id(0)
        i_s = tl.program_id(1)
        i_bh = tl.program_id(2)
        i_b = i_bh // H
        i_h = i_bh % H
        q_base = Q + i_b * sq_b + (i_h // gq) * sq_h
        k_base = K + i_b * sk_b + (i_h // gk) * sk_h
        v_base = V + i_b * sv_b + (i_h // gv) * sv_h
        o_base = O + i_b * so_b + i_h * so_h

        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_k = offs_k < DK
        mask_v = offs_v < DV

        if HAS_DECAY:
            rate = tl.load(RATE + i_h).to(ACC)
        else:
            rate = 0.0
        # decay inside a full chunk: lambda^(i-j) for i >= j, else 0         # (BT, BT)
        diff = (offs_t[:, None] - offs_t[None, :]).to(ACC)
        causal = offs_t[:, None] >= offs_t[None, :]
        if HAS_DECAY:
            intra_decay = tl.where(causal, tl.exp(-rate * tl.where(causal, diff, 0.0)), 0.0)
            q_decay = tl.exp(-rate * (offs_t + 1).to(ACC))           # (BT,)
        else:
            intra_decay = tl.where(causal, 1.0, 0.0)
            q_decay = tl.full((BT,), 1.0, ACC)

        state = tl.zeros((BK, BV), dtype=ACC)                       # (DK, DV)
        if HAS_S0:
            s0_ptr = S0 + i_b * s0_b + i_h * s0_h + i_s * s0_s
            state = tl.load(s0_ptr + offs_k[:, None] * DV + offs_v[None, :],
                            mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(ACC)
        if S0_SHIFT:
            first_shift = (i_s == 0).to(ACC)
        else:
            first_shift = (i_s * 0).to(ACC)

        seg_start = i_s * seg_len
        seg_end = tl.minimum(seg_start + seg_len, N)
        for p0 in range(seg_start, seg_end, BT):
            pos = p0 + offs_t                                                 # scan positions
            valid = pos < seg_end
            if REVERSE:
                rows = N - 1 - pos
            else:
                rows = pos
            m = tl.minimum(seg_end - p0, BT)
            k = tl.load(k_base + rows[:, None] * sk_n + offs_k[None, :],
                        mask=valid[:, None] & mask_k[None, :], other=0.0)     # (BT, DK)
            v = tl.load(v_base + rows[:, None] * sv_n + offs_v[None, :],
                        mask=valid[:, None] & mask_v[None, :], other=0.0)     # (BT, BV)
            if STORE_O:
                q = tl.load(q_base + rows[:, None] * sq_n + offs_k[None, :],
                            mask=valid[:, None] & mask_k[None, :], other=0.0)  # (BT, DK)
                scores = _mma(q, tl.trans(k), None, DOT_PRECISION, ACC, UPCAST)  # (BT, BT)
                scores = scores * intra_decay
                if not SCALE_OUT:
                    scores = scores * scale
                if PRECISE & 1:
                    s_hi, s_lo = _split_hi_lo(scores, v.dtype)
                    out = _mma(s_hi, v, None, DOT_PRECISION, ACC, UPCAST)
                    out = _mma(s_lo, v, out, DOT_PRECISION, ACC, UPCAST)
                else:
                    out = _mma(scores.to(v.dtype), v, None, DOT_PRECISION, ACC, UPCAST)
                if PRECISE & 2:
                    st_hi, st_lo = _split_hi_lo(state, q.dtype)
                    inter = _mma(q, st_hi, None, DOT_PRECISION, ACC, UPCAST)
                    inter = _mma(q, st_lo, inter, DOT_PRECISION, ACC, UPCAST)
                else:
                    inter = _mma(q, state.to(q.dtype), None, DOT_PRECISION, ACC, UPCAST)
                qd = q_decay
                if S0_SHIFT:
                    if HAS_DECAY:
                        qd = q_decay * tl.exp(rate * first_shift)
                out = out + inter * qd[:, None]
                if SCALE_OUT:
                    out = out * scale
                tl.store(o_base + rows[:, None] * so_n + offs_v[None, :], out.to(O.dtype.element_ty),
                         mask=valid[:, None] & mask_v[None, :])
            # carry the state over the chunk: S <- lambda^m S + K^T (lambda^(m-1-j) v_j); the decay
            # (and the key-side scale) multiply the value rows, the smaller tile when BV <= DK
            if HAS_DECAY:
                state = state * tl.exp(-rate * (m.to(ACC) - first_shift))
                v_decay = tl.where(valid, tl.exp(-rate * tl.where(valid, (m - 1 - offs_t).to(ACC), 0.0)), 0.0)
                if not SCALE_OUT:
                    v_decay = v_decay * scale
                vv = v.to(ACC) * v_decay[:, None]                                     # (BT, BV)
                if PRECISE & 4:
                    vv_hi, vv_lo = _split_hi_lo(vv, v.dtype)
                    state = _mma(tl.trans(k), vv_hi, state, DOT_PRECISION, ACC, UPCAST)
                    state = _mma(tl.trans(k), vv_lo, state, DOT_PRECISION, ACC, UPCAST)
                else:
                    state = _mma(tl.trans(k), vv.to(v.dtype), state, DOT_PRECISION, ACC, UPCAST)
            else:
                if SCALE_OUT:
                    state = _mma(tl.trans(k), v, state, DOT_PRECISION, ACC, UPCAST)
                else:
                    vv = v.to(ACC) * scale
                    if PRECISE & 4:
                        vv_hi, vv_lo = _split_hi_lo(vv, v.dtype)
                        state = _mma(tl.trans(k), vv_hi, state, DOT_PRECISION, ACC, UPCAST)
                        state = _mma(tl.trans(k), vv_lo, state, DOT_PRECISION, ACC, UPCAST)
                    else:
                        state = _mma(tl.trans(k), vv.to(v.dtype), state, DOT_PRECISION, ACC, UPCAST)
            first_shift = first_shift * 0.0
        if STORE_SN:
            sn_ptr = SN + i_b * sn_b + i_h * sn_h + i_s * sn_s
            tl.store(sn_ptr + offs_k[:, None] * DV + offs_v[None, :], state,
                     mask=mask_k[:, None] & mask_v[None, :])


    @triton.jit
    def _dkdv_scan_kernel(
        Q, K, V, DO, DK, DV, R0, RN, RATE,
        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
        sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, r0_b, r0_h, r0_s, rn_b, rn_h, rn_s,
        gq, gk, gv, H, N, seg_len, scale,
        DQK: tl.constexpr, DVV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        HAS_DECAY: tl.constexpr, HAS_R0: tl.constexpr, STORE_RN: tl.constexpr,
        PRECISE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """dK and dV in one backward-in-time scan (one (segment, batch*head); BV covers all of Dv).

        In scan order p = N-1-t (token t), with R the state of the backward recurrence
        R_j = lambda R_{j+1} + scale q_j^T dO_j (R0 = dS_N, entering one step later):
        dv_j = sum_{t>=j} lambda^(t-j) scale (k_j . q_t) dO_t + lambda^(..) k_j R,
        dk_j = sum_{t>=j} lambda^(t-j) scale (v_j . dO_t) q_t + lambda^(..) v_j R^T.
        """
        i_s = tl.program_id(0)
        i_bh = tl.program_id(1)
        i_b = i_bh // H
        i_h = i_bh % H
        q_base = Q + i_b * sq_b + (i_h // gq) * sq_h
        k_base = K + i_b * sk_b + (i_h // gk) * sk_h
        v_base = V + i_b * sv_b + (i_h // gv) * sv_h
        do_base = DO + i_b * sdo_b + i_h * sdo_h
        dk_base = DK + i_b * sdk_b + i_h * sdk_h
        dv_base = DV + i_b * sdv_b + i_h * sdv_h

        offs_t = tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        offs_v = tl.arange(0, BV)
        mask_k = offs_k < DQK
        mask_v = offs_v < DVV
        if HAS_DECAY:
            rate = tl.load(RATE + i_h).to(ACC)
        else:
            rate = 0.0
        diff = (offs_t[:, None] - offs_t[None, :]).to(ACC)
        causal = offs_t[:, None] >= offs_t[None, :]
        if HAS_DECAY:
            intra_decay = tl.where(causal, tl.exp(-rate * tl.where(causal, diff, 0.0)), 0.0) * scale
            row_decay = tl.exp(-rate * (offs_t + 1).to(ACC))
        else:
            intra_decay = tl.where(causal, 1.0, 0.0).to(ACC) * scale
            row_decay = tl.full((BT,), 1.0, ACC)

        state = tl.zeros((BK, BV), dtype=ACC)                                   # R: (DK, DV)
        if HAS_R0:
            r0_ptr = R0 + i_b * r0_b + i_h * r0_h + i_s * r0_s
            state = tl.load(r0_ptr + offs_k[:, None] * DVV + offs_v[None, :],
                            mask=mask_k[:, None] & mask_v[None, :], other=0.0).to(ACC)
        first_shift = (i_s == 0).to(ACC)

        seg_start = i_s * seg_len
        seg_end = tl.minimum(seg_start + seg_len, N)
        for p0 in range(seg_start, seg_end, BT):
            pos = p0 + offs_t
            valid = pos < seg_end
            rows = N - 1 - pos
            m = tl.minimum(seg_end - p0, BT)
            qk_mask = valid[:, None] & mask_k[None, :]
            vv_mask = valid[:, None] & mask_v[None, :]
            q = tl.load(q_base + rows[:, None] * sq_n + offs_k[None, :], mask=qk_mask, other=0.0)
            k = tl.load(k_base + rows[:, None] * sk_n + offs_k[None, :], mask=qk_mask, other=0.0)
            v = tl.load(v_base + rows[:, None] * sv_n + offs_v[None, :], mask=vv_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdo_n + offs_v[None, :], mask=vv_mask, other=0.0)
            rd = row_decay
            if HAS_DECAY:
                rd = row_decay * tl.exp(rate * first_shift)
            if PRECISE & 2:
                r_hi, r_lo = _split_hi_lo(state, q.dtype)
            else:
                r_hi = state.to(q.dtype)
            # dv = (scale K Q^T * D) dO + diag(rd) K R
            a1 = _mma(k, tl.trans(q), None, DOT_PRECISION, ACC, UPCAST) * intra_decay     # (BT, BT)
            if PRECISE & 1:
                a_hi, a_lo = _split_hi_lo(a1, q.dtype)
                dv = _mma(a_hi, do, None, DOT_PRECISION, ACC, UPCAST)
                dv = _mma(a_lo, do, dv, DOT_PRECISION, ACC, UPCAST)
            else:
                dv = _mma(a1.to(q.dtype), do, None, DOT_PRECISION, ACC, UPCAST)
            inter = _mma(k, r_hi, None, DOT_PRECISION, ACC, UPCAST)
            if PRECISE & 2:
                inter = _mma(k, r_lo, inter, DOT_PRECISION, ACC, UPCAST)
            dv = dv + inter * rd[:, None]
            tl.store(dv_base + rows[:, None] * sdv_n + offs_v[None, :], dv.to(DV.dtype.element_ty), mask=vv_mask)
            # dk = (scale V dO^T * D) Q + diag(rd) V R^T
            a2 = _mma(v, tl.trans(do), None, DOT_PRECISION, ACC, UPCAST) * intra_decay    # (BT, BT)
            if PRECISE & 1:
                a_hi, a_lo = _split_hi_lo(a2, q.dtype)
                dk = _mma(a_hi, q, None, DOT_PRECISION, ACC, UPCAST)
                dk = _mma(a_lo, q, dk, DOT_PRECISION, ACC, UPCAST)
            else:
                dk = _mma(a2.to(q.dtype), q, None, DOT_PRECISION, ACC, UPCAST)
            inter = _mma(v, tl.trans(r_hi), None, DOT_PRECISION, ACC, UPCAST)
            if PRECISE & 2:
                inter = _mma(v, tl.trans(r_lo), inter, DOT_PRECISION, ACC, UPCAST)
            dk = dk + inter * rd[:, None]
            tl.store(dk_base + rows[:, None] * sdk_n + offs_k[None, :], dk.to(DK.dtype.element_ty), mask=qk_mask)
            # R <- lambda^m R + Q^T (scale lambda^(m-1-c) dO_c)
            if HAS_DECAY:
                state = state * tl.exp(-rate * (m.to(ACC) - first_shift))
                w = tl.where(valid, tl.exp(-rate * tl.where(valid, (m - 1 - offs_t).to(ACC), 0.0)), 0.0) * scale
            else:
                w = tl.where(valid, 1.0, 0.0).to(ACC) * scale
            ww = do.to(ACC) * w[:, None]                                               # (BT, DV)
            if PRECISE & 4:
                w_hi, w_lo = _split_hi_lo(ww, q.dtype)
                state = _mma(tl.trans(q), w_hi, state, DOT_PRECISION, ACC, UPCAST)
                state = _mma(tl.trans(q), w_lo, state, DOT_PRECISION, ACC, UPCAST)
            else:
                state = _mma(tl.trans(q), ww.to(q.dtype), state, DOT_PRECISION, ACC, UPCAST)
            first_shift = first_shift * 0.0
        if STORE_RN:
            rn_ptr = RN + i_b * rn_b + i_h * rn_h + i_s * rn_s
            tl.store(rn_ptr + offs_k[:, None] * DVV + offs_v[None, :], state,
                     mask=mask_k[:, None] & mask_v[None, :])

# ----------------------------------------------------------------------------------------------
# host side: launch configuration, segments, the scan as a function of tensors
# ----------------------------------------------------------------------------------------------

#: Launch settings; None means the default measured best on an H200 (docs/kernels.md, run of
#: 2026-11-28 20:31 UTC), and ``scripts/gpu_kernels.py`` overrides them to compare variants.
#: block_v: value columns per program (None: 128 for 16-bit inputs with D <= 128, else 64, and 32
#: for D > 128). precise: bits of :func:`_precision_bits` (None: 5 for the forward and the
#: backward, 7 in the backward when the decay rates need a gradient). fused_bwd: dK and dV in one
#: backward scan (None: for 16-bit inputs with D, Dv <= 128). segments_per_wave: None picks the
#: number of sequence segments by :func:`_fewest_steps`; an int aims at that many programs per
#: multiprocessor (the rule of the measured runs, which used 4).
TUNING: dict[str, object] = {
    "block_v": None,
    "num_warps": None,
    "num_stages": 2,
    "segments_per_wave": None,
    "precise": None,
    "fused_bwd": None,
}

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _precision_bits(dtype: torch.dtype, override: int | None = None) -> int:
    """Which float32 intermediates are split into high + low 16-bit parts (bit 1: the masked scores,
    bit 2: the state, bit 4: the decayed values of the state update); 16-bit inputs only."""
    if dtype not in _SIXTEEN_BIT:
        return 0
    if override is not None:
        return int(override)
    bits = TUNING["precise"]
    return 5 if bits is None else int(bits)


def _block_v(dtype: torch.dtype, block_k: int, value_dim: int) -> int:
    chosen = TUNING["block_v"]
    if chosen:
        width = int(chosen)
    elif block_k > 128:
        width = 32
    elif dtype in _SIXTEEN_BIT:
        width = 128
    else:
        width = 64
    return max(16, min(_next_pow2(value_dim), width))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs: three tf32 passes (~float32 accuracy on the tensor cores); others ignore it.
    if dtype == torch.float32:
        return "tf32x3"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _plan_segments(programs: int, length: int, chunk: int, device: torch.device,
                   segments: int | None) -> tuple[int, int]:
    """Return ``(n_seg, seg_len)``: how many parallel segments the sequence is cut into."""
    n_chunks = -(-length // chunk)
    if segments is None:
        per_wave = TUNING["segments_per_wave"]
        sms = _multiprocessors(device)
        if per_wave is not None:
            target = int(per_wave) * sms
            segments = max(1, -(-target // programs)) if programs < target else 1
        else:
            segments = _fewest_steps(programs, n_chunks, sms)
    segments = max(1, min(int(segments), n_chunks))
    seg_len = -(-n_chunks // segments) * chunk
    return -(-length // seg_len), seg_len


@functools.lru_cache(maxsize=256)
def _fewest_steps(programs: int, n_chunks: int, multiprocessors: int) -> int:
    """Segments per sequence that minimise the sequential chunk steps per multiprocessor.

    One program runs per multiprocessor at a time (255 registers x 256 threads), and its chunk
    loop is latency-bound, so the time goes as (waves of programs) x (chunks per segment). Cutting
    the sequence costs a states-only pass and a small scan, about 35 % more (fitted to the run
    of 2026-11-28). Ties go to about four programs per multiprocessor (the best measured).
    """
    best: tuple[float, int, int] | None = None
    for n in range(1, n_chunks + 1):
        waves = -(-programs * n // multiprocessors)
        cost = waves * -(-n_chunks // n) * (1.35 if n > 1 else 1.0)
        key = (round(cost, 6), abs(programs * n - 4 * multiprocessors), n)
        if best is None or key < best:
            best = key
        if programs * n > 16 * multiprocessors:
            break
    return best[2]


def _scan(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, heads: int, rate: torch.Tensor | None,
          scale: float, s0: torch.Tensor | None, reverse: bool, s0_shift: bool, scale_out: bool,
          out_dtype: torch.dtype | None, need_final: bool, chunk: int, segments: int | None,
          plan: tuple[int, int] | None = None, only_inits: bool = False, bits: int | None = None,
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """out_p = [scale] * (a_p S_p), S_p = lambda S_{p-1} + [scale] b_p^T c_p, in scan order.

    a [B, H/ga, N, DK], b [B, H/gb, N, DK], c [B, H/gc, N, DV]; s0 [B, H, DK, DV] float or None.
    Returns (out [B, H, N, DV] or None, final state [B, H, DK, DV] or None).
    """
    B, _, N, DK = a.shape
    DV = c.shape[-1]
    H = heads
    acc = _acc_dtype(a.dtype)
    BK = max(16, _next_pow2(DK))
    BV = _block_v(a.dtype, BK, DV)
    NV = -(-DV // BV)
    n_seg, seg_len = plan if plan is not None else _plan_segments(B * H * NV, N, chunk, a.device, segments)
    precise = _precision_bits(a.dtype, bits)
    num_warps = TUNING["num_warps"] or (8 if BK * BV >= 128 * 64 else 4)
    rate_arg = rate if rate is not None else torch.empty(1, device=a.device, dtype=acc)
    common = dict(
        gq=H // a.shape[1], gk=H // b.shape[1], gv=H // c.shape[1], H=H, N=N, seg_len=seg_len,
        scale=float(scale), DK=DK, DV=DV, BT=chunk, BK=BK, BV=BV, REVERSE=reverse,
        HAS_DECAY=rate is not None, SCALE_OUT=scale_out, PRECISE=precise,
        DOT_PRECISION=_dot_precision(a.dtype), ACC=_tl_dtype(acc),
        UPCAST=_interpreting() and a.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=int(TUNING["num_stages"]),
    )
    grid = (NV, n_seg, B * H)
    dummy = torch.empty(1, device=a.device, dtype=acc)

    def launch(out, init, init_strides, final, store_o, shift):
        out_ = out if out is not None else dummy
        fin = final if final is not None else dummy
        _chunk_scan_kernel[grid](
            a, b, c, out_, init if init is not None else dummy, fin, rate_arg,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            c.stride(0), c.stride(1), c.stride(2),
            out_.stride(0) if out is not None else 0, out_.stride(1) if out is not None else 0,
            out_.stride(2) if out is not None else 0,
            *init_strides,
            fin.stride(0) if final is not None else 0, fin.stride(1) if final is not None else 0,
            fin.stride(2) if final is not None else 0,
            HAS_S0=init is not None, S0_SHIFT=shift, STORE_O=store_o, STORE_SN=final is not None,
            **common,
        )

    out = None if only_inits else torch.empty(B, H, N, DV, device=a.device, dtype=out_dtype or a.dtype)
    if n_seg == 1:
        final = torch.empty(B, H, 1, DK, DV, device=a.device, dtype=acc) if need_final else None
        init = s0.to(acc).contiguous() if s0 is not None else None
        init_strides = (init.stride(0), init.stride(1), 0) if init is not None else (0, 0, 0)
        launch(out, init, init_strides, final, True, s0_shift and init is not None)
        return out, (final[:, :, 0] if final is not None else None)

    # 1) each segment's own state, 2) a scan over segments, 3) the outputs from those states.
    local = torch.empty(B, H, n_seg, DK, DV, device=a.device, dtype=acc)
    launch(None, None, (0, 0, 0), local, False, False)
    inits, final = _segment_initial_states(local, s0, rate, seg_len, N - (n_seg - 1) * seg_len,
                                           s0_shift=s0_shift, need_final=need_final)
    if only_inits:
        return inits, final
    launch(out, inits, (inits.stride(0), inits.stride(1), inits.stride(2)), None, True,
           s0_shift and s0 is not None)
    return out, final


def _dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, *, heads: int,
          rate: torch.Tensor | None, scale: float, dsn: torch.Tensor | None, out_dtype: torch.dtype | None,
          need_final: bool, chunk: int, segments: int | None, bits: int | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dK, dV (per query head) and the backward state at the start, by :func:`_dkdv_scan_kernel`."""
    B, _, N, D = q.shape
    Dv = v.shape[-1]
    H = heads
    acc = _acc_dtype(q.dtype)
    BK, BV = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
    n_seg, seg_len = _plan_segments(B * H, N, chunk, q.device, segments)
    dk = torch.empty(B, H, N, D, device=q.device, dtype=out_dtype or q.dtype)
    dv = torch.empty(B, H, N, Dv, device=q.device, dtype=out_dtype or q.dtype)
    final = None
    dummy = torch.empty(1, device=q.device, dtype=acc)
    rn = None
    if n_seg == 1:
        r0 = dsn.to(acc).contiguous() if dsn is not None else None
        r0_strides = (r0.stride(0), r0.stride(1), 0) if r0 is not None else (0, 0, 0)
        if need_final:
            rn = torch.empty(B, H, 1, D, Dv, device=q.device, dtype=acc)
    else:
        # each segment's starting R from the states-only scan of (q, dO) backwards in time
        r0, final = _scan(k, q, do, heads=H, rate=rate, scale=scale, s0=dsn, reverse=True, s0_shift=True,
                          scale_out=False, out_dtype=None, need_final=need_final, chunk=chunk, segments=None,
                          plan=(n_seg, seg_len), only_inits=True, bits=bits)
        r0_strides = (r0.stride(0), r0.stride(1), r0.stride(2))
    precise = _precision_bits(q.dtype, bits)
    rn_arg = rn if rn is not None else dummy
    _dkdv_scan_kernel[(n_seg, B * H)](
        q, k, v, do, dk, dv, r0 if r0 is not None else dummy, rn_arg, rate if rate is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        *r0_strides,
        rn_arg.stride(0) if rn is not None else 0, rn_arg.stride(1) if rn is not None else 0,
        rn_arg.stride(2) if rn is not None else 0,
        H // q.shape[1], H // k.shape[1], H // v.shape[1], H, N, seg_len, float(scale),
        DQK=D, DVV=Dv, BT=chunk, BK=BK, BV=BV, HAS_DECAY=rate is not None, HAS_R0=r0 is not None,
        STORE_RN=rn is not None, PRECISE=precise, DOT_PRECISION=_dot_precision(q.dtype), ACC=_tl_dtype(acc),
        UPCAST=_interpreting() and q.dtype == torch.bfloat16,
        num_warps=int(TUNING["num_warps"] or 8), num_stages=int(TUNING["num_stages"]),
    )
    if rn is not None:
        final = rn[:, :, 0]
    return dk, dv, final


def _use_fused_backward(dtype: torch.dtype, head_dim: int, value_dim: int) -> bool:
    fused = TUNING["fused_bwd"]
    if fused is None:  # float32 tiles of 128 x 128 overflow the shared memory (measured)
        return dtype in _SIXTEEN_BIT and head_dim <= 128 and value_dim <= 128
    return bool(fused) and head_dim <= 128 and value_dim <= 128


def _segment_initial_states(local: torch.Tensor, s0: torch.Tensor | None, rate: torch.Tensor | None,
                            seg_len: int, last_len: int, *, s0_shift: bool, need_final: bool,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Initial state of every segment from each segment's own state (``local [B, H, S, DK, DV]``).

    ``init[0] = s0``; ``init[s] = sum_{r<s} lambda^((s-1-r) L) local[r] + lambda^(s L - shift) s0``.
    """
    B, H, S, DK, DV = local.shape
    dev, acc = local.device, local.dtype
    seg = torch.arange(S, device=dev, dtype=torch.float64)
    lag = seg[:, None] - 1 - seg[None, :]                                   # (S, S): s-1-r
    if rate is not None:
        r64 = rate.to(torch.float64)[:, None, None]                         # (H, 1, 1)
        weights = torch.where(lag >= 0, torch.exp(-r64 * (lag.clamp(min=0) * seg_len)), 0.0)
    else:
        weights = (lag >= 0).to(torch.float64).expand(H, S, S)
    inits = torch.einsum("hsr,bhrkv->bhskv", weights.to(acc), local)         # (B, H, S, DK, DV)
    if s0 is not None:
        s0 = s0.to(acc)
        expo = seg * seg_len - (1.0 if s0_shift else 0.0)                   # (S,)
        if rate is not None:
            s0_decay = torch.exp(-rate.to(torch.float64)[:, None] * expo.clamp(min=0))  # (H, S)
        else:
            s0_decay = torch.ones(H, S, device=dev, dtype=torch.float64)
        s0_decay[:, 0] = 0.0
        inits = inits + s0_decay.to(acc)[None, :, :, None, None] * s0[:, :, None]
        inits[:, :, 0] = s0
    final = None
    if need_final:
        shift = 1.0 if (s0_shift and S == 1) else 0.0
        last_decay = (torch.exp(-rate.to(acc) * (last_len - shift)) if rate is not None
                      else torch.ones(H, device=dev, dtype=acc))
        final = last_decay[None, :, None, None] * inits[:, :, -1] + local[:, :, -1]
    return inits.contiguous(), final


def _decay_rate_grad(q, dq, k, dk_per_q_head, s0, ds0, sn, dsn) -> torch.Tensor:
    """d loss / d s_h for lambda_h = exp(-s_h), from the other gradients (float64 sums).

    With g = log lambda: dL/dg = sum_t t (q_t . dq_t) - sum_j j (k_j . dk_j) + <S0, dS0>
    + (N-1) <S_N, dS_N> (derived in docs/kernels.md), and dL/ds = -dL/dg.
    """
    H = q.shape[1]
    N = q.shape[2]
    pos = torch.arange(N, device=q.device, dtype=torch.float64)
    k_full = k.repeat_interleave(H // k.shape[1], dim=1) if k.shape[1] != H else k
    acc = _acc_dtype(q.dtype)
    qdq = (q.to(acc) * dq.to(acc)).sum(-1).double()                          # (B, H, N)
    kdk = (k_full.to(acc) * dk_per_q_head.to(acc)).sum(-1).double()
    dg = ((qdq - kdk) * pos).sum(dim=(0, 2))                                 # (H,)
    if s0 is not None and ds0 is not None:
        dg = dg + (s0.double() * ds0.double()).sum(dim=(0, 2, 3))
    if sn is not None and dsn is not None:
        dg = dg + (N - 1) * (sn.double() * dsn.double()).sum(dim=(0, 2, 3))
    return -dg


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rate, s0, scale, chunk, return_state, segments, out_dtype):
        H = q.shape[1]
        o, sn = _scan(q, k, v, heads=H, rate=rate, scale=scale, s0=s0, reverse=False, s0_shift=False,
                      scale_out=True, out_dtype=out_dtype, need_final=return_state, chunk=chunk,
                      segments=segments)
        ctx.save_for_backward(q, k, v, rate, s0, sn)
        ctx.scale, ctx.chunk, ctx.segments = scale, chunk, segments
        if return_state:
            return o, sn
        return o

    @staticmethod
    def backward(ctx, do, dsn=None):
        q, k, v, rate, s0, sn = ctx.saved_tensors
        scale, chunk, segments = ctx.scale, ctx.chunk, ctx.segments
        B, H, N, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        groups = H // Hkv
        acc = _acc_dtype(q.dtype)
        need_rate = rate is not None and ctx.needs_input_grad[3]
        need_s0 = s0 is not None and ctx.needs_input_grad[4]
        if do is None:
            do = torch.zeros(B, H, N, Dv, device=q.device, dtype=q.dtype)
        do = do.to(q.dtype).contiguous()
        dsn_t = dsn.to(acc).transpose(-1, -2).contiguous() if dsn is not None else None
        s0_t = s0.to(acc).transpose(-1, -2).contiguous() if s0 is not None else None
        wide = acc if (groups > 1 or need_rate) else None
        # the decay gradient is a difference of two large position-weighted sums: it needs every
        # intermediate split (measured: bits 5 gave it a 0.75 relative error at N = 16384 in bf16)
        bits = 7 if need_rate else None
        # dq_t = scale dO_t S_t^T: the forward scan of (dO, V, K) from S0^T
        dq, _ = _scan(do, v, k, heads=H, rate=rate, scale=scale, s0=s0_t, reverse=False, s0_shift=False,
                      scale_out=True, out_dtype=acc if need_rate else None, need_final=False,
                      chunk=chunk, segments=segments, bits=bits)
        # dk_j = R_j v_j, dv_j = k_j R_j with R_j = sum_{t>=j} lambda^(t-j) scale q_t^T dO_t
        #                                           + lambda^(N-1-j) dS_N: backward-in-time scans
        if _use_fused_backward(q.dtype, D, Dv):
            dk, dv, r0 = _dkdv(q, k, v, do, heads=H, rate=rate, scale=scale, dsn=dsn, out_dtype=wide,
                               need_final=need_s0 or need_rate, chunk=chunk, segments=segments, bits=bits)
        else:
            dk, _ = _scan(v, do, q, heads=H, rate=rate, scale=scale, s0=dsn_t, reverse=True, s0_shift=True,
                          scale_out=False, out_dtype=wide, need_final=False, chunk=chunk, segments=segments,
                          bits=bits)
            dv, r0 = _scan(k, q, do, heads=H, rate=rate, scale=scale, s0=dsn, reverse=True, s0_shift=True,
                           scale_out=False, out_dtype=wide, need_final=need_s0 or need_rate,
                           chunk=chunk, segments=segments, bits=bits)
        ds0 = None
        if r0 is not None and s0 is not None:
            lam = torch.exp(-rate.to(acc)) if rate is not None else torch.ones(H, device=q.device, dtype=acc)
            ds0 = lam[None, :, None, None] * r0
        drate = None
        if need_rate:
            drate = _decay_rate_grad(q, dq, k, dk, s0, ds0, sn, dsn).to(rate.dtype)
        if groups > 1:
            dk = dk.view(B, Hkv, groups, N, D).sum(2)
            dv = dv.view(B, Hkv, groups, N, Dv).sum(2)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drate,
                ds0.to(s0.dtype) if (need_s0 and ds0 is not None) else None, None, None, None, None, None)


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256  # one program holds a [chunk, D] tile and a [D, Dv] state tile in registers


def _kernel_requirements(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: object) -> torch.Tensor | None:
    """Check what the kernels themselves need; return the decay rates as a ``[H]`` tensor (or None).

    The inputs are validated by the ops that call the kernels (:func:`attnlab.ops.lightning_attention`,
    :func:`attnlab.ops.linear_attention`: shapes, dtypes, devices, ``scale``, the decay range,
    ``chunk_size``, ``initial_state``), so this checks only what the kernels assume beyond that: a
    device they run on, a dtype they have a Triton type for, ``D, Dv <= 256``, keys as long as the
    queries (no cross-length path), and one rate per query head.
    """
    if q.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"q must be float16/bfloat16/float32/float64 for the kernels, got {q.dtype}")
    H, N, D, Dv = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
    if k.shape[2] != N or v.shape[2] != N:
        raise ValueError(f"k and v must have the length N={N} of q (the kernels scan one sequence), got k "
                         f"{k.shape[2]} and v {v.shape[2]}")
    for name, dim in (("q/k head dim D", D), ("v head dim Dv", Dv)):
        if dim > _MAX_HEAD_DIM:
            raise ValueError(f"{name}={dim} is larger than the {_MAX_HEAD_DIM} the kernels support")
    if isinstance(decay, torch.Tensor) and decay.numel() != H:
        raise ValueError(f"decay must hold one rate per query head, shape [H] = [{H}], got {tuple(decay.shape)}")
    if not triton_runs_on(q):
        raise NotImplementedError(
            f"the Triton lightning kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
            f"got a tensor on {q.device}"
            + ("" if triton is not None else f" and triton is missing ({_TRITON_IMPORT_ERROR})")
        )
    if decay is None:
        return None
    acc = _acc_dtype(q.dtype)
    if not isinstance(decay, torch.Tensor):
        return torch.full((H,), float(decay), device=q.device, dtype=acc)  # type: ignore[arg-type]
    return decay.reshape(H).to(device=q.device, dtype=acc)


@torch.compiler.disable
def lightning_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    decay: torch.Tensor | float | None = None,
    scale: float = 1.0,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    segments: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal lightning attention with per-head decay, by Triton kernels (forward and backward).

    Lightning Attention-2 (arXiv 2401.04658), Algorithms 1-2, with TransNormerLLM's decay
    (arXiv 2307.14995, eq. 10): ``o_t = scale q_t S_t``, ``S_t = lambda S_{t-1} + k_t^T v_t``,
    ``lambda_h = exp(-decay_h)``, ``S_{-1} = initial_state`` (zero when None).

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, N, D]``; v: ``[B, H_kv, N, Dv]`` (``H_kv`` divides ``H``;
            query head ``h`` uses key/value head ``h // (H / H_kv)``), float16/bfloat16/float32
            (float64 under the interpreter); ``D, Dv <= 256``; any ``N``.
        decay: None (no decay), a rate ``>= 0`` for every head, or a tensor ``[H]`` of rates
            (differentiable).
        scale: multiplies ``q . k`` (default 1.0, as in the paper: no ``1/sqrt(d)``).
        chunk_size: tokens per chunk of the kernels when it is 16, 32, 64 or 128; any other positive
            value runs with 64 (the chunk length changes only the order of summation, not the math).
        initial_state: ``[B, H, D, Dv]`` state before the first token (differentiable).
        return_state: also return the final state ``S_{N-1}`` ``[B, H, D, Dv]`` (float32; float64
            for float64 inputs).
        segments: number of parallel sequence segments (default: chosen from the device).

    Returns:
        ``o [B, H, N, Dv]`` in the input dtype, and the final state when ``return_state``.

    Runs as one opaque call under ``torch.compile`` (a ``torch.compiler.disable`` boundary). The
    arguments are validated by :func:`attnlab.ops.lightning_attention` (``impl="triton"``); called
    directly, this checks only what the kernels need (see :func:`_kernel_requirements`): a negative
    decay or a malformed ``initial_state`` is not caught here.
    """
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
        raise ValueError(f"segments must be a positive int or None, got {segments!r}")
    rate = _kernel_requirements(q, k, v, decay)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    chunk = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    return _LightningTriton.apply(q, k, v, rate, initial_state, float(scale), chunk,
                                  bool(return_state), segments, q.dtype)


@torch.compiler.disable
def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: float = 1.0,
    chunk_size: int = 64,
    initial_state: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, object]:
    """Causal linear attention (``N == M``) by the lightning kernels with no decay.

    "Transformers are RNNs" (Katharopoulos et al., arXiv 2006.16236), eqs. 6 and 18-20:
    ``o_i = scale phi(q_i) S_i / (scale phi(q_i) . z_i + eps)``, ``S_i = sum_{j<=i} phi(k_j)^T v_j``,
    ``z_i = sum_{j<=i} phi(k_j)``. Exact for any feature map: ``phi`` is applied here (in the
    input dtype, so 16-bit inputs run on the 16-bit kernels), and the normalizer ``z`` is the
    extra last column of the values ``[v, 1]``: numerator and denominator come out of one scan,
    in float32, before the division.

    Args:
        q, k, v: ``[B, H, N, D]``, ``[B, H_kv, N, D]``, ``[B, H_kv, N, Dv]``.
        feature_map: callable ``[..., D] -> [..., F]`` (None: identity).
        normalize: divide by ``scale phi(q_i) . z_i + eps``; False gives ``scale phi(q_i) S_i``.
        eps, scale, chunk_size: as in ``attnlab.ops.linear_attention``.
        initial_state: ``(S0 [B, H, F, Dv], z0 [B, H, F])`` (when not normalizing, ``S0`` alone is
            accepted too).
        return_state: also return the final ``(S, z)`` (float32; float64 for float64 inputs), as
            ``attnlab.ops.linear_attention`` does.

    The arguments are validated by :func:`attnlab.ops.linear_attention` (``impl="triton"``); this
    checks only what the kernels need (see :func:`_kernel_requirements`).
    """
    phi = feature_map if feature_map is not None else (lambda x: x)
    fq, fk = phi(q), phi(k)
    s0 = initial_state[0] if isinstance(initial_state, tuple | list) else initial_state
    if not normalize:
        result = lightning_attention_triton(fq, fk, v, decay=None, scale=scale, chunk_size=chunk_size,
                                            initial_state=s0, return_state=return_state)
        if not return_state:
            return result
        out, state = result
        heads = q.shape[1]
        z = fk.to(state.dtype).sum(2)                                               # (B, H_kv, F)
        z = z.repeat_interleave(heads // z.shape[1], dim=1) if z.shape[1] != heads else z
        if isinstance(initial_state, tuple | list) and len(initial_state) == 2:
            z = z + initial_state[1].to(z.dtype)
        return out, (state, z)
    ones = torch.ones(*v.shape[:-1], 1, device=v.device, dtype=v.dtype)
    v1 = torch.cat([v, ones], dim=-1)                                           # (B, H_kv, N, Dv + 1)
    if initial_state is not None:
        if not isinstance(initial_state, tuple | list) or len(initial_state) != 2:
            raise TypeError("initial_state must be the tuple (S0 [B, H, F, Dv], z0 [B, H, F]) when normalize=True")
        s0 = torch.cat([initial_state[0], initial_state[1][..., None].to(initial_state[0].dtype)], dim=-1)
    segments = None
    rate = _kernel_requirements(fq, fk, v1, None)
    chunk = chunk_size if chunk_size in (16, 32, 64, 128) else 64
    result = _LightningTriton.apply(fq, fk, v1, rate, s0, float(scale), chunk, bool(return_state), segments,
                                    _acc_dtype(q.dtype))
    o1, state = (result if return_state else (result, None))
    out = (o1[..., :-1] / (o1[..., -1:] + eps)).to(q.dtype)                     # (B, H, N, Dv)
    if not return_state:
        return out
    return out, (state[..., :-1], state[..., -1])

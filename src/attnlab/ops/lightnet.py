"""LightNet's additive linear recurrence ("You Only Scan Once"), computed in log space.

"You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet" (Qin et al.,
arXiv 2405.21022), the additive recurrence (paper section 3, read with fla's and the author's xmixers
code). Per head and key channel ``c``::

    A_t = A_{t-1} + exp(k_t) (x) v_t,  Z_t = Z_{t-1} + exp(k_t),  o_t = sum_c q_t[c] A_t[c, :] / Z_t[c]

Token ``s``'s weight in channel ``c`` is ``exp(k_s[c]) / sum_{s' <= t} exp(k_s'[c])``: a softmax over the
*set* of tokens seen so far, so the bidirectional form is one global sum ("one scan"). Everything here
runs in log space, ``z_t = logcumsumexp_{s<=t} k_s`` and the state ``S_t = A_t / Z_t``, so long
sequences and large keys cannot overflow.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange

from attnlab.ops.lightning import check_chunk_size, check_state, scan_segments, segment_length
from attnlab.ops.nonfinite import nonfinite_guarded
from attnlab.ops.validation import (
    Sizes,
    check_bool,
    check_causal,
    check_causal_lengths,
    check_impl,
    check_qkv,
    compute_dtype,
    expand_kv,
)
from attnlab.registry import CheckConfig, Mechanism, register

__all__ = [
    "lightnet_attention",
    "lightnet_attention_reference",
    "lightnet_attention_chunked",
    "lightnet_attention_recurrent",
    "lightnet_attention_step",
]

IMPLS = ("auto", "reference", "chunked", "recurrent")

State = tuple[torch.Tensor, torch.Tensor]


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, key_gain: torch.Tensor | None,
             initial_state: object) -> tuple[Sizes, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                             State | None]:
    sizes = check_qkv(q, k, v)
    if causal:
        check_causal_lengths(sizes.length, sizes.key_length)
    dtype = compute_dtype(q.dtype)
    B, H, M, D, Dv = sizes.batch, sizes.heads, sizes.key_length, sizes.head_dim, sizes.value_dim
    gain = None
    if key_gain is not None:
        if not isinstance(key_gain, torch.Tensor) or not key_gain.is_floating_point():
            raise TypeError(f"key_gain must be a floating tensor [B, H, M, D], got {type(key_gain).__name__}")
        try:
            gain = key_gain.to(device=q.device, dtype=dtype).expand(B, H, M, D)
        except RuntimeError:
            raise ValueError(f"key_gain of shape {tuple(key_gain.shape)} does not broadcast to [B, H, M, D] = "
                             f"{[B, H, M, D]}") from None
    state = None
    if initial_state is not None:
        if not (isinstance(initial_state, tuple | list) and len(initial_state) == 2):
            raise TypeError(f"initial_state must be the tuple (S [B, H, D, Dv], z [B, H, D]) = "
                            f"([{B}, {H}, {D}, {Dv}], [{B}, {H}, {D}]), got {type(initial_state).__name__}")
        S0 = check_state("initial_state[0] (S)", initial_state[0], (B, H, D, Dv), q.device)
        z0 = check_state("initial_state[1] (z)", initial_state[1], (B, H, D), q.device)
        state = (S0.to(dtype), z0.to(dtype))
    return (sizes, q.to(dtype), expand_kv(k, H).to(dtype), expand_kv(v, H).to(dtype), gain, state)


def _global(k: torch.Tensor, v: torch.Tensor, gain: torch.Tensor | None, state: State | None) -> State:
    """The state after writing every key at once: ``z = logsumexp_s k_s``, ``S = sum_s exp(k_s - z) g_s v_s``."""
    z = torch.logsumexp(k, dim=2)  # (B, H, D)
    if state is not None:
        z = torch.logaddexp(z, state[1])
    weights = torch.exp(k - z[:, :, None])  # (B, H, M, D)
    if gain is not None:
        weights = weights * gain
    S = torch.einsum("bhmd,bhme->bhde", weights, v)
    if state is not None:
        S = S + torch.exp(state[1] - z)[..., None] * state[0]
    return S, z


def lightnet_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                 key_gain: torch.Tensor | None = None, chunk_size: int = 32,
                                 initial_state: State | None = None, return_state: bool = False,
                                 ) -> torch.Tensor | tuple[torch.Tensor, State]:
    """The explicit quadratic form, one masked softmax over tokens per key channel ``c``::

        o_t = sum_c q_t[c] sum_{s <= t} softmax_{s' <= t}(k_{s'}[c])_s  v_s

    (LightNet, arXiv 2405.21022). Causal masks ``s <= t + M - N``.
    An initial state ``(S0, z0)`` is one extra "token" per channel with log-weight ``z0[c]`` and value
    ``S0[c, :]``. ``key_gain`` multiplies each weight (LRPE). ``chunk_size`` is accepted and ignored.
    """
    check_causal(causal)
    check_chunk_size(chunk_size)
    sizes, qf, kf, vf, gain, state = _prepare(q, k, v, causal=causal, key_gain=key_gain,
                                              initial_state=initial_state)
    B, H, N, D = qf.shape
    M = kf.shape[2]
    if causal:
        allowed = torch.arange(M, device=q.device)[None, :] <= torch.arange(N, device=q.device)[:, None] + (M - N)
    else:
        allowed = torch.ones(N, M, dtype=torch.bool, device=q.device)
    out = torch.zeros(B, H, N, vf.shape[-1], dtype=qf.dtype, device=q.device)
    S_final, z_final = [], []
    for c in range(D):
        logits = kf[:, :, None, :, c].expand(B, H, N, M).masked_fill(~allowed, float("-inf"))  # (B, H, N, M)
        values = vf if gain is None else vf * gain[..., c:c + 1]  # (B, H, M, Dv)
        if state is not None:  # the state as one extra column
            logits = torch.cat([state[1][:, :, None, c, None].expand(B, H, N, 1), logits], dim=-1)
            values = torch.cat([state[0][:, :, None, c], values], dim=2)
        weights = torch.softmax(logits, dim=-1)  # (B, H, N, M[+1])
        out = out + qf[..., c:c + 1] * torch.einsum("bhnm,bhme->bhne", weights, values)
        if return_state:
            every = torch.cat([state[1][:, :, c, None], kf[..., c]], -1) if state is not None else kf[..., c]
            z_final.append(torch.logsumexp(every, dim=-1))
            S_final.append(torch.einsum("bhm,bhme->bhe", torch.softmax(every, dim=-1), values))
    out = out.to(q.dtype)
    return (out, (torch.stack(S_final, 2), torch.stack(z_final, 2))) if return_state else out


def _chunked_pairwise(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, z: torch.Tensor,
                      gain: torch.Tensor | None, state: State | None, *, chunk_size: int,
                      ) -> tuple[torch.Tensor, State | None]:
    """The chunked form with explicit per-pair weights ``exp(k_s - z_t)`` (``[B, H, C, C, D]`` per block).

    Every weight is at most 1 whatever the keys; :func:`lightnet_attention_chunked` falls back to it
    when a block's ``z`` spans more than its factorisation can hold in the compute dtype, passing its
    prepared causal inputs (``z = logcumsumexp(k)`` already folded with the initial state). Across
    blocks the state ``S = A / Z`` (normalised at the previous block's last ``z``) is carried, read as
    ``q_t diag(exp(z_prev - z_t)) S``. O(N C D + N D Dv) time, O(C^2 D) extra memory per block.
    Returns the output ``[B, H, N, Dv]`` in the compute dtype and the final state.
    """
    N = qf.shape[2]
    C = min(chunk_size, N)  # a chunk longer than the sequence is one chunk of N rows
    tril = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril()
    outs = []
    # split once: slicing inside the loop would make the backward pass O(N^2 / C)
    gains = gain.split(C, dim=2) if gain is not None else [None] * len(range(0, N, C))
    for qb, kb, vb, zb, gb in zip(qf.split(C, dim=2), kf.split(C, dim=2), vf.split(C, dim=2), z.split(C, dim=2),
                                  gains, strict=True):
        m = qb.shape[2]
        # intra: w[t, s, c] = exp(k_s[c] - z_t[c]) for s <= t (always <= 1)
        logw = kb[:, :, None, :, :] - zb[:, :, :, None, :]  # (B, H, t, s, D)
        weights = torch.exp(logw.masked_fill(~tril[:m, :m, None], float("-inf")))
        if gb is not None:
            weights = weights * gb[:, :, None]
        scores = torch.einsum("bhtd,bhtsd->bhts", qb, weights)  # (B, H, m, m)
        ob = torch.einsum("bhts,bhse->bhte", scores, vb)  # (B, H, m, Dv)
        if state is not None:  # inter: the state normalised at z_prev, rescaled to z_t (factor <= 1)
            S, z_prev = state
            ob = ob + torch.einsum("bhtd,bhde->bhte", qb * torch.exp(z_prev[:, :, None] - zb), S)
        outs.append(ob)
        # the state after this block, normalised at its last z
        z_end = zb[:, :, -1]  # (B, H, D)
        write = torch.exp(kb - z_end[:, :, None])  # (B, H, m, D)
        if gb is not None:
            write = write * gb
        S_new = torch.einsum("bhsd,bhse->bhde", write, vb)
        if state is not None:
            S_new = S_new + torch.exp(state[1] - z_end)[..., None] * state[0]
        state = (S_new, z_end)
    return torch.cat(outs, dim=2), state


def lightnet_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                               key_gain: torch.Tensor | None = None, chunk_size: int = 32,
                               initial_state: State | None = None, return_state: bool = False,
                               ) -> torch.Tensor | tuple[torch.Tensor, State]:
    """The fast path, exact: O(N C D + N D Dv) time, O(N C + N D Dv / C) memory, no ``C x C x D`` tensor.

    ``z = logcumsumexp(k)`` for every position at once. Inside a block the weight
    ``exp(k_s - z_t)`` factorises through the block's first ``z`` (``z_0``):
    ``q_t . exp(k_s - z_t) = (q_t exp(z_0 - z_t)) . exp(k_s - z_0)``, an ordinary masked
    ``[C, C]`` product (``z`` never decreases, so the first factor is at most 1, and the second at
    most ``exp(z_last - z_0)``, the block's spread). Across blocks the state ``S = A / Z``, normalised
    at the previous block's last ``z``, is carried in a short loop over ``[B, H, D, Dv]`` states and
    read as ``q_t diag(exp(z_prev - z_t)) S``. Bidirectional: one global sum.

    A block whose spread exceeds what the dtype holds (60 in float32, 600 in float64: keys that
    jump by that much within ``chunk_size`` tokens) sends the call to the pairwise form
    (:func:`_chunked_pairwise`), whose weights are each at most 1.

    Causal self-attention longer than a segment (~2 MiB of q, k, v) runs segment by segment, the
    state ``(S, z)`` carried (:func:`attnlab.ops.lightning.scan_segments`): forward memory
    O(segment) beyond inputs and output, and the fallback decided per segment.
    """
    chunk_size = check_chunk_size(chunk_size)
    sizes = check_qkv(q, k, v)
    B, H, N, D = sizes.batch, sizes.heads, sizes.length, sizes.head_dim
    if causal is True and N == sizes.key_length > segment_length(q, v, chunk_size):
        gain, cut = None, key_gain is None
        if isinstance(key_gain, torch.Tensor) and key_gain.is_floating_point():
            try:  # a view with the rows to cut (a broadcast gain may have one row)
                gain, cut = key_gain.expand(B, H, N, D), True
            except RuntimeError:
                pass  # left to the one-piece call below, which names the bad argument
        if cut:

            def step(parts: tuple, state: State | None, start: int) -> tuple[torch.Tensor, State]:
                q_, k_, v_, gain_ = parts
                return _lightnet_chunked_segment(q_, k_, v_, causal=True, key_gain=gain_, chunk_size=chunk_size,
                                                 initial_state=state, return_state=True)

            out, state = scan_segments(step, (q, k, v, gain), initial_state, segment=segment_length(q, v, chunk_size))
            return (out, state) if return_state else out
    return _lightnet_chunked_segment(q, k, v, causal=causal, key_gain=key_gain, chunk_size=chunk_size,
                                     initial_state=initial_state, return_state=return_state)


def _lightnet_chunked_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                              key_gain: torch.Tensor | None, chunk_size: int, initial_state: State | None,
                              return_state: bool) -> torch.Tensor | tuple[torch.Tensor, State]:
    """:func:`lightnet_attention_chunked` in one piece."""
    sizes, qf, kf, vf, gain, state = _prepare(q, k, v, causal=causal, key_gain=key_gain,
                                              initial_state=initial_state)
    N, M = sizes.length, sizes.key_length
    if not causal:
        S, z = _global(kf, vf, gain, state)
        out = torch.einsum("bhnd,bhde->bhne", qf, S).to(q.dtype)
        return (out, (S, z)) if return_state else out
    if M > N:  # end-aligned queries: the first M - N keys are seen by every query
        state = _global(kf[:, :, :M - N], vf[:, :, :M - N], None if gain is None else gain[:, :, :M - N], state)
        kf, vf = kf[:, :, M - N:], vf[:, :, M - N:]
        gain = None if gain is None else gain[:, :, M - N:]
    z = torch.logcumsumexp(kf, dim=2)  # (B, H, N, D)
    if state is not None:
        z = torch.logaddexp(z, state[1][:, :, None])
    C = min(chunk_size, N)  # a chunk longer than the sequence is one chunk of N rows
    pad = -N % C
    # padded rows: key -inf (weight 0, gradient 0), z repeated, query 0
    zc = rearrange(torch.cat([z, z[:, :, -1:].expand(-1, -1, pad, -1)], dim=2), "b h (c t) d -> b h c t d", t=C)
    spread = float((zc[:, :, :, -1] - zc[:, :, :, 0]).detach().max())
    if spread > (600.0 if qf.dtype == torch.float64 else 60.0):
        out, state = _chunked_pairwise(qf, kf, vf, z, gain, state, chunk_size=C)
        out = out.to(q.dtype)
        return (out, state) if return_state else out
    qc = rearrange(F.pad(qf, (0, 0, 0, pad)), "b h (c t) d -> b h c t d", t=C)  # (B, H, c, C, D)
    kc = rearrange(F.pad(kf, (0, 0, 0, pad), value=float("-inf")), "b h (c t) d -> b h c t d", t=C)
    vc = rearrange(F.pad(vf, (0, 0, 0, pad)), "b h (c t) e -> b h c t e", t=C)  # (B, H, c, C, Dv)
    z_first, z_last = zc[:, :, :, :1], zc[:, :, :, -1:]  # (B, H, c, 1, D)
    read = qc * torch.exp(z_first - zc)  # (B, H, c, C, D), factors <= 1
    write = torch.exp(kc - z_first)  # (B, H, c, C, D), factors <= exp(spread)
    end_write = torch.exp(kc - z_last)  # (B, H, c, C, D): the block's keys normalised at its last z
    if gain is not None:
        gc = rearrange(F.pad(gain, (0, 0, 0, pad)), "b h (c t) d -> b h c t d", t=C)
        write, end_write = write * gc, end_write * gc
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = torch.einsum("bhctd,bhcsd->bhcts", read, write).masked_fill(~tril, 0.0)  # (B, H, c, C, C)
    out = torch.einsum("bhcts,bhcse->bhcte", scores, vc)  # (B, H, c, C, Dv)
    block_S = torch.einsum("bhcsd,bhcse->bhcde", end_write, vc)  # (B, H, c, D, Dv) normalised at z_last
    # the state before each block (normalised at the previous block's last z): a loop over blocks
    # of [B, H, D, Dv] states (cheap), then one batched read
    # unbind once: indexing inside the loop would make each backward step allocate a full-size gradient
    block_states, z_ends = block_S.unbind(2), z_last[:, :, :, 0].unbind(2)  # c x (B, H, D, Dv), c x (B, H, D)
    befores, z_befores = [], []
    for S_block, z_end in zip(block_states, z_ends, strict=True):
        befores.append(state[0] if state is not None else torch.zeros_like(S_block))
        z_befores.append(state[1] if state is not None else z_end)  # no state: read weight 0
        S_new = S_block
        if state is not None:
            S_new = S_new + torch.exp(state[1] - z_end)[..., None] * state[0]
        state = (S_new, z_end)
    S_before = torch.stack(befores, dim=2)  # (B, H, c, D, Dv)
    z_before = torch.stack(z_befores, dim=2)[:, :, :, None]  # (B, H, c, 1, D)
    out = out + torch.einsum("bhctd,bhcde->bhcte", qc * torch.exp(z_before - zc), S_before)
    out = rearrange(out, "b h c t e -> b h (c t) e")[:, :, :N].to(q.dtype)
    return (out, state) if return_state else out


def _write(state: State | None, k_t: torch.Tensor, v_t: torch.Tensor, g_t: torch.Tensor | None) -> State:
    """One token: ``z' = logaddexp(z, k)``, ``S' = exp(z - z') S + exp(k - z') g (x) v``."""
    z_new = k_t if state is None else torch.logaddexp(state[1], k_t)  # (B, H, D)
    w = torch.exp(k_t - z_new)
    if g_t is not None:
        w = w * g_t
    S_new = w[..., None] * v_t[:, :, None, :]  # (B, H, D, Dv)
    if state is not None:
        S_new = S_new + torch.exp(state[1] - z_new)[..., None] * state[0]
    return S_new, z_new


def lightnet_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                                 key_gain: torch.Tensor | None = None, chunk_size: int = 32,
                                 initial_state: State | None = None, return_state: bool = False,
                                 ) -> torch.Tensor | tuple[torch.Tensor, State]:
    """Token by token in log space (the recurrence in its gated form):
    ``z_t = logaddexp(z_{t-1}, k_t)``, ``S_t = exp(z_{t-1} - z_t) S_{t-1} + exp(k_t - z_t) v_t``, ``o_t = q_t S_t``.

    Bidirectional: every key is written, then every query reads the final state.
    """
    check_chunk_size(chunk_size)
    sizes, qf, kf, vf, gain, state = _prepare(q, k, v, causal=causal, key_gain=key_gain,
                                              initial_state=initial_state)
    N, M = sizes.length, sizes.key_length
    written = M - N if causal else M
    keys, values, queries = kf.unbind(2), vf.unbind(2), qf.unbind(2)  # unbind once: cheap backward
    gains = gain.unbind(2) if gain is not None else [None] * M
    for j in range(written):
        state = _write(state, keys[j], values[j], gains[j])
    outs = []
    for i in range(N):
        if causal:
            j = written + i
            state = _write(state, keys[j], values[j], gains[j])
        outs.append(torch.einsum("bhd,bhde->bhe", queries[i], state[0]))
    out = torch.stack(outs, dim=2).to(q.dtype)
    return (out, state) if return_state else out


def lightnet_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: State | None = None, *,
                            key_gain: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
    """Decode one token (LightNet, arXiv 2405.21022, the additive recurrence in log space).

    Args:
        q: ``[B, H, 1, D]``; k: ``[B, H_kv, 1, D]`` (log-weights); v: ``[B, H_kv, 1, Dv]``.
        state: ``(S [B, H, D, Dv], z [B, H, D])`` (``S = A / Z``, ``z = log Z``), ``None`` at the start.

    Returns:
        ``(o [B, H, 1, Dv], new_state)``; N calls equal ``lightnet_attention(..., return_state=True)``.
    """
    if q.ndim == 4 and q.shape[2] != 1:
        raise ValueError(f"lightnet_attention_step takes one token: q must have N=1, got N={q.shape[2]}")
    return lightnet_attention_recurrent(q, k, v, causal=True, key_gain=key_gain, initial_state=state,
                                        return_state=True)


@nonfinite_guarded
def lightnet_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       key_gain: torch.Tensor | None = None, chunk_size: int = 32,
                       initial_state: State | None = None, return_state: bool = False,
                       impl: Literal["auto", "reference", "chunked", "recurrent"] = "auto",
                       ) -> torch.Tensor | tuple[torch.Tensor, State]:
    """LightNet attention: ``o_t = sum_c q_t[c] sum_{s<=t} softmax_{s'<=t}(k_{s'}[c])_s v_s``.

    "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet" (arXiv 2405.21022):
    the additive recurrence ``A_t = A_{t-1} + exp(k_t) (x) v_t``, ``Z_t = Z_{t-1} + exp(k_t)``,
    ``o_t = sum_c q_t[c] A_t[c] / Z_t[c]``, computed in log space. ``k`` are log-weights (the paper's
    layer applies no activation to k); there is no scale.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H_kv, M, D]``; v: ``[B, H_kv, M, Dv]``.
        causal: the recurrence (query ``t`` sees keys ``s <= t + M - N``); ``False``: one global sum
            over all tokens (order-free, the "one scan" of multi-dimensional data).
        key_gain: optional ``[B, H, M, D]`` factor on each normalised key weight (``LightNetAttention``
            uses it for MD-LRPE); ``None`` = 1.
        chunk_size: block length of the chunked form.
        initial_state: ``(S [B, H, D, Dv], z [B, H, D])`` with ``S = A / Z``, ``z = log Z``.
        return_state: also return the final ``(S, z)`` (float32; float64 for float64 inputs).
        impl: "chunked" (= "auto"), "recurrent" or "reference" (per-channel masked softmax).

    Returns:
        ``o [B, H, N, Dv]`` in q's dtype, or ``(o, (S, z))``.
    """
    check_causal(causal)
    check_impl(impl, IMPLS)
    check_bool("return_state", return_state)
    form = {"reference": lightnet_attention_reference, "recurrent": lightnet_attention_recurrent}.get(
        impl, lightnet_attention_chunked)
    return form(q, k, v, causal=causal, key_gain=key_gain, chunk_size=chunk_size, initial_state=initial_state,
                return_state=return_state)


register(Mechanism(
    name="lightnet",
    op=lightnet_attention,
    reference=lightnet_attention_reference,
    layer=None,
    family="linear",
    paper="You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
    arxiv="2405.21022",
    supports_causal=True,
    supports_bidirectional=True,
    supports_cross=True,
    supports_gqa=True,
    complexity="O(N d^2) (chunked: O(N C d + N d^2))",
    check=CheckConfig(options={"chunk_size": 4}, bf16_options={"chunk_size": 32}),
    state_size=lambda heads, head_dim, value_dim: heads * head_dim * (value_dim + 1),
))

"""Ring attention for softmax: key/value blocks travel around the ring, partial results merge by log-sum-exp.

"Ring Attention with Blockwise Transformers for Near-Infinite Context" (Liu, Zaharia, Abbeel, arXiv
2310.01889) on top of the blockwise softmax of "FlashAttention" (Dao et al., arXiv 2205.14135): a block
of keys gives each query a partial output ``o_b`` (normalised over the block) and its log-sum-exp
``l_b``; two partials merge as ``l = log(e^{l_1} + e^{l_2})``, ``o = e^{l_1 - l} o_1 + e^{l_2 - l} o_2``.

Forward: ``W`` steps; at step ``t`` this rank holds the keys/values of rank ``r - t`` and sends them on
to rank ``r + 1`` while it computes. Backward (one ``autograd.Function``, so every rank runs the same
sends in the same order): the keys/values go round again together with their gradient accumulators;
each rank adds its queries' contribution (``dP = dO V^T``, ``dS = P (dP - rowsum(dO * O))``, FlashAttention
Algorithm 2 with the global ``l``), and after ``W`` hops each accumulator is back home.

Causal masks work on chunks (see :mod:`attnlab.distributed.sharding`): chunk ``a`` of queries sees all of
an earlier key chunk, the lower triangle of its own, nothing of a later one (skipped, no compute), so
with the zigzag layout every rank does the same work.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange

from attnlab.distributed.comm import _count, group_rank, group_size
from attnlab.distributed.sharding import SequenceLayout
from attnlab.ops.validation import compute_dtype, expand_kv

__all__ = ["ring_attention"]

# scores of one tile of queries against a key chunk: at most this many elements (bounds memory)
TILE_ELEMENTS = 1 << 24


def _pair_mask(query_chunk: int, key_chunk: int, size: int, causal: bool, length: int,
               device: torch.device) -> tuple[str, bool, torch.Tensor | None]:
    """``(action, diagonal, mask)`` for a query chunk against a key chunk.

    action: "skip" (nothing visible) or "run"; diagonal: the causal lower triangle of a chunk against
    itself; mask: ``[size, size]`` boolean (True = attend) when padded keys must be hidden too, else
    ``None`` (then ``diagonal`` says everything).
    """
    if causal and key_chunk > query_chunk:
        return "skip", False, None
    diagonal = causal and key_chunk == query_chunk
    key_end = (key_chunk + 1) * size
    if key_end <= length:
        return "run", diagonal, None
    real = torch.arange(key_chunk * size, key_end, device=device) < length  # (size,): padded keys at the end
    if not bool(real.any()):
        return "skip", False, None
    mask = real[None, :].expand(size, size)
    if diagonal:
        mask = mask & torch.ones(size, size, dtype=torch.bool, device=device).tril()
    return "run", diagonal, mask


def _dense_mask(diagonal: bool, mask: torch.Tensor | None, size: int, device: torch.device) -> torch.Tensor | None:
    if mask is not None or not diagonal:
        return mask
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


# FlashAttention-2's CPU kernels (forward returns the log-sum-exp; backward takes the merged output and
# log-sum-exp, FlashAttention Algorithm 2): used on the CPU when D == Dv, else the explicit einsum blocks
_FLASH_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _use_flash(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (_FLASH_FORWARD is not None and _FLASH_BACKWARD is not None and q.device.type == "cpu"
            and q.shape[-1] == v.shape[-1] and q.dtype in (torch.float32, torch.float64))


def _additive(diagonal: bool, mask: torch.Tensor | None, dtype: torch.dtype) -> tuple[bool, torch.Tensor | None]:
    """``(is_causal, attn_mask)`` for the flash kernels (an additive mask of the inputs' dtype)."""
    if mask is None:
        return diagonal, None
    return False, torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[None, None]


def _tiles(rows: int, keys: int, batch_heads: int) -> list[tuple[int, int]]:
    step = max(1, min(rows, TILE_ELEMENTS // max(1, keys * batch_heads)))
    return [(i, min(rows, i + step)) for i in range(0, rows, step)]


def _block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over one key block: ``o [B, H, T, Dv]`` (normalised over the block) and ``lse [B, H, T]``."""
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, T); -inf for a row with no key
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite[..., None])
    return torch.einsum("bhts,bhse->bhte", probs, v), lse


def _merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax results by their log-sum-exp (rows with no key so far stay -inf / 0)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)
    w1 = torch.exp(lse - safe)[..., None]
    w2 = torch.exp(lse_b - safe)[..., None]
    return out * w1 + out_b * w2, new


class _Ring:
    """The ring of one call: layout, sizes, and the point-to-point pass to the next rank."""

    def __init__(self, group: dist.ProcessGroup | None, layout: SequenceLayout, local_length: int,
                 causal: bool, length: int, scale: float) -> None:
        self.group, self.layout, self.causal, self.length, self.scale = group, layout, causal, length, scale
        self.world, self.rank = group_size(group), group_rank(group)
        self.chunk = local_length // layout.chunks_per_rank
        self.flash = False
        self.in_flight: list[torch.Tensor] = []

    def source(self, step: int) -> int:
        return (self.rank - step) % self.world

    def pass_on(self, tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dist.Work]]:
        """Start sending ``tensors`` to the next rank and receiving the previous rank's into new buffers."""
        received = [torch.empty_like(t) for t in tensors]
        operations = []
        after, before = (self.rank + 1) % self.world, (self.rank - 1) % self.world
        self.in_flight = [t.contiguous() for t in tensors]  # alive until the caller has waited for the sends
        for t in self.in_flight:
            operations.append(dist.P2POp(dist.isend, t, group=self.group, group_peer=after))
            _count("ring", t.numel() * t.element_size())
        for t in received:
            operations.append(dist.P2POp(dist.irecv, t, group=self.group, group_peer=before))
        return received, dist.batch_isend_irecv(operations)

    def pairs(self, source: int, device: torch.device) -> list[tuple[slice, slice, bool, torch.Tensor | None]]:
        """(query rows, key rows, diagonal, mask) of the chunk pairs to compute against ``source``'s keys."""
        size, result = self.chunk, []
        for a, query_chunk in enumerate(self.layout.chunks(self.rank)):
            for b, key_chunk in enumerate(self.layout.chunks(source)):
                action, diagonal, mask = _pair_mask(query_chunk, key_chunk, size, self.causal, self.length, device)
                if action == "run":
                    result.append((slice(a * size, (a + 1) * size), slice(b * size, (b + 1) * size), diagonal,
                                   mask))
        return result


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                ring: _Ring) -> torch.Tensor:
        dtype = compute_dtype(q.dtype)
        B, H, n, _ = q.shape
        Dv = v.shape[-1]
        qf = q.to(dtype)  # (B, H, n, D)
        out = qf.new_zeros(B, H, n, Dv)
        lse = qf.new_full((B, H, n), float("-inf"))
        keys, values = k, v  # (B, H_kv, n, D|Dv), the block currently held
        for step in range(ring.world):
            pending: list[dist.Work] = []
            if step < ring.world - 1:  # overlap: the next block travels while this one is computed
                (next_keys, next_values), pending = ring.pass_on([keys, values])
            kf, vf = expand_kv(keys, H).to(dtype), expand_kv(values, H).to(dtype)  # (B, H, n, D|Dv)
            for rows, cols, diagonal, mask in ring.pairs(ring.source(step), q.device):
                if ring.flash:
                    is_causal, bias = _additive(diagonal, mask, dtype)
                    o_b, l_b = _FLASH_FORWARD(qf[:, :, rows].contiguous(), kf[:, :, cols].contiguous(),
                                              vf[:, :, cols].contiguous(), 0.0, is_causal, attn_mask=bias,
                                              scale=ring.scale)
                    out[:, :, rows], lse[:, :, rows] = _merge(out[:, :, rows], lse[:, :, rows], o_b, l_b)
                    continue
                dense = _dense_mask(diagonal, mask, ring.chunk, q.device)
                for i, j in _tiles(rows.stop - rows.start, cols.stop - cols.start, B * H):
                    r = slice(rows.start + i, rows.start + j)
                    o_b, l_b = _block_forward(qf[:, :, r], kf[:, :, cols], vf[:, :, cols],
                                              None if dense is None else dense[i:j], ring.scale)
                    out[:, :, r], lse[:, :, r] = _merge(out[:, :, r], lse[:, :, r], o_b, l_b)
            for request in pending:
                request.wait()
            if step < ring.world - 1:
                keys, values = next_keys, next_values
        ctx.ring = ring
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        dtype = out.dtype
        B, H, n, _ = q.shape
        Hkv = k.shape[1]
        groups = H // Hkv
        qf, do = q.to(dtype), grad_out.to(dtype)  # (B, H, n, D), (B, H, n, Dv)
        delta = (do * out).sum(-1)  # (B, H, n): rowsum(dO * O)
        finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        flash_lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)  # no key: P = 0
        dq = torch.zeros_like(qf)
        keys, values = k, v
        dk = torch.zeros(k.shape, dtype=dtype, device=k.device)  # accumulators travelling with the block
        dv = torch.zeros(v.shape, dtype=dtype, device=v.device)
        for step in range(ring.world):
            pending: list[dist.Work] = []
            if step < ring.world - 1:
                (next_keys, next_values), pending = ring.pass_on([keys, values])
            kf, vf = expand_kv(keys, H).to(dtype), expand_kv(values, H).to(dtype)
            dk_full = torch.zeros_like(kf)  # (B, H, n, D): per query head, summed to H_kv below
            dv_full = torch.zeros_like(vf)
            for rows, cols, diagonal, mask in ring.pairs(ring.source(step), q.device):
                if ring.flash:
                    is_causal, bias = _additive(diagonal, mask, dtype)
                    dq_b, dk_b, dv_b = _FLASH_BACKWARD(
                        do[:, :, rows].contiguous(), qf[:, :, rows].contiguous(), kf[:, :, cols].contiguous(),
                        vf[:, :, cols].contiguous(), out[:, :, rows].contiguous(), flash_lse[:, :, rows].contiguous(),
                        0.0, is_causal, attn_mask=bias, scale=ring.scale)
                    dq[:, :, rows] += dq_b
                    dk_full[:, :, cols] += dk_b
                    dv_full[:, :, cols] += dv_b
                    continue
                mask = _dense_mask(diagonal, mask, ring.chunk, q.device)
                for i, j in _tiles(rows.stop - rows.start, cols.stop - cols.start, B * H):
                    r = slice(rows.start + i, rows.start + j)
                    scores = torch.einsum("bhtd,bhsd->bhts", qf[:, :, r], kf[:, :, cols]) * ring.scale
                    probs = torch.exp(scores - finite_lse[:, :, r, None])  # (B, H, T, S)
                    if mask is not None:
                        probs = probs.masked_fill(~mask[i:j], 0.0)
                    dv_full[:, :, cols] += torch.einsum("bhts,bhte->bhse", probs, do[:, :, r])
                    dp = torch.einsum("bhte,bhse->bhts", do[:, :, r], vf[:, :, cols])
                    ds = probs * (dp - delta[:, :, r, None]) * ring.scale
                    dq[:, :, r] += torch.einsum("bhts,bhsd->bhtd", ds, kf[:, :, cols])
                    dk_full[:, :, cols] += torch.einsum("bhts,bhtd->bhsd", ds, qf[:, :, r])
            if groups > 1:
                dk_full = rearrange(dk_full, "b (hk g) s d -> b hk g s d", g=groups).sum(2)
                dv_full = rearrange(dv_full, "b (hk g) s e -> b hk g s e", g=groups).sum(2)
            dk, dv = dk + dk_full, dv + dv_full
            for request in pending:
                request.wait()
            # the accumulators follow their block; after the last step one more hop brings them home
            (dk, dv), moving = ring.pass_on([dk, dv])
            for request in moving:
                request.wait()
            if step < ring.world - 1:
                keys, values = next_keys, next_values
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group: dist.ProcessGroup | None,
                   layout: SequenceLayout, causal: bool, length: int, scale: float | None,
                   flash: bool | None = None) -> torch.Tensor:
    """Softmax attention of this rank's queries against the keys of every rank, passed around the ring.

    Vaswani et al., "Attention Is All You Need" (arXiv 1706.03762), eq. 1, computed blockwise as in Ring
    Attention (arXiv 2310.01889). Inputs are validated by :func:`context_parallel_attention`.

    Args:
        q: ``[B, H, n, D]``; k: ``[B, H_kv, n, D]``; v: ``[B, H_kv, n, Dv]`` (this rank's shard).
        layout: which chunks each rank holds. causal: global causal mask.
        length: real tokens in the whole sequence (keys at positions ``>= length`` are padding).
        scale: default ``D ** -0.5``.
        flash: compute each block with PyTorch's FlashAttention CPU kernels (``None``: on the CPU when
            ``D == Dv``) or with explicit einsum blocks (``False``; any device).

    Returns:
        ``[B, H, n, Dv]`` in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    ring = _Ring(group, layout, q.shape[2], causal, length, scale)
    ring.flash = _use_flash(q, v) if flash is None else flash
    return _RingAttention.apply(q, k, v, ring)

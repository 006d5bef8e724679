"""External baselines: implementations outside attnlab (fla, NATTEN, FlexAttention) timed beside it.

Each is timed only when its package imports and runs on the device; a missing package is reported
once, never an error.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.bench.speed_options import lightning_options, odd_at_most

__all__ = ["ExternalBaseline", "EXTERNALS", "available_externals"]


@dataclass(frozen=True)
class ExternalBaseline:
    """An implementation outside attnlab, timed when its package imports."""

    name: str  # row name, e.g. "fla:chunk_simple_gla"
    package: str  # the group users enable ("fla", "natten", "flex")
    module: str  # what must import
    devices: tuple[str, ...]
    causal_only: bool
    build: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool, Mapping[str, Any]], Callable[[], Any]]
    note: str = ""


def _token_major(*xs: torch.Tensor) -> list[torch.Tensor]:
    """``[B, H, N, D]`` tensors as contiguous ``[B, N, H, D]`` leaves (fla's and NATTEN's layout), made
    outside the timed call; gradients land on these leaves (listed as ``run.leaves``)."""
    return [x.detach().transpose(1, 2).contiguous().requires_grad_(x.requires_grad) for x in xs]


def _fla_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    ctx: Mapping[str, Any]) -> Callable[[], Any]:
    """fla's ``chunk_simple_gla`` with attnlab's lightning decay: ``g_gamma = -s_h`` (log of lambda_h)."""
    from fla.ops.simple_gla import chunk_simple_gla

    qt, kt, vt = _token_major(q, k, v)  # (B, N, H, D)
    decay = lightning_options({**ctx, "device": q.device})["decay"]  # the lightning cell's per-head rates
    rates = decay if isinstance(decay, torch.Tensor) else torch.full((ctx["heads"],), float(decay))
    g_gamma = -rates.float().to(q.device)  # (H,)
    if "g_gamma" in inspect.signature(chunk_simple_gla).parameters:
        kwargs: dict[str, Any] = {"g_gamma": g_gamma}
    else:  # older fla: a per-token log decay [B, N, H]
        kwargs = {"g": g_gamma.expand(qt.shape[0], qt.shape[1], -1).contiguous()}

    def run() -> torch.Tensor:
        return chunk_simple_gla(qt, kt, vt, scale=1.0, **kwargs)[0].transpose(1, 2)  # (B, H, N, D)

    run.leaves = [qt, kt, vt]
    return run


def _fla_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     ctx: Mapping[str, Any]) -> Callable[[], Any]:
    """fla's ``chunk_linear_attn``, unnormalized, no feature map (= lightning without decay)."""
    from fla.ops.linear_attn import chunk_linear_attn

    qt, kt, vt = _token_major(q, k, v)

    def run() -> torch.Tensor:
        return chunk_linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0].transpose(1, 2)

    run.leaves = [qt, kt, vt]
    return run


def _natten_na1d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                 ctx: Mapping[str, Any]) -> Callable[[], Any]:
    from natten.functional import na1d

    qt, kt, vt = _token_major(q, k, v)  # (B, N, H, D)
    kernel = odd_at_most(ctx["N"] // 2, 127)

    def run() -> torch.Tensor:
        return na1d(qt, kt, vt, kernel_size=kernel, is_causal=causal).transpose(1, 2)

    run.leaves = [qt, kt, vt]
    return run


def _flex_sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         ctx: Mapping[str, Any]) -> Callable[[], Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window = min(1024, ctx["N"])

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 (FlexAttention's signature)
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, None, None, ctx["N"], ctx["N"], device=str(q.device))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run() -> torch.Tensor:
        return compiled(q, k, v, block_mask=block_mask)

    return run


EXTERNALS: tuple[ExternalBaseline, ...] = (
    ExternalBaseline("fla:chunk_simple_gla", "fla", "fla.ops.simple_gla", ("cuda",), True, _fla_simple_gla,
                     "flash-linear-attention, Lightning attention with per-head decay"),
    ExternalBaseline("fla:chunk_linear_attn", "fla", "fla.ops.linear_attn", ("cuda",), True, _fla_linear_attn,
                     "flash-linear-attention, unnormalized linear attention"),
    ExternalBaseline("natten:na1d", "natten", "natten.functional", ("cuda", "cpu"), False, _natten_na1d,
                     "NATTEN neighborhood attention, kernel 127"),
    ExternalBaseline("flex:sliding_window", "flex", "torch.nn.attention.flex_attention", ("cuda",), True,
                     _flex_sliding_window, "FlexAttention (compiled), causal sliding window 1024"),
)


def available_externals(wanted: Sequence[str], device: str, *,
                        report: Callable[[str], None] = print) -> list[ExternalBaseline]:
    """The external baselines of the ``wanted`` packages that import and run on ``device``.

    Each missing package (or unsupported device) is reported once through ``report``.
    """
    import importlib

    out, reported = [], set()
    for ext in EXTERNALS:
        if ext.package not in wanted:
            continue
        if device not in ext.devices:
            if ext.package not in reported:
                report(f"external baseline {ext.package!r}: runs on {', '.join(ext.devices)} only, not {device}")
                reported.add(ext.package)
            continue
        try:
            importlib.import_module(ext.module)
        except Exception as error:  # ImportError, or a package that fails while importing
            if ext.package not in reported:
                report(f"external baseline {ext.package!r} not available ({type(error).__name__}: {error}); "
                       f"install it to add it to the table")
                reported.add(ext.package)
            continue
        out.append(ext)
    return out

"""One benchmark cell: its description (a JSON-able spec) and the call it times.

A spec names the mechanism, impl, path ("op", "layer" or "external"), N, mode ("fwd" or "fwdbwd"),
causality, batch, heads, head dim, dtype, device and seed; :func:`build_cell` draws the inputs and
returns the call, in the parent process and in the memory subprocess alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

import attnlab
from attnlab.bench.externals import EXTERNALS, ExternalBaseline
from attnlab.bench.speed_config import DTYPES
from attnlab.bench.speed_options import bench_options
from attnlab.models.blocks import build_mixer

__all__ = ["cell_spec", "build_cell"]


def cell_spec(*, mechanism: str, impl: str, path: str, N: int, mode: str, causal: bool, batch: int, heads: int,
               dim: int, dtype: str, device: str, seed: int) -> dict[str, Any]:
    return {"mechanism": mechanism, "impl": impl, "path": path, "N": N, "mode": mode, "causal": causal,
            "batch": batch, "heads": heads, "dim": dim, "dtype": dtype, "device": device, "seed": seed}


def build_cell(spec: Mapping[str, Any], *, externals: Sequence[ExternalBaseline] = ()) -> Callable[[], Any]:
    """Random inputs for ``spec`` and a function running one call (forward, or forward + backward).

    Returns the call; building it allocates the inputs (so memory helpers count them).
    """
    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    B, H, N, D = spec["batch"], spec["heads"], spec["N"], spec["dim"]
    backward = spec["mode"] == "fwdbwd"
    g = torch.Generator().manual_seed(spec["seed"])
    ctx = {"batch": B, "heads": H, "N": N, "dim": D, "device": device, "dtype": dtype}

    def draw(*shape: int, grad: bool = backward) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(grad)

    if spec["path"] == "external":
        ext = next((e for e in (externals or EXTERNALS) if e.name == spec["mechanism"]), None)
        if ext is None:
            raise KeyError(f"unknown external baseline {spec['mechanism']!r}")
        q, k, v = draw(B, H, N, D), draw(B, H, N, D), draw(B, H, N, D)
        call = ext.build(q, k, v, spec["causal"], ctx)
        leaves = [q, k, v, *getattr(call, "leaves", [])]
    elif spec["path"] == "layer":
        # built as a model of length N builds its mixer: a registered layer, or an op (the softmax layer
        # the layers are compared with) inside attnlab.nn.Attention's projections
        layer = build_mixer(spec["mechanism"], H * D, H, causal=spec["causal"], seq_len=N).to(device, dtype)
        x = draw(B, N, H * D)  # (B, N, dim)

        def call() -> Any:
            return layer(x)

        leaves = [x, *layer.parameters()]
    else:
        record = attnlab.get(spec["mechanism"])
        q, k, v = draw(B, H, N, D), draw(B, H, N, D), draw(B, H, N, D)  # (B, H, N, D)
        options = bench_options(record, ctx)
        impl = spec["impl"]
        if impl != "reference":
            options["impl"] = impl

            def call() -> Any:
                return record(q, k, v, causal=spec["causal"], **options)
        else:
            def call() -> Any:
                return record.run_reference(q, k, v, causal=spec["causal"], **options)

        leaves = [q, k, v]

    if not backward:
        def forward() -> None:
            with torch.no_grad():
                call()

        return forward
    out_grad: list[torch.Tensor] = []

    def forward_backward() -> None:
        out = call()
        out = out[0] if isinstance(out, tuple) else out
        if not out_grad:
            out_grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(device, out.dtype))
        out.backward(out_grad[0])
        for leaf in leaves:
            leaf.grad = None

    return forward_backward

"""CUDA check of the Mechanisms II ops: each op (default impl, and every fast path) against its float64
reference on the GPU, forward and gradients; then the bf16 ALiBi factors of FlashBias at long N
(exact hi/lo factors vs naive rank-2 factors vs a float32 dense reference) with forward timings
against SDPA with a dense bias. Prints Markdown tables.

    PYTHONPATH=src python3 scripts/check_local_sparse_cuda.py
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import attnlab
from attnlab.ops import alibi_bias, alibi_bias_factors, flashbias_attention

warnings.filterwarnings("ignore")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def op_options(name: str, N: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if name == "neighborhood":
        return {"kernel_size": 31}
    if name == "sliding_window":
        return {"window": 32}
    if name == "dynamic_mask":
        return {"key_bias": torch.randn(1, 1, N, generator=g).to(device), "k_budget": 40}
    if name == "hip":
        return {"k_budget": 32, "block_size_q": 16, "block_size_k": 2, "sliding_window": 16, "sink_tokens": 2}
    qb, kb = alibi_bias_factors(4, N, device=device)
    return {"q_bias": qb, "k_bias": kb}


def check_ops(device: str = "cuda", N: int = 256) -> None:
    print("| op | impl | causal | fwd rel. err (f32 vs f64 ref) | grad rel. err (q, k, v) |")
    print("|---|---|---|---|---|")
    for name in ("neighborhood", "sliding_window", "dynamic_mask", "hip", "flashbias"):
        record = attnlab.get(name)
        g = torch.Generator(device=device).manual_seed(1)
        q, k, v = (torch.randn(2, 4, N, 32, generator=g, device=device) for _ in range(3))
        for causal in [c for c in (False, True) if (record.supports_causal if c else record.supports_bidirectional)]:
            options = op_options(name, N, device)
            qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
            ref = record.run_reference(qd, kd, vd, causal=causal, **options)
            ref_grads = torch.autograd.grad(ref.square().sum(), (qd, kd, vd))
            for impl in ("auto", *record.impls):
                qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
                try:
                    out = record(qf, kf, vf, causal=causal, impl=impl, **options)
                    fwd = f"{rel(out, ref):.1e}"
                    try:
                        grads = torch.autograd.grad(out.square().sum(), (qf, kf, vf))
                        bwd = ", ".join(f"{rel(a, b):.1e}" for a, b in zip(grads, ref_grads, strict=True))
                    except Exception as error:  # noqa: BLE001
                        bwd = f"no backward: {type(error).__name__}"
                except Exception as error:  # noqa: BLE001
                    fwd, bwd = f"error: {type(error).__name__}: {str(error)[:80]}", "-"
                print(f"| {name} | {impl} | {causal} | {fwd} | {bwd} |", flush=True)


def check_alibi_bf16(device: str = "cuda", N: int = 16384, B: int = 4, H: int = 16, D: int = 128) -> None:
    from triton.testing import do_bench

    g = torch.Generator(device=device).manual_seed(2)
    q, k, v = (torch.randn(B, H, N, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(3))
    bias = alibi_bias(H, N, dtype=torch.float32, device=device)  # (1, H, N, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()
    dense32 = bias.masked_fill(~causal, float("-inf"))
    expected = F.scaled_dot_product_attention(q[:1].float(), k[:1].float(), v[:1].float(), attn_mask=dense32)
    exact = alibi_bias_factors(H, N, dtype=torch.bfloat16, device=device)
    naive = tuple(x.bfloat16() for x in alibi_bias_factors(H, N, device=device))
    dense16 = dense32.bfloat16()
    cells = {
        "FlashBias, exact bf16 hi/lo factors (rank 8)": lambda: flashbias_attention(
            q, k, v, q_bias=exact[0], k_bias=exact[1], causal=True),
        "FlashBias, naive rank-2 factors in bf16": lambda: flashbias_attention(
            q, k, v, q_bias=naive[0], k_bias=naive[1], causal=True),
        "SDPA with a dense bf16 bias": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense16),
        "SDPA causal, no bias": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    print(f"\nbf16 causal ALiBi, B={B}, H={H}, N={N}, D={D} (rel. err on batch 0 vs float32 dense reference)")
    print("| implementation | fwd ms | rel. err |")
    print("|---|---|---|")
    for label, fn in cells.items():
        out = fn()
        error = rel(out[:1], expected) if "no bias" not in label else float("nan")
        ms = do_bench(fn, warmup=25, rep=100)
        print(f"| {label} | {ms:.2f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    check_ops()
    check_alibi_bf16()

#!/usr/bin/env python3
"""GPU check of the Triton lightning kernels (docs/kernels.md): correctness first, then timings.

Runs on one CUDA GPU with nothing from the network: attnlab from this checkout, fla (fla-core) when
it imports (carry its wheel, see docs/kernels.md). Sections, each guarded by a time budget:

1. ceilings: device copy bandwidth and a bf16 8192^3 matmul (the "two numbers" of docs/kernels.md);
2. correctness: bf16 / fp16 / fp32 outputs, final states and gradients against float64 references
   (``attnlab.ops.lightning_attention`` chunked/reference forms computed in float64 on the GPU);
   bf16 must stay under 3e-3 relative error, float32 under 1e-4;
3. timings at the anchor shape (bf16, H=16, D=128, B*N = 65536, causal, per-head decay
   ``lightning_decay_slopes(16)``): attnlab Triton, fla ``chunk_simple_gla`` / ``chunk_linear_attn``
   and PyTorch chunking, fwd and fwd+bwd (median of ``triton.testing.do_bench``, 25 ms warm-up,
   100 ms repeat; random output gradient), peak memory;
4. variants: launch settings of the kernel (value tile, warps, stages, precise split, segments);
5. phases: the pieces of the long-sequence forward timed one by one.

Usage: ``python3 scripts/gpu_kernels.py [--out DIR] [--budget SECONDS] [--sections 1,2,3,4,5]``.
The last lines printed are markdown tables; everything is also written to DIR/gpu_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from attnlab.kernels import lightning as K  # noqa: E402
from attnlab.ops.lightning import lightning_attention, lightning_decay_slopes  # noqa: E402

try:
    import triton
    from triton.testing import do_bench
except Exception as error:  # pragma: no cover
    print(f"triton missing: {error}")
    raise SystemExit(1) from error

START = time.time()
RESULTS: dict[str, object] = {"tables": {}}
H, D = 16, 128
TOKENS = 65536
LENGTHS = (1024, 4096, 16384, 65536)
DEVICE = "cuda"
VARIANT_LENGTHS = (1024, 65536)
# (dtype, B, N, relative-error limit) of the gradient checks
GRAD_CASES = ((torch.bfloat16, 4, 2048, 3e-3), (torch.bfloat16, 1, 16384, 3e-3), (torch.float16, 2, 2048, 1e-3),
              (torch.float32, 2, 2048, 1e-4), (torch.float32, 1, 8192, 1e-4))
SMOKE = False  # --smoke: tiny sizes on CPU under TRITON_INTERPRET=1, to check this script itself


def elapsed() -> float:
    return time.time() - START


def bench(fn, warmup=25, rep=100) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    return float((a - b).norm() / b.norm())


def save(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_kernels.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def log(*args) -> None:
    print(f"[{elapsed():6.1f}s]", *args, flush=True)


def anchor_inputs(N: int, dtype=torch.bfloat16, seed=0, requires_grad=False):
    B = TOKENS // N
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen) for _ in range(3))
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_()
    return q, k, v


def rates() -> torch.Tensor:
    return lightning_decay_slopes(H).to(DEVICE)


# ------------------------------------------------------------------------------------------------


def section_ceilings() -> None:
    src = torch.randn(1024**3, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_tbs = 2 * src.numel() * 2 / (ms * 1e-3) / 1e12
    left = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    right = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    ms_mm = bench(lambda: left @ right)
    tflops = 2 * 8192**3 / (ms_mm * 1e-3) / 1e12
    RESULTS["ceilings"] = {"copy_TBps": copy_tbs, "bf16_matmul_TFLOPs": tflops}
    log(f"ceilings: copy {copy_tbs:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s")


def reference64(q, k, v, decay, scale=1.0, s0=None, return_state=False):
    return lightning_attention(q.double(), k.double(), v.double(), decay=None if decay is None else decay.double(),
                               scale=scale, chunk_size=64, initial_state=None if s0 is None else s0.double(),
                               return_state=return_state, impl="chunked")


def section_correctness() -> None:
    rows = []
    # (a) forward, bf16, anchor shapes (the float64 reference is the chunked form in float64)
    for N in LENGTHS:
        q, k, v = anchor_inputs(N, seed=N)
        out = K.lightning_attention_triton(q, k, v, decay=rates(), chunk_size=CHUNK)
        ref = reference64(q, k, v, rates())
        err = rel(out, ref)
        rows.append({"check": f"fwd bf16 B={TOKENS // N} N={N}", "rel_err": err, "limit": 3e-3, "ok": err < 3e-3})
        log(rows[-1])
        torch.cuda.empty_cache()
    # (b) gradients, states and the initial state, bf16 / fp16 / fp32, short and long (segmented)
    for dtype, B, N, limit in GRAD_CASES:
        gen = torch.Generator(device=DEVICE).manual_seed(B * N)
        q, k, v = (torch.randn(B, H, N, D, device=DEVICE, dtype=dtype, generator=gen).requires_grad_()
                   for _ in range(3))
        s0 = torch.randn(B, H, D, D, device=DEVICE, generator=gen).requires_grad_()
        decay = rates().clone().requires_grad_()
        out, sn = K.lightning_attention_triton(q, k, v, decay=decay, scale=D**-0.5, initial_state=s0,
                                               return_state=True, chunk_size=CHUNK)
        do = torch.randn(out.shape, device=DEVICE, generator=gen, dtype=torch.float32)
        dsn = torch.randn(sn.shape, device=DEVICE, generator=gen)
        grads = torch.autograd.grad((out.float() * do).sum() + (sn * dsn).sum(), (q, k, v, s0, decay))
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v, s0, decay)]
        ref_out, ref_sn = reference64(*leaves[:3], leaves[4], scale=D**-0.5, s0=leaves[3], return_state=True)
        ref_grads = torch.autograd.grad((ref_out * do.double()).sum() + (ref_sn * dsn.double()).sum(), leaves)
        errs = {"out": rel(out, ref_out), "state": rel(sn, ref_sn)}
        errs.update({n: rel(g, r) for n, g, r in zip(("dq", "dk", "dv", "ds0", "ddecay"), grads, ref_grads,
                                                      strict=True)})
        # d decay is a difference of large sums: its bound is looser (bf16 gradients feed it)
        ok = all(e < (limit if n != "ddecay" else max(10 * limit, 1e-3)) for n, e in errs.items())
        rows.append({"check": f"fwd+bwd {str(dtype)[6:]} B={B} N={N} (s0, state, decay grad)", "rel_err": errs,
                     "limit": limit, "ok": ok})
        log(rows[-1])
        torch.cuda.empty_cache()
    # (c) segments forced against one segment: same function
    q, k, v = anchor_inputs(LENGTHS[-2], seed=5)
    one = K.lightning_attention_triton(q, k, v, decay=rates(), segments=1, chunk_size=CHUNK)
    many = K.lightning_attention_triton(q, k, v, decay=rates(), segments=16, chunk_size=CHUNK)
    err = rel(many, one)
    rows.append({"check": f"segments=16 vs 1, bf16 N={LENGTHS[-2]}", "rel_err": err, "limit": 3e-3,
                 "ok": err < 3e-3})
    log(rows[-1])
    RESULTS["correctness"] = rows


def fla_functions():
    try:
        import fla
        from fla.ops.linear_attn import chunk_linear_attn
        from fla.ops.simple_gla import chunk_simple_gla

        return chunk_simple_gla, chunk_linear_attn, getattr(fla, "__version__", "?")
    except Exception as error:
        log(f"fla not available: {error!r}")
        return None


def time_impl(name, N, fwd, fwd_bwd, rows, err=None) -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        t_f = bench(fwd)
        t_fb = bench(fwd_bwd) if fwd_bwd is not None else float("nan")
        peak = torch.cuda.max_memory_allocated() / 2**30
    except Exception as error:
        log(f"{name} N={N} failed: {error!r}")
        traceback.print_exc()
        return
    rows.append({"impl": name, "N": N, "B": TOKENS // N, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "peak_GiB": peak,
                 "rel_err": err})
    log(rows[-1])


def time_length(N: int, fla, s: torch.Tensor, rows: list[dict], budget: float) -> None:
    q, k, v = anchor_inputs(N, requires_grad=True)
    do = torch.randn_like(q)
    ref = reference64(q.detach()[:1], k.detach()[:1], v.detach()[:1], s) if N <= LENGTHS[-2] else None

    def ours_f():
        return K.lightning_attention_triton(q, k, v, decay=s, chunk_size=CHUNK)

    def ours_fb():
        return torch.autograd.grad(ours_f(), (q, k, v), do)

    if fla is not None:
        simple_gla, linear_attn, _ = fla
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        g_gamma = -s.float()

        def fla_f():
            return simple_gla(qt, kt, vt, g_gamma=g_gamma, scale=1.0)[0]

        def fla_fb():
            return torch.autograd.grad(fla_f(), (qt, kt, vt), dot)

        err_fla = rel(fla_f().transpose(1, 2)[:1], ref) if ref is not None else None
        time_impl("fla chunk_simple_gla (per-head decay)", N, fla_f, fla_fb, rows, err_fla)

        def fla_lin_f():
            return linear_attn(qt, kt, vt, scale=1.0, normalize=False)[0]

        def fla_lin_fb():
            return torch.autograd.grad(fla_lin_f(), (qt, kt, vt), dot)

        if FLA_LINEAR:
            time_impl("fla chunk_linear_attn (no decay)", N, fla_lin_f, fla_lin_fb, rows)

    err = rel(ours_f()[:1], ref) if ref is not None else None
    time_impl("attnlab triton (lightning, per-head decay)", N, ours_f, ours_fb, rows, err)

    def ours_nodecay_f():
        return K.lightning_attention_triton(q, k, v, chunk_size=CHUNK)

    def ours_nodecay_fb():
        return torch.autograd.grad(ours_nodecay_f(), (q, k, v), do)

    time_impl("attnlab triton (no decay)", N, ours_nodecay_f, ours_nodecay_fb, rows)

    def torch_f():
        return lightning_attention(q, k, v, decay=s, chunk_size=256, impl="chunked")

    def torch_fb():
        return torch.autograd.grad(torch_f(), (q, k, v), do)

    if TORCH_CHUNKED and elapsed() < budget:
        time_impl("attnlab PyTorch chunked (256-token chunks)", N, torch_f, torch_fb, rows)


def section_timings(budget: float) -> None:
    rows: list[dict] = []
    RESULTS["timings"] = rows
    fla = fla_functions()
    if fla is not None:
        RESULTS["fla_version"] = fla[2]
    for N in LENGTHS:
        if elapsed() > budget:
            log("time budget spent: stopping timings")
            break
        time_length(N, fla, rates(), rows, budget)
        torch.cuda.empty_cache()


# Launch variants compared in the same run; the best one (by fwd+bwd time at the first and the last
# length, among those whose forward error stays under 2.3e-3, which keeps the gradients under 3e-3)
# is used for the timings section.
# "chunk_size" is passed to the call; every other key goes to attnlab.kernels.lightning.TUNING.
VARIANTS = [
    {"precise": 7, "block_v": 128},
    {"precise": 5, "block_v": 128},
    {"precise": 7, "block_v": 128, "fused_bwd": True},
    {"precise": 5, "block_v": 128, "fused_bwd": True},
    {"precise": 0, "block_v": 128, "fused_bwd": True},
    {"precise": 3, "block_v": 128, "fused_bwd": True},
    {"precise": 7},
    {"precise": 5},
    {"precise": 5, "fused_bwd": True},
    {"precise": 5, "chunk_size": 128},
    {"precise": 5, "block_v": 32, "num_warps": 4},
    {"precise": 0},
]
SEGMENT_VARIANTS = [{"segments_per_wave": 1}, {"segments_per_wave": 4}, {"segments_per_wave": 8}]
CHUNK = 64
FLA_LINEAR = True
TORCH_CHUNKED = True


def apply_variant(base: dict, variant: dict) -> None:
    global CHUNK
    K.TUNING.clear()
    K.TUNING.update(base)
    K.TUNING.update({key: value for key, value in variant.items() if key != "chunk_size"})
    CHUNK = int(variant.get("chunk_size", 64))


def time_variants(N: int, base: dict, variants: list[dict], rows: list[dict], budget: float) -> None:
    s = rates()
    q, k, v = anchor_inputs(N, requires_grad=True)
    do = torch.randn_like(q)
    ref = reference64(q.detach()[:1], k.detach()[:1], v.detach()[:1], s) if N <= LENGTHS[-2] else None

    def fwd():
        return K.lightning_attention_triton(q, k, v, decay=s, chunk_size=CHUNK)

    def fwd_bwd():
        return torch.autograd.grad(fwd(), (q, k, v), do)

    for variant in variants:
        if elapsed() > budget:
            log("time budget spent: stopping variants")
            return
        apply_variant(base, variant)
        try:
            err = rel(fwd()[:1], ref) if ref is not None else None
            t_f, t_fb = bench(fwd), bench(fwd_bwd)
        except Exception as error:
            log(f"variant {variant} failed: {error!r}")
            continue
        rows.append({"N": N, "variant": variant, "fwd_ms": t_f, "fwd_bwd_ms": t_fb, "rel_err": err})
        log(rows[-1])


def section_variants(budget: float) -> None:
    """Measure the launch variants, then keep the best one in K.TUNING / CHUNK for what follows."""
    rows: list[dict] = []
    RESULTS["variants"] = rows
    base = dict(K.TUNING)
    for N in VARIANT_LENGTHS:
        time_variants(N, base, VARIANTS, rows, budget)
        torch.cuda.empty_cache()
    first, last = VARIANT_LENGTHS[0], VARIANT_LENGTHS[-1]
    scores = []
    for variant in VARIANTS:
        mine = {r["N"]: r for r in rows if r["variant"] == variant}
        if first in mine and last in mine and (mine[first]["rel_err"] or 1.0) < 2.3e-3:
            scores.append((mine[first]["fwd_bwd_ms"] + mine[last]["fwd_bwd_ms"], VARIANTS.index(variant)))
    best = VARIANTS[min(scores)[1]] if scores else {}
    segment_rows: list[dict] = []
    time_variants(last, base, [{**best, **seg} for seg in SEGMENT_VARIANTS], segment_rows, budget)
    rows.extend(segment_rows)
    best_seg: dict = {}
    at_last = [r for r in rows if r["N"] == last and (r["variant"] == best or r in segment_rows)]
    if at_last:
        best_seg = min(at_last, key=lambda r: r["fwd_bwd_ms"])["variant"]
    chosen = {**best, **best_seg}
    apply_variant(base, chosen)
    RESULTS["chosen_variant"] = chosen
    log(f"chosen variant: {chosen}")


def phase_times(N: int) -> dict:
    s = rates()
    q, k, v = anchor_inputs(N)
    B = TOKENS // N
    n_seg, seg_len = K._plan_segments(B * H * max(1, D // 64), N, 64, q.device, None)
    common = dict(heads=H, rate=s, scale=1.0, reverse=False, s0_shift=False, scale_out=True, out_dtype=None,
                  chunk=64)
    row = {"N": N, "n_seg": n_seg, "seg_len": seg_len}
    row["scan_ms"] = bench(lambda: K._scan(q, k, v, s0=None, need_final=False, segments=None, **common))
    row["one_segment_ms"] = bench(lambda: K._scan(q, k, v, s0=None, need_final=False, segments=1, **common))
    if n_seg > 1:
        local = torch.randn(B, H, n_seg, D, D, device=DEVICE)
        row["segment_scan_ms"] = bench(lambda: K._segment_initial_states(local, None, s, seg_len, seg_len,
                                                                         s0_shift=False, need_final=False))
    row["GBps_over_scan"] = 4 * q.numel() * 2 / (row["scan_ms"] * 1e-3) / 1e9
    return row


def section_phases() -> None:
    """The forward scan alone, with and without segments, and the segment scan in PyTorch."""
    rows = []
    for N in VARIANT_LENGTHS:
        rows.append(phase_times(N))
        log(rows[-1])
    RESULTS["phases"] = rows


def compiled_kernels() -> list[dict]:
    """Registers, spills and shared memory of every compiled specialization of the scan kernel."""
    rows = []
    try:
        for cache in K._chunk_scan_kernel.device_caches.values():
            for key, kernel in cache[0].items():
                rows.append({"key": str(key)[-160:], "regs": getattr(kernel, "n_regs", None),
                             "spills": getattr(kernel, "n_spills", None),
                             "shared": getattr(getattr(kernel, "metadata", None), "shared", None)})
    except Exception as error:
        rows.append({"error": repr(error)})
    return rows


def print_tables() -> None:
    print("\n## correctness")
    print("| check | rel. err | limit | ok |\n|---|---|---|---|")
    for r in RESULTS.get("correctness", []):
        e = r["rel_err"]
        e = ", ".join(f"{n} {x:.1e}" for n, x in e.items()) if isinstance(e, dict) else f"{e:.2e}"
        print(f"| {r['check']} | {e} | {r['limit']:.0e} | {'yes' if r['ok'] else 'NO'} |")
    print("\n## timings (bf16, H=16, D=128, B*N=65536, causal)")
    print("| implementation | N | B | fwd ms | fwd+bwd ms | peak GiB | rel. err |\n|---|---|---|---|---|---|---|")
    for r in RESULTS.get("timings", []):
        e = "–" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(f"| {r['impl']} | {r['N']} | {r['B']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['peak_GiB']:.2f} | {e} |")
    if RESULTS.get("variants"):
        print("\n## variants (attnlab triton, per-head decay)")
        print("| N | variant | fwd ms | fwd+bwd ms | rel. err (fwd, b=0) |\n|---|---|---|---|---|")
        for r in RESULTS["variants"]:
            e = "–" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
            print(f"| {r['N']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {e} |")
        print("chosen:", RESULTS.get("chosen_variant"))
    if RESULTS.get("phases"):
        print("\n## phases")
        for r in RESULTS["phases"]:
            print(r)
    for r in RESULTS.get("compiled", []):
        if r.get("spills") or "error" in r:
            print("compiled:", r)
    print("compiled kernels:", len(RESULTS.get("compiled", [])), "max regs:",
          max((r.get("regs") or 0 for r in RESULTS.get("compiled", [])), default=None))
    if "ceilings" in RESULTS:
        print("\nceilings:", RESULTS["ceilings"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    parser.add_argument("--budget", type=float, default=400.0, help="seconds before later sections are skipped")
    parser.add_argument("--sections", default="1,2,3,4,5")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--no-fla-linear", action="store_true", help="leave out fla chunk_linear_attn")
    parser.add_argument("--no-torch-chunked", action="store_true", help="leave out the PyTorch chunked rows")
    args = parser.parse_args()
    out_dir = Path(args.out)
    sections = {int(x) for x in args.sections.split(",")}
    global DEVICE, SMOKE, H, D, TOKENS, LENGTHS, VARIANT_LENGTHS, GRAD_CASES, FLA_LINEAR, TORCH_CHUNKED
    FLA_LINEAR = not args.no_fla_linear
    TORCH_CHUNKED = not args.no_torch_chunked
    if args.smoke:
        DEVICE, SMOKE, H, D, TOKENS, LENGTHS, VARIANT_LENGTHS = "cpu", True, 2, 16, 256, (64, 128, 256), (64, 256)
        GRAD_CASES = ((torch.bfloat16, 2, 64, 8e-3), (torch.float32, 1, 130, 1e-4))
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.synchronize = lambda: None
        torch.cuda.empty_cache = lambda: None
    elif not torch.cuda.is_available():
        print("no CUDA device: this script needs a GPU")
        raise SystemExit(1)
    RESULTS["env"] = {"torch": torch.__version__, "triton": triton.__version__,
                      "device": "cpu (smoke)" if SMOKE else torch.cuda.get_device_name(),
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log(RESULTS["env"])
    steps = [(1, section_ceilings, ()), (4, section_variants, (args.budget * 0.33,)), (2, section_correctness, ()),
             (3, section_timings, (args.budget * 0.97,)), (5, section_phases, ())]
    for number, fn, fn_args in steps:
        if number not in sections:
            continue
        if elapsed() > args.budget:
            log(f"budget spent before section {number}")
            break
        try:
            fn(*fn_args)
        except Exception as error:
            log(f"section {number} failed: {error!r}")
            traceback.print_exc()
            RESULTS.setdefault("failures", []).append(f"section {number}: {error!r}")
        save(out_dir)
        torch.cuda.empty_cache()
    RESULTS["compiled"] = compiled_kernels()
    print_tables()
    save(out_dir)
    if any(not r["ok"] for r in RESULTS.get("correctness", [])):
        print("CORRECTNESS FAILURES")
        raise SystemExit(2)


if __name__ == "__main__":
    main()

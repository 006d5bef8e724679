"""Context parallelism (``attnlab.distributed``) against the single-process op, on 2 and 4 gloo processes.

Each world size is spawned once (processes on 127.0.0.1, gloo, CPU); every rank draws the same whole
sequence, runs the op on it in one process (the reference, with its gradients), then runs
``context_parallel_attention`` on its shard and compares its shard of the output and of the gradients
(q, k, v, and the learned decay / initial state summed over ranks). The error cases run in the same
processes: every rank must raise, none may hang (the spawn has a timeout).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

TIMEOUT_S = 150
TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


@dataclass(frozen=True)
class Case:
    """One comparison: ``mechanism`` through ``strategy`` on ``world`` ranks against the op on one process."""

    world: int
    mechanism: str
    strategy: str
    layout: str = "contiguous"
    causal: bool = False
    length: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    value_dim: int = 8  # != head_dim: the ring's explicit einsum blocks instead of the CPU flash kernels
    options: dict[str, Any] = field(default_factory=dict)
    learned_decay: bool = False  # lightning: decay is a tensor that needs a gradient
    state: bool = False  # pass initial_state and return_state
    dtype: str = "float32"  # "bfloat16": compared with the op in float64 on the same rounded inputs

    @property
    def tolerance(self) -> float:
        """float32: max error relative to the largest entry; bfloat16: relative Frobenius error."""
        return TOLERANCE if self.dtype == "float32" else BF16_TOLERANCE

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in sorted(self.options.items()))
        flags = ("-decay" if self.learned_decay else "") + ("-state" if self.state else "")
        flags += "" if self.dtype == "float32" else f"-{self.dtype}"
        gqa = f"H{self.heads}kv{self.kv_heads}" + (f"-Dv{self.value_dim}" if self.value_dim != self.head_dim else "")
        return (f"W{self.world}-{self.mechanism}-{self.strategy}-{self.layout}-"
                f"{'causal' if self.causal else 'bidir'}-N{self.length}-{gqa}{extra}{flags}")


def _cases() -> list[Case]:
    cases: list[Case] = []
    for world in (2, 4):
        for layout in ("contiguous", "zigzag"):
            for causal in (True, False):
                cases.append(Case(world, "softmax", "ring", layout, causal))
                cases.append(Case(world, "linear", "state", layout, causal))
                cases.append(Case(world, "sliding_window", "halo", layout, causal, options={"window": 3}))
                if world == 2 or layout == "zigzag":
                    cases.append(Case(world, "neighborhood", "halo", layout, causal, options={"kernel_size": 3}))
            cases.append(Case(world, "lightning", "state", layout, True, learned_decay=True))
        # N not divisible by the chunks: padded at the end, length= says the real length
        cases.append(Case(world, "softmax", "ring", "zigzag", False, length=13))
        cases.append(Case(world, "softmax", "ring", "contiguous", True, length=15))
        cases.append(Case(world, "lightning", "state", "contiguous", True, length=14, learned_decay=True, state=True))
        cases.append(Case(world, "linear", "state", "zigzag", False, length=13, state=True))
        cases.append(Case(world, "sliding_window", "halo", "contiguous", False, length=30, options={"window": 5}))
        cases.append(Case(world, "softmax", "ulysses", "zigzag", True, length=14, kv_heads=4))
        cases.append(Case(world, "softmax", "ring", "zigzag", True, length=30, value_dim=4))
    world = 2
    cases += [
        Case(world, "lightning", "state", "zigzag", True, learned_decay=True, state=True, length=24),
        Case(world, "linear", "state", "contiguous", True, state=True),
        Case(world, "lightnet", "state", "contiguous", True, state=True),
        Case(world, "lightnet", "state", "zigzag", False),
        Case(world, "softmax", "ring", "zigzag", True, kv_heads=1, length=32),
        Case(world, "softmax", "ring", "zigzag", True, value_dim=6),
        Case(world, "softmax", "ring", "contiguous", False, value_dim=6, length=13),
        Case(world, "neighborhood", "halo", "contiguous", False, length=32,
             options={"kernel_size": 5, "stride": 2, "dilation": 2}),
        Case(world, "neighborhood", "halo", "zigzag", True, length=32, options={"kernel_size": 5, "dilation": 2}),
        Case(world, "sliding_window", "halo", "zigzag", True, length=32, options={"window": 8}),
        Case(world, "sliding_window", "halo", "contiguous", True, options={"window": 12}),  # halo = a whole shard
        Case(world, "neighborhood", "halo", "contiguous", False, options={"kernel_size": 15}),
    ]
    for mechanism, causal, options in (
        ("softmax", True, {}), ("softmax", False, {}), ("linear", False, {}), ("lightning", True, {"decay": 0.3}),
        ("sliding_window", True, {"window": 4}), ("neighborhood", False, {"kernel_size": 3}),
        ("neighborhood", False, {"kernel_size": 3, "shape": (4, 4)}), ("agent", False, {}), ("flow", True, {}),
        ("flow", False, {}), ("hip", True, {}), ("lightnet", False, {}),
    ):
        cases.append(Case(world, mechanism, "ulysses", "contiguous", causal, options=options))
    cases.append(Case(world, "lightning", "ulysses", "zigzag", True, learned_decay=True))
    for case in (  # bfloat16 at a realistic length
        Case(world, "softmax", "ring", "zigzag", True, length=512, head_dim=64, value_dim=64),
        Case(world, "softmax", "ring", "contiguous", False, length=512, head_dim=64, value_dim=64),
        Case(world, "lightning", "state", "contiguous", True, length=512, head_dim=64, value_dim=64,
             learned_decay=True),
        Case(world, "linear", "state", "zigzag", True, length=512, head_dim=64, value_dim=64,
             options={"chunk_size": 64}),
        Case(world, "sliding_window", "halo", "contiguous", True, length=512, head_dim=64, value_dim=64,
             options={"window": 64}),
        Case(world, "softmax", "ulysses", "contiguous", True, length=512, head_dim=64, value_dim=64),
    ):
        cases.append(dataclasses.replace(case, dtype="bfloat16"))
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------------------------------
# what each rank runs


def _relative(a: torch.Tensor, b: torch.Tensor, *, frobenius: bool = False) -> float:
    a, b = a.detach().double(), b.detach().double()
    if frobenius:
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    scale = float(b.abs().max()) or 1.0
    return float((a - b).abs().max()) / scale


def _draw(case: Case, seed: int) -> dict[str, Any]:
    import attnlab

    record = attnlab.get(case.mechanism)
    generator = torch.Generator().manual_seed(seed)
    B, H, Hkv, N, D = 2, case.heads, case.kv_heads, case.length, case.head_dim
    q = torch.randn(B, H, N, D, generator=generator)
    k = torch.randn(B, Hkv, N, D, generator=generator)
    v = torch.randn(B, Hkv, N, case.value_dim, generator=generator)
    options = {**dict(record.check.options), **case.options}
    if case.mechanism in ("sliding_window", "neighborhood"):
        options = dict(case.options)
    if case.learned_decay:
        options["decay"] = torch.rand(H, generator=generator) * 0.5 + 0.05
    if case.state:
        if case.mechanism == "lightning":
            options["initial_state"] = torch.randn(B, H, D, D, generator=generator)
        else:
            z = torch.randn(B, H, D, generator=generator)
            z = z.abs() + 1 if case.mechanism == "linear" else z  # linear: positive normaliser, as phi(k) sums give
            options["initial_state"] = (torch.randn(B, H, D, D, generator=generator), z)
        options["return_state"] = True
    return {"q": q, "k": k, "v": v, "options": options, "generator": generator}


def _leaves(options: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The learned tensors among the options (decay, initial state), by name."""
    out = {}
    if isinstance(options.get("decay"), torch.Tensor):
        out["decay"] = options["decay"]
    state = options.get("initial_state")
    if isinstance(state, torch.Tensor):
        out["initial_state"] = state
    elif isinstance(state, tuple):
        out.update({f"initial_state{i}": s for i, s in enumerate(state)})
    return out


def _with_leaves(options: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``options`` whose learned tensors are fresh leaves that require a gradient."""
    options = dict(options)
    if isinstance(options.get("decay"), torch.Tensor):
        options["decay"] = options["decay"].clone().requires_grad_()
    state = options.get("initial_state")
    if isinstance(state, torch.Tensor):
        options["initial_state"] = state.clone().requires_grad_()
    elif isinstance(state, tuple):
        options["initial_state"] = tuple(s.clone().requires_grad_() for s in state)
    return options


def _compare(case: Case, seed: int) -> dict[str, float]:
    import torch.distributed as dist

    import attnlab
    from attnlab.distributed import context_parallel_attention, shard_sequence

    world, rank = dist.get_world_size(), dist.get_rank()
    drawn = _draw(case, seed)
    low = case.dtype != "float32"  # bfloat16: the reference is the op in float64 on the same rounded inputs
    dtype = getattr(torch, case.dtype)
    inputs = {name: drawn[name].to(dtype) for name in ("q", "k", "v")}
    reference_options = drawn["options"]
    if low:
        reference_options = {name: value.double() if isinstance(value, torch.Tensor) else value
                             for name, value in reference_options.items()}
    q, k, v = ((x.double() if low else x.clone()).requires_grad_() for x in inputs.values())
    options = _with_leaves(reference_options)
    result = attnlab.attention(q, k, v, mechanism=case.mechanism, causal=case.causal, **options)
    out, state = (result if case.state else (result, None))
    g = torch.randn(out.shape, generator=drawn["generator"], dtype=out.dtype)
    g_state = None
    loss = (out * g).sum()
    if state is not None:
        g_state = [torch.randn(s.shape, generator=drawn["generator"]) for s in _as_tuple(state)]
        loss = loss + sum((s * gs).sum() for s, gs in zip(_as_tuple(state), g_state, strict=True))
    loss.backward()

    pad = case.length % (world * (2 if case.layout == "zigzag" else 1)) != 0

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, layout=case.layout, pad=pad)

    ql, kl, vl = (shard(x).requires_grad_() for x in inputs.values())
    local_options = _with_leaves(drawn["options"])
    result_l = context_parallel_attention(ql, kl, vl, mechanism=case.mechanism, strategy=case.strategy,
                                          layout=case.layout, causal=case.causal,
                                          length=case.length if pad else None, **local_options)
    out_l, state_l = (result_l if case.state else (result_l, None))
    loss_l = (out_l * shard(g).to(dtype)).sum()
    if state_l is not None and rank == world - 1:  # the final state enters the loss once
        loss_l = loss_l + sum((s * gs).sum() for s, gs in zip(_as_tuple(state_l), g_state, strict=True))
    loss_l.backward()

    if low:  # padded rows are exactly zero on both sides; compare the real ones
        errors = {"out": _relative(out_l, shard(out.detach()), frobenius=True)}
    else:
        errors = {"out": _relative(out_l, shard(out.detach()))}
    for name, local, whole in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        errors[name] = _relative(local.grad, shard(whole.grad), frobenius=low)
    if state_l is not None:
        for i, (a, b) in enumerate(zip(_as_tuple(state_l), _as_tuple(state), strict=True)):
            errors[f"final_state{i}"] = _relative(a.detach(), b.detach(), frobenius=low)
    reference_leaves, local_leaves = _leaves(options), _leaves(local_options)
    for name, leaf in local_leaves.items():  # replicated inputs: the gradient is summed over ranks
        grad = leaf.grad.clone()
        dist.all_reduce(grad)
        errors[f"d{name}"] = _relative(grad, reference_leaves[name].grad, frobenius=low)
    return errors


def _as_tuple(state: Any) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, tuple | list) else (state,)


def _errors_on_bad_input() -> dict[str, str]:
    """Each bad request on this rank: the error type and message (or 'no error')."""
    import torch.distributed as dist

    from attnlab.distributed import context_parallel_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    q = torch.randn(1, 4, 8, 8)
    k = v = torch.randn(1, 2, 8, 8)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    bad: dict[str, Any] = {
        "shard_lengths": lambda: context_parallel_attention(q[:, :, : 8 - 2 * rank], k[:, :, : 8 - 2 * rank],
                                                            v[:, :, : 8 - 2 * rank], mechanism="softmax"),
        "group_of_one": lambda: context_parallel_attention(q, k, v, mechanism="softmax", group=singles[rank]),
        "strategy_cannot_serve": lambda: context_parallel_attention(q, k, v, mechanism="linear", strategy="ring"),
        "halo_needs_local_window": lambda: context_parallel_attention(q, k, v, mechanism="agent",
                                                                      strategy="halo"),
        "ulysses_heads": lambda: context_parallel_attention(q[:, :3], k[:, :1], v[:, :1], mechanism="softmax",
                                                            strategy="ulysses"),
        "window_longer_than_chunk": lambda: context_parallel_attention(q, k, v, mechanism="sliding_window",
                                                                       strategy="halo", window=10, causal=True),
        "one_rank_bad_dtype": lambda: context_parallel_attention(q if rank else q.double(), k, v,
                                                                 mechanism="softmax"),
        "options_differ": lambda: context_parallel_attention(q, k, v, mechanism="sliding_window",
                                                             window=2 + rank, causal=True),
        "unknown_option": lambda: context_parallel_attention(q, k, v, mechanism="softmax", strategy="ring",
                                                             window=3),
    }
    seen = {}
    for name, call in bad.items():
        try:
            call()
            seen[name] = "no error"
        except Exception as error:  # noqa: BLE001 - the test compares the type and text
            seen[name] = f"{type(error).__name__}: {error}"
    return seen


def _auto_choices() -> dict[str, str]:
    """Which strategy "auto" picks (read from the debug log) for a few mechanisms."""
    from attnlab.distributed import context_parallel_attention

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("attnlab.distributed")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Collect())
    chosen = {}
    for label, kv_heads, mechanism, options in (
        ("softmax-mqa", 1, "softmax", {"causal": True}), ("softmax-mha", 4, "softmax", {"causal": True}),
        ("lightning", 2, "lightning", {}), ("linear", 2, "linear", {}),
        ("sliding_window", 2, "sliding_window", {"window": 3}), ("agent", 2, "agent", {"num_agents": 4}),
    ):
        q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, kv_heads, 16, 8), torch.randn(1, kv_heads, 16, 8)
        records.clear()
        context_parallel_attention(q, k, v, mechanism=mechanism, **options)
        chosen[label] = records[-1].split("-> strategy=")[1].split(" ")[0]
    return chosen


LM_MECHANISMS = {  # label: LanguageModel options (auto picks the strategy named in the label)
    "softmax-mqa-ring": {"mechanism": "softmax", "kv_heads": 1},
    "softmax-mqa-ring-zigzag": {"mechanism": "softmax", "kv_heads": 1, "context_parallel_layout": "zigzag"},
    "softmax-ulysses": {"mechanism": "softmax"},
    "lightning-state": {"mechanism": "lightning", "decay": 0.2},
    "sliding_window-halo": {"mechanism": "sliding_window", "window": 5},
}


def _train_language_model(options: dict[str, Any], *, steps: int = 10) -> dict[str, list[float]]:
    """Losses of ``steps`` Adam steps on one process and with each sequence split over the ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from attnlab.distributed import shard_sequence
    from attnlab.models import LanguageModel

    vocab, B, N = 32, 2, 16
    options = dict(options)
    layout = options.pop("context_parallel_layout", "contiguous")
    torch.manual_seed(0)
    whole = LanguageModel(vocab, 32, 2, 4, max_len=N, **options)
    sharded = LanguageModel(vocab, 32, 2, 4, max_len=N, context_parallel_group=dist.group.WORLD,
                            context_parallel_layout=layout, **options)
    sharded.load_state_dict(whole.state_dict())
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (whole, sharded)]
    generator = torch.Generator().manual_seed(1)
    losses: dict[str, list[float]] = {"one_process": [], "sharded": []}
    tokens = torch.randint(vocab, (B, N + 1), generator=generator)  # one batch, learned by heart
    for _ in range(steps):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        loss = F.cross_entropy(whole(inputs).reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        losses["one_process"].append(float(loss))
        # sharded: each rank's share of the mean over all B * N tokens; gradients summed over ranks
        logits = sharded(shard_sequence(inputs, dim=1, layout=layout))  # (B, n, vocab)
        local = F.cross_entropy(logits.reshape(-1, vocab),
                                shard_sequence(targets, dim=1, layout=layout).reshape(-1), reduction="sum") / (B * N)
        local.backward()
        for parameter in sharded.parameters():
            dist.all_reduce(parameter.grad)
        total = local.detach().clone()
        dist.all_reduce(total)
        losses["sharded"].append(float(total))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return losses


def _sharding_checks() -> dict[str, float]:
    """shard_sequence then gather_sequence gives the sequence back; gather_sequence's gradient sums over ranks."""
    import torch.distributed as dist

    from attnlab.distributed import gather_sequence, shard_sequence

    world = dist.get_world_size()
    generator = torch.Generator().manual_seed(3)
    errors = {}
    for layout in ("contiguous", "zigzag"):
        for N in (8 * world, 8 * world + 3):
            x = torch.randn(2, 3, N, 4, generator=generator)
            g = torch.randn(2, 3, N, 4, generator=generator)
            local = shard_sequence(x, layout=layout, pad=N % (2 * world) != 0).requires_grad_()
            whole = gather_sequence(local, layout=layout, length=N)
            (whole * g).sum().backward()  # every rank's loss reads every shard: W copies of g reach each
            label = f"{layout}-N{N}"
            errors[f"{label}-values"] = float((whole.detach() - x).abs().max())
            expected = world * shard_sequence(g, layout=layout, pad=N % (2 * world) != 0)
            errors[f"{label}-grad"] = float((local.grad - expected).abs().max())
    tokens = torch.arange(2 * 4 * world).reshape(2, 4 * world)  # [B, N] along dim=1, as LanguageModel takes
    errors["tokens-dim1"] = float((gather_sequence(shard_sequence(tokens, dim=1), dim=1) - tokens).abs().max())
    return errors


def _traffic_checks() -> dict[str, list[int]]:
    """Bytes this rank sent in one forward and backward pass of each strategy, and the formula's figure."""
    import torch.distributed as dist

    from attnlab.distributed import context_parallel_attention, strategy_bytes, traffic

    world, rank = dist.get_world_size(), dist.get_rank()
    B, H, Hkv, n, D = 1, 4, world, 16, 8
    found = {}
    for strategy, mechanism, options in (("ring", "softmax", {"causal": True}), ("ulysses", "softmax", {}),
                                         ("state", "lightning", {}), ("halo", "sliding_window", {"window": 5})):
        for layout in ("contiguous", "zigzag"):
            q = torch.randn(B, H, n, D, requires_grad=True)
            k, v = (torch.randn(B, Hkv, n, D, requires_grad=True) for _ in range(2))
            with traffic() as sent:
                out = context_parallel_attention(q, k, v, mechanism=mechanism, strategy=strategy, layout=layout,
                                                 **options)
                out.sum().backward()
            reach = (4, 0) if mechanism == "sliding_window" else (0, 0)  # causal window 5: 4 keys back
            formula = strategy_bytes(strategy, mechanism=mechanism, world=world, batch=B, heads=H, kv_heads=Hkv,
                                     local_length=n, head_dim=D, value_dim=D, layout=layout, reach=reach, rank=rank)
            found[f"{strategy}-{layout}"] = [sent.total, formula]
    return found


def _quality_job(*, context_parallel: int) -> dict[str, Any]:
    """The quality benchmark's smoke MQAR job for softmax, trained with ``context_parallel`` ranks per sequence."""
    from attnlab.bench.presets import get_preset
    from attnlab.bench.quality_jobs import Job, run_job

    config = get_preset("smoke").tasks["mqar"][0]
    result, _ = run_job(Job("mqar", "softmax", 0, config, "smoke"), context_parallel=context_parallel)
    return {"loss_curve": result["loss_curve"], "metrics": result["metrics"],
            "context_parallel": result["context_parallel"]}


def _worker(rank: int, world: int, port: int, out_dir: str, ids: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    report: dict[str, Any] = {"cases": {}, "errors": {}, "auto": {}}
    try:
        for index, case in enumerate(c for c in CASES if c.id in ids):
            try:
                report["cases"][case.id] = _compare(case, seed=1000 + index)
            except Exception:  # noqa: BLE001 - reported per case; a broken case must not hang the others
                report["cases"][case.id] = {"exception": traceback.format_exc()}
                raise
        report["sharding"] = _sharding_checks()
        report["traffic"] = _traffic_checks()
        report["errors"] = _errors_on_bad_input()
        if world == 2:
            report["auto"] = _auto_choices()
            report["lm"] = {label: _train_language_model(options) for label, options in LM_MECHANISMS.items()}
            report["quality"] = _quality_job(context_parallel=2)
        report["after_errors"] = _compare(Case(world, "softmax", "ring", "zigzag", True), seed=7)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@cache
def _spawn(world: int) -> tuple[str | None, tuple[dict[str, Any], ...]]:
    ids = [c.id for c in CASES if c.world == world]
    # a fork server that imported torch and attnlab once: each rank starts in milliseconds instead of
    # importing torch again (seconds per process on a loaded machine), and never inherits OpenMP threads
    mp.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed", "attnlab.ops", "attnlab.nn",
                                                         "attnlab.distributed"])
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, _free_port(), out_dir, ids), nprocs=world, join=False,
                                     start_method="forkserver")
        deadline = time.monotonic() + TIMEOUT_S
        problem = f"{world} processes did not finish in {TIMEOUT_S} s (a hang?)"
        while time.monotonic() < deadline:
            try:
                if context.join(timeout=1):
                    problem = None
                    break
            except Exception as error:  # noqa: BLE001 - a rank failed: report it with what the others wrote
                problem = f"a rank failed: {error}"
                break
        for process in context.processes:
            if process.is_alive():
                process.kill()
        files = [Path(out_dir, f"rank{r}.json") for r in range(world)]
        reports = tuple(json.loads(f.read_text()) if f.exists() else {"cases": {}} for f in files)
        return problem, reports


def run_world(world: int) -> tuple[dict[str, Any], ...]:
    """Spawn ``world`` processes once for every case of that size; the reports of every rank."""
    problem, reports = _spawn(world)
    if problem is not None:
        pytest.fail(problem + "\n" + json.dumps([r.get("cases", {}) for r in reports])[-4000:])
    return reports


# ----------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_single_process(case: Case) -> None:
    reports = run_world(case.world)
    for rank, report in enumerate(reports):
        errors = report["cases"][case.id]
        assert "exception" not in errors, f"rank {rank}:\n{errors.get('exception')}"
        expected = {"out", "dq", "dk", "dv"} | ({"ddecay"} if case.learned_decay else set())
        assert expected <= set(errors)
        if case.state:
            assert any(name.startswith("final_state") for name in errors)
            assert any(name.startswith("dinitial_state") for name in errors)
        worst = {name: value for name, value in errors.items() if not value <= case.tolerance}
        assert not worst, f"rank {rank}: relative errors above {case.tolerance}: {worst}"


@pytest.mark.parametrize("world", [2, 4])
def test_bad_input_raises_on_every_rank(world: int) -> None:
    reports = run_world(world)
    expected = {
        "shard_lengths": ("ValueError", "disagree on local_length"),
        "group_of_one": ("ValueError", "group has 1 rank"),
        "strategy_cannot_serve": ("ValueError", "strategy='ring' serves mechanism='softmax' only"),
        "halo_needs_local_window": ("ValueError", "strategy='halo' serves sliding_window, neighborhood only"),
        "ulysses_heads": ("ValueError", "H=3 and H_kv=1 must both be multiples of"),
        # causal window 10 over shards of 8: on 2 ranks the halo is the whole first shard (8 keys back at
        # most), on 4 ranks the third shard would need 9 keys from two shards back
        "window_longer_than_chunk": ("ValueError" if world == 4 else "no error", "more than one chunk"),
        "one_rank_bad_dtype": ("TypeError", "rank 0 refused its input"),
        "options_differ": ("ValueError", "disagree on a fingerprint of options"),
        "unknown_option": ("TypeError", "has no option(s) window"),
    }
    for name, (kind, text) in expected.items():
        messages = [report["errors"][name] for report in reports]
        for rank, message in enumerate(messages):
            assert message.startswith(kind), f"{name}, rank {rank}: {message}"
            if kind != "no error":
                assert text in message, f"{name}, rank {rank}: {message}"
        if name != "group_of_one" and kind != "no error":
            assert len(set(messages)) == 1, f"{name}: the ranks raised different errors: {messages}"
    for rank, report in enumerate(reports):  # the ranks are still in step after the errors
        assert max(report["after_errors"].values()) <= TOLERANCE, f"rank {rank}: {report['after_errors']}"


def test_auto_picks_the_cheapest_exact_strategy() -> None:
    # bytes per rank (forward + backward, float32, W=2, B=1, H=4, n=16, D=8), worked out by hand:
    # softmax with one key/value head: Ulysses cannot split it, ring only; with 4 heads: ring sends
    # 2*(1*4*16*16)*4 + 2*(1*4*16*16)*4 = 16384, Ulysses 2*(16*(32+64+32)/2)*4 = 8192;
    # lightning's state 4*8*8 floats: 2*256*4 = 2048 < Ulysses 2*(16*(32+32+32)/2)*4 = 6144;
    # sliding window 3: two halo keys, 2*2*(2*16)*4 = 512; agent attention: Ulysses only
    for report in run_world(2):
        assert report["auto"] == {"softmax-mqa": "ring", "softmax-mha": "ulysses", "lightning": "state",
                                  "linear": "state", "sliding_window": "halo", "agent": "ulysses"}


@pytest.mark.parametrize("label", list(LM_MECHANISMS))
def test_language_model_trained_on_two_ranks_matches_one_process(label: str) -> None:
    for rank, report in enumerate(run_world(2)):
        losses = report["lm"][label]
        assert len(losses["sharded"]) == 10
        assert losses["one_process"][-1] < losses["one_process"][0]  # it trained
        worst = max(abs(a - b) for a, b in zip(losses["sharded"], losses["one_process"], strict=True))
        assert worst <= TOLERANCE, f"rank {rank}: {losses}"


@pytest.mark.parametrize("world", [2, 4])
def test_shard_then_gather_round_trip_and_gradient(world: int) -> None:
    for rank, report in enumerate(run_world(world)):
        assert len(report["sharding"]) == 9
        assert max(report["sharding"].values()) <= 1e-6, f"rank {rank}: {report['sharding']}"


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_sent_match_the_formula(world: int) -> None:
    for rank, report in enumerate(run_world(world)):
        assert len(report["traffic"]) == 8
        for name, (measured, formula) in report["traffic"].items():
            assert measured == formula, f"rank {rank}, {name}: sent {measured} bytes, the formula says {formula}"


def test_quality_benchmark_context_parallel_matches_one_process() -> None:
    """``bench quality --context-parallel 2``'s training loop: the loss curve and metrics of one process."""
    reference = _quality_job(context_parallel=1)  # here, without torch.distributed
    for rank, report in enumerate(run_world(2)):
        sharded = report["quality"]
        assert sharded["context_parallel"] == 2 and reference["context_parallel"] == 1
        assert [step for step, _ in sharded["loss_curve"]] == [step for step, _ in reference["loss_curve"]]
        for (_, a), (_, b) in zip(sharded["loss_curve"], reference["loss_curve"], strict=True):
            assert abs(a - b) <= TOLERANCE * abs(b), f"rank {rank}: {sharded['loss_curve']} vs {reference}"
        assert sharded["metrics"]["accuracy"] == reference["metrics"]["accuracy"]
        assert abs(sharded["metrics"]["test_loss"] - reference["metrics"]["test_loss"]) <= 1e-4


def test_quality_benchmark_refuses_context_parallel_where_it_cannot_split(tmp_path: Path) -> None:
    from attnlab.bench.ddp import worker_command
    from attnlab.bench.quality import QualityError, run_quality

    with pytest.raises(QualityError, match="decoder tasks; 'digits' is not one"):
        run_quality(tasks=["digits"], mechanisms=["softmax"], preset="smoke", out_dir=tmp_path, context_parallel=2)
    with pytest.raises(QualityError, match="mechanism 'tnl' has its own layer"):
        run_quality(tasks=["mqar"], mechanisms=["tnl"], preset="smoke", out_dir=tmp_path, context_parallel=2)
    command = worker_command(tmp_path / "jobs.json", out_dir=tmp_path, nproc=4, context_parallel=2)
    assert command[command.index("--context-parallel") + 1] == "2" and "--nproc_per_node=4" in command


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)

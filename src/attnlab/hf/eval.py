"""Long-context evaluation of a causal LM with its attention replaced by attnlab mechanisms.

For each mechanism (``name:option=value:...``) and context length:

- perplexity and bits per byte on held-out text, in rolling windows (as lm-evaluation-harness'
  ``loglikelihood_rolling``, with overlap): window ``w`` holds the tokens ``[w * stride, w * stride + C)``;
  the first window scores all its next-token predictions, each later one only its last ``stride``
  tokens, so every scored token has at least ``C - stride`` tokens of context and the scored spans tile
  the text. The same tokens for every mechanism.
- needle-in-a-haystack: the analysis toolkit's needles, prompts and ROUGE-1 recall
  (:mod:`attnlab.analysis.retrieval`), greedy decoding with the KV cache.
- wall time, peak resident memory (sampled), and the mean number of keys each query attends
  (first attention layer, measured on the perplexity windows), so that quality can be plotted
  against the attention budget.

Results are rows of ``results.jsonl`` (appended one per row; a rerun skips the finished rows).
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnlab.hf import check_options, record_keys_attended, use
from attnlab.mechanism_spec import MechanismSpec, parse_spec

__all__ = ["MechanismSpec", "parse_mechanisms", "rolling_windows", "rolling_perplexity", "EvalConfig",
           "run_eval", "prefill_timing", "row_key", "heldout_text", "peak_rss", "needle_recall"]


def parse_mechanisms(text: str) -> list[MechanismSpec]:
    """Parse ``"softmax,hip:k_budget=256,sliding_window:window=256:sink_tokens=4"``.

    Entries are separated by commas; each is a mechanism name followed by ``:option=value`` parts
    (:func:`attnlab.mechanism_spec.parse_spec`: ints, floats, true/false, none, else strings). Every
    name and option is checked before anything runs.

    Raises:
        ValueError naming the malformed entry, an unknown option or a mechanism that is not compatible.
    """
    specs = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        try:
            spec = parse_spec(entry)
        except ValueError as error:
            raise ValueError(f"--mechanisms entry {error}") from None
        check_options(spec.name, dict(spec.options))
        specs.append(spec)
    if not specs:
        raise ValueError(f"--mechanisms {text!r} names no mechanism")
    return specs


def rolling_windows(n_tokens: int, context: int, stride: int, max_windows: int) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` of each window: tokens ``[begin, end)`` are the input; the
    predictions of tokens ``[first_scored, end)`` are scored (``first_scored > begin``)."""
    if not 0 < stride < context:  # stride == context would leave a window's first token without a predictor
        raise ValueError(f"stride={stride} must be in [1, context - 1 = {context - 1}]")
    if n_tokens < context + 1:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than context + 1 = {context + 1}")
    windows = []
    begin = 0
    while begin + context <= n_tokens and len(windows) < max_windows:
        windows.append((begin, begin + context, begin + 1 if begin == 0 else begin + context - stride))
        begin += stride
    return windows


@torch.no_grad()
def rolling_perplexity(model: Any, tokens: torch.Tensor, windows: Sequence[tuple[int, int, int]],
                       on_window: Callable[[], None] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the scored tokens and their number."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for begin, end, first in windows:
        ids = tokens[begin:end][None].to(device)  # (1, C)
        logits = model(input_ids=ids).logits[0].float()  # (C, V)
        targets = ids[0, first - begin:]  # the scored tokens
        predicted = logits[first - begin - 1:end - begin - 1]  # position t predicts token t + 1
        total += float(torch.nn.functional.cross_entropy(predicted, targets, reduction="sum"))
        count += targets.numel()
        if on_window is not None:
            on_window()
    return total, count


@contextmanager
def peak_rss(interval: float = 0.02) -> Iterator[dict[str, float]]:
    """Samples this process' resident memory (Linux ``/proc/self/statm``) while the block runs:
    ``{"start_mb", "peak_mb"}``; on CUDA the peak of ``torch.cuda.max_memory_allocated`` instead."""
    result: dict[str, float] = {}
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss() -> float:
        try:
            with open("/proc/self/statm") as stream:
                return int(stream.read().split()[1]) * page / 2**20
        except OSError:
            return float("nan")

    stop = threading.Event()
    result["start_mb"] = result["peak_mb"] = rss()

    def sample() -> None:
        while not stop.wait(interval):
            result["peak_mb"] = max(result["peak_mb"], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], rss())


def heldout_text(skip_chars: int = 60_000, chars: int = 140_000) -> str:
    """Plain Wikipedia paragraphs after the first ``skip_chars`` (the needle prompts take their
    haystack from the start: ``skip_chars`` covers contexts up to about 13k tokens)."""
    from attnlab.analysis.retrieval import wikipedia_haystack

    text = wikipedia_haystack(max_chars=skip_chars + chars)
    return text[skip_chars:]


@dataclass(frozen=True)
class EvalConfig:
    """What one ``attnlab eval`` run measures."""

    model: str
    mechanisms: tuple[MechanismSpec, ...]
    contexts: tuple[int, ...]
    out: Path
    windows: int = 4
    stride: int | None = None  # default: context // 2
    needle_depths: tuple[float, ...] = (0.5,)
    needle_tasks: int = 1
    needle_new_tokens: int = 24
    text_file: Path | None = None
    threads: int | None = None
    dtype: str = "float32"
    compare_sdpa: int = 0  # repeats of the interleaved SDPA vs attnlab_softmax prefill timing (0 = none)


def row_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies a finished row (a rerun skips rows with the same key)."""
    return (record.get("kind"), record.get("model"), record.get("label"), record.get("context"),
            record.get("windows"), record.get("stride"), tuple(record.get("needle_depths") or ()),
            record.get("needle_tasks"), record.get("text"), record.get("dtype"))


def prefill_timing(model: Any, ids: torch.Tensor, repeats: int) -> dict[str, Any]:
    """Interleaved prefill times of the model's own SDPA path and ``attnlab_softmax`` (same process,
    same input, alternating order): medians and their ratio."""
    previous = model.config._attn_implementation
    times: dict[str, list[float]] = {"sdpa": [], "attnlab_softmax": []}

    def once(name: str) -> None:
        if name == "sdpa":
            model.set_attn_implementation("sdpa")
            context: Any = _null()
        else:
            context = use(model, "softmax")
        with context, torch.no_grad():
            start = time.perf_counter()
            model(input_ids=ids)
            times[name].append(time.perf_counter() - start)

    try:
        once("sdpa")  # warm-up of both paths, not timed below
        once("attnlab_softmax")
        times = {"sdpa": [], "attnlab_softmax": []}
        for r in range(repeats):
            for name in (("sdpa", "attnlab_softmax") if r % 2 == 0 else ("attnlab_softmax", "sdpa")):
                once(name)
    finally:
        model.set_attn_implementation(previous)
    sdpa, ours = statistics.median(times["sdpa"]), statistics.median(times["attnlab_softmax"])
    return {"sdpa_s": sdpa, "attnlab_softmax_s": ours, "ratio": ours / sdpa, "repeats": repeats,
            "sdpa_all_s": times["sdpa"], "attnlab_softmax_all_s": times["attnlab_softmax"]}


def needle_recall(model: Any, tokenizer: Any, haystack: str, task: Any, context: int, depth: float, *,
                  max_new_tokens: int) -> float:
    """ROUGE-1 recall (x100) of one needle test: the analysis toolkit's prompt (``context`` tokens,
    needle at ``depth``), greedy decoding with the KV cache until end of sequence or a newline."""
    from attnlab.analysis.retrieval import build_needle_prompt, greedy_decode, rouge1_recall

    prompt, _ = build_needle_prompt(tokenizer, haystack, task, context, depth, buffer=min(200, context // 4))
    eos = tokenizer.eos_token_id

    def stop(token: int) -> bool:
        return token == eos or "\n" in tokenizer.decode([token])

    tokens = greedy_decode(model, prompt, max_new_tokens=max_new_tokens, stop=stop)
    return rouge1_recall(task.real_needle, tokenizer.decode(tokens, skip_special_tokens=True).strip())


@contextmanager
def _null() -> Iterator[None]:
    yield


def run_eval(config: EvalConfig, *, console: Any = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every (mechanism, context) row not yet in ``config.out / "results.jsonl"``; return all rows."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.analysis.models import load_model
    from attnlab.analysis.report import append_result, read_results
    from attnlab.analysis.retrieval import NEEDLE_TASKS, wikipedia_haystack

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if config.dtype not in dtypes:
        raise ValueError(f"dtype={config.dtype!r}; expected one of {', '.join(dtypes)}")
    if not 1 <= config.needle_tasks <= len(NEEDLE_TASKS) and config.needle_depths:
        raise ValueError(f"needle_tasks={config.needle_tasks} must be in [1, {len(NEEDLE_TASKS)}]")
    results = config.out / "results.jsonl"
    done = {row_key(r) for r in read_results(results)} if results.exists() else set()
    text_name = str(config.text_file) if config.text_file else "wikipedia-heldout"
    base = {"model": config.model, "windows": config.windows, "needle_depths": list(config.needle_depths),
            "needle_tasks": config.needle_tasks if config.needle_depths else 0, "text": text_name,
            "dtype": config.dtype}
    jobs = []
    for context in config.contexts:
        stride = config.stride or context // 2
        if config.compare_sdpa:
            jobs.append(("prefill_timing", None, context, stride))
        jobs += [("row", spec, context, stride) for spec in config.mechanisms]

    def record_of(kind: str, spec: MechanismSpec | None, context: int, stride: int) -> dict[str, Any]:
        label = spec.label if spec is not None else "sdpa vs attnlab_softmax"
        return {"kind": kind, "label": label, "context": context, "stride": stride, **base}

    jobs = [job for job in jobs if row_key(record_of(*job)) not in done]
    if not jobs:  # everything finished: nothing to load
        return read_results(results)
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        loaded = load_model(config.model, dtype=dtypes[config.dtype])
        if not loaded.causal:
            raise ValueError(f"model {config.model!r} is not a causal LM (an encoder): attnlab eval measures "
                             "next-token perplexity; use smollm2 or a causal LM folder")
        model, tokenizer = loaded.model, loaded.tokenizer
        text = Path(config.text_file).read_text() if config.text_file else heldout_text()
        tokens = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        haystack = wikipedia_haystack() if config.needle_depths else ""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
            rows_bar = bar.add_task("rows", total=len(jobs))
            for kind, spec, context, stride in jobs:
                record = record_of(kind, spec, context, stride)
                bar.update(rows_bar, description=f"{record['label']} @ {context}")
                if kind == "prefill_timing":
                    record.update(prefill_timing(model, tokens[:context][None], config.compare_sdpa))
                else:
                    record.update(_one_row(model, tokenizer, tokens, haystack, spec, context, stride, config,
                                           bar, NEEDLE_TASKS))
                append_result(results, record)
                bar.advance(rows_bar)
    finally:
        torch.set_num_threads(previous_threads)
    return read_results(results)


def _one_row(model: Any, tokenizer: Any, tokens: torch.Tensor, haystack: str, spec: MechanismSpec, context: int,
             stride: int, config: EvalConfig, bar: Any, needle_tasks: Sequence[Any]) -> dict[str, Any]:
    windows = rolling_windows(tokens.numel(), context, stride, config.windows)
    tests = [(t, d) for t in range(config.needle_tasks) for d in config.needle_depths]
    step = bar.add_task(f"  {spec.label} @ {context}", total=len(windows) + len(tests))
    start = time.perf_counter()
    with use(model, spec.name, **spec.options), peak_rss() as memory:
        with record_keys_attended() as keys:
            nll, count = rolling_perplexity(model, tokens, windows, on_window=lambda: bar.advance(step))
        ppl_seconds = time.perf_counter() - start
        recalls = []
        for task, depth in tests:
            recalls.append(needle_recall(model, tokenizer, haystack, needle_tasks[task], context, depth,
                                         max_new_tokens=config.needle_new_tokens))
            bar.advance(step)
    seconds = time.perf_counter() - start
    bar.remove_task(step)
    first, last = windows[0][2], windows[-1][1]
    scored_bytes = len(tokenizer.decode(tokens[first:last].tolist()).encode("utf-8"))
    return {"mechanism": spec.name, "options": dict(spec.options), "scored_tokens": count, "nll": nll,
            "perplexity": math.exp(nll / count), "bits_per_byte": nll / math.log(2) / scored_bytes,
            "scored_bytes": scored_bytes, "keys_attended": keys.mean(),
            "needle_recall": statistics.fmean(recalls) if recalls else None, "needle_tests": len(recalls),
            "perplexity_seconds": ppl_seconds, "seconds": seconds,
            "peak_rss_mb": memory["peak_mb"], "rss_increase_mb": memory["peak_mb"] - memory["start_mb"],
            "threads": torch.get_num_threads()}

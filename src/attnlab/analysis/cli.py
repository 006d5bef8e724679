"""``attnlab analyze``: head-level metrics of a local model, as JSON lines and an HTML report.

Example::

    attnlab analyze --model smollm2 --metrics retrieval,sinks,distance,entropy,importance --out runs/smollm2

``--model`` is ``minilm``, ``smollm2`` or a local Hugging Face folder (nothing downloads). The
probe input for sinks / distance / entropy / importance is the start of the gensim Wikipedia text
(or ``--text``). Results are appended to ``OUT/results.jsonl`` (one JSON object per metric);
``OUT/report.html`` holds a layer x head heatmap per metric, the attention pattern of chosen heads
and the tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnlab.cli_errors import Interrupted, UsageError

if TYPE_CHECKING:  # torch is imported by the command, not by the parser (fast ``attnlab --help``)
    import torch

__all__ = ["add_commands", "cmd_analyze", "METRICS"]

METRICS = ("retrieval", "sinks", "distance", "entropy", "importance")
NEEDLE_TASK_COUNT = 2  # the needle tasks of attnlab.analysis.retrieval.NEEDLE_TASKS


def add_commands(sub: Any, bench: Any) -> None:
    """Add ``attnlab analyze`` to the top-level subparsers ``sub``."""

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        """The module docstring as written, and every option's default."""

    p = sub.add_parser("analyze", help="head-level metrics of a local model (retrieval heads, sinks, distance, ...)",
                       description=__doc__, formatter_class=Formatter)
    p.add_argument("--model", required=True, help="minilm | smollm2 | path to a local Hugging Face folder")
    p.add_argument("--metrics", default="sinks,distance,entropy,importance",
                   help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--out", required=True,
                   help="output folder (results.jsonl, report_sections.json, report.html); a rerun with other "
                        "metrics replaces their sections of the report and keeps the rest")
    p.add_argument("--text", default=None, help="probe text (None: gensim's Wikipedia text)")
    p.add_argument("--probe-tokens", type=int, default=256,
                   help="tokens of the probe input (1 to the model's max_position_embeddings)")
    p.add_argument("--importance-tokens", type=int, default=128, help="tokens of the ablation input")
    p.add_argument("--pattern-tokens", type=int, default=40, help="tokens shown in head patterns")
    p.add_argument("--heads", default=None,
                   help="heads to draw as LAYER-HEAD, e.g. '3-1,5-0' (None: chosen by the metrics)")
    p.add_argument("--sink-dims", default=None, help="sink dimensions, e.g. '2533,1415' (None: found from data)")
    p.add_argument("--tau", type=float, default=20.0, help="sink threshold on the RMS-normalised hidden state")
    p.add_argument("--lengths", default="400,800", help="NIAH context lengths (tokens) for retrieval detection")
    p.add_argument("--depths", default="0,25,50,75,100", help="NIAH needle depths (percent) for detection")
    p.add_argument("--mask-lengths", default="600", help="NIAH context lengths for the masking experiment")
    p.add_argument("--mask-depths", default="10,50,90", help="NIAH depths for the masking experiment")
    p.add_argument("--mask-k", type=int, default=10,
                   help="heads masked in the masking experiment (top-k vs random k; 0: no masking experiment)")
    p.add_argument("--needles", type=int, default=2, help=f"needle tasks used (1 to {NEEDLE_TASK_COUNT})")
    p.add_argument("--buffer", type=int, default=200, help="NIAH final_context_length_buffer")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens generated per needle question")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the random heads")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    p.set_defaults(func=cmd_analyze)


def _ints(text: str, option: str, *, low: int = 0) -> list[int]:
    """``'1,2,3'`` as integers >= ``low``; a UsageError naming ``option`` otherwise."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers, e.g. '400,800'") from None
    if not values:
        raise UsageError(f"{option} is empty: give at least one integer, e.g. '400,800'")
    if min(values) < low:
        raise UsageError(f"{option} {text!r}: every value must be >= {low}")
    return values


def _heads(text: str) -> list[tuple[int, int]]:
    """``'3-1,5-0'`` as ``[(3, 1), (5, 0)]``; a UsageError naming ``--heads`` otherwise."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("-")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise UsageError(f"--heads {text!r}: {item.strip()!r} is not LAYER-HEAD; write e.g. '3-1,5-0'")
        out.append((int(parts[0]), int(parts[1])))
    return out


@dataclass
class _Request:
    """The arguments of one ``attnlab analyze`` run, checked before any model is loaded."""

    metrics: list[str]
    heads: list[tuple[int, int]] | None
    out: Path


def _check_arguments(args: argparse.Namespace) -> _Request:
    """Every refusal that needs no model: a UsageError naming the argument and the fix."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise UsageError(f"--metrics is empty: nothing to compute; choose from {','.join(METRICS)}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"--metrics: unknown metric(s) {','.join(unknown)}; choose from {','.join(METRICS)}")
    for option, value, low in (("--probe-tokens", args.probe_tokens, 1),
                               ("--importance-tokens", args.importance_tokens, 1),
                               ("--pattern-tokens", args.pattern_tokens, 1), ("--mask-k", args.mask_k, 0),
                               ("--buffer", args.buffer, 0), ("--max-new-tokens", args.max_new_tokens, 1)):
        if value < low:
            raise UsageError(f"{option}={value}: must be >= {low}")
    if not 1 <= args.needles <= NEEDLE_TASK_COUNT:
        raise UsageError(f"--needles={args.needles}: must be 1..{NEEDLE_TASK_COUNT} (the needle tasks there are)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads={args.threads}: must be >= 1 (or leave it out for torch's default)")
    for option, text in (("--lengths", args.lengths), ("--depths", args.depths),
                         ("--mask-lengths", args.mask_lengths), ("--mask-depths", args.mask_depths)):
        _ints(text, option, low=1 if "lengths" in option else 0)
    if args.sink_dims:
        _ints(args.sink_dims, "--sink-dims")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder (new or an earlier analyze folder)")
    return _Request(metrics=metrics, heads=_heads(args.heads) if args.heads else None, out=out)


def _check_against_model(args: argparse.Namespace, request: _Request) -> None:
    """Refusals that need the model's config.json only (no weights): token counts and ``--heads``."""
    from attnlab.analysis.models import model_shape

    try:
        shape = model_shape(args.model)
    except (ImportError, FileNotFoundError, ValueError) as error:
        raise UsageError(f"--model: {error}") from error
    if shape.max_tokens is not None:
        for option, value in (("--probe-tokens", args.probe_tokens), ("--importance-tokens", args.importance_tokens),
                              ("--pattern-tokens", args.pattern_tokens)):
            if value > shape.max_tokens:
                raise UsageError(f"{option}={value}: the model {args.model!r} takes 1..{shape.max_tokens} tokens "
                                 "(max_position_embeddings in its config.json)")
    if request.heads:
        _check_heads(request.heads, shape.layers, shape.heads, args.model)


def _check_heads(heads: list[tuple[int, int]], layers: int | None, per_layer: int | None, model: str) -> None:
    for layer, head in heads:
        if (layers is not None and layer >= layers) or (per_layer is not None and head >= per_layer):
            raise UsageError(f"--heads {layer}-{head}: the model {model!r} has layers 0..{(layers or 0) - 1} and "
                             f"heads 0..{(per_layer or 0) - 1} per layer; choose heads in that range")


@dataclass
class _Analysis:
    """One ``attnlab analyze`` run: the loaded model, the probe input and what the report collects."""

    args: argparse.Namespace
    model: Any
    tokenizer: Any
    causal: bool
    console: Any
    results: Path
    base: dict[str, Any]
    heatmaps: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    chosen: list[tuple[str, tuple[int, int]]] = field(default_factory=list)
    _haystack: str | None = None

    def text(self) -> str:
        """The probe text: ``--text``, else the start of gensim's Wikipedia text (read once)."""
        if self.args.text is not None:
            return self.args.text
        if self._haystack is None:
            from attnlab.analysis.retrieval import wikipedia_haystack

            self._haystack = wikipedia_haystack(60_000)
        return self._haystack

    def probe(self, tokens: int) -> dict[str, torch.Tensor]:
        """The first ``tokens`` tokens of :meth:`text` as model inputs."""
        ids = self.tokenizer(self.text(), return_tensors="pt", truncation=True, max_length=tokens)
        return {k: v for k, v in ids.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def choose_top(self, reason: str, values: torch.Tensor, *, largest: bool = True) -> None:
        """Add the head with the largest (or smallest) value of ``values [L, H]`` to the drawn patterns."""
        flat = int(values.argmax() if largest else values.argmin())
        self.chosen.append((reason, (flat // values.shape[1], flat % values.shape[1])))


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run the chosen metrics, append them to ``results.jsonl``, merge their report sections with those
    stored in the folder and write ``report.html``.

    Every argument is checked first (the model's config.json included, no weights loaded); the
    ``--out`` folder is created (and held, see ``attnlab.bench.results.exclusive_writer``) only when
    the work starts, and removed again if nothing was written to it when the run fails.
    """
    from attnlab.bench.results import LOCK_FILE, exclusive_writer

    request = _check_arguments(args)
    _check_against_model(args, request)
    out = request.out
    created = not out.exists()
    try:
        # one writer per folder: a second analysis into it is refused with the holder's pid, so the
        # read-merge-write of the report sections never loses another run's sections
        with exclusive_writer(out):
            return _analyze(args, request)
    except BaseException:
        if created and out.is_dir() and {entry.name for entry in out.iterdir()} <= {LOCK_FILE}:
            (out / LOCK_FILE).unlink(missing_ok=True)  # nothing was written: leave no folder behind
            out.rmdir()
        raise


def _analyze(args: argparse.Namespace, request: _Request) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from attnlab.analysis.capture import capture
    from attnlab.analysis.models import load_model
    from attnlab.analysis.report import SECTIONS_FILE, read_sections

    console = Console()
    metrics, out = request.metrics, request.out
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    try:
        loaded = load_model(args.model)
    except (ImportError, FileNotFoundError, ValueError) as error:
        raise UsageError(f"--model: {error}") from error
    console.print(f"loaded {args.model} ({type(loaded.model).__name__}, causal={loaded.causal}) "
                  f"in {time.time() - started:.1f} s")
    if "retrieval" in metrics and not loaded.causal:
        console.print("[yellow]retrieval heads need a causal LM (generation): skipped for this encoder[/yellow]")
        metrics.remove("retrieval")
        if not metrics:
            raise UsageError(f"--metrics retrieval: needs a causal LM and {args.model!r} is an encoder; "
                             f"choose from {','.join(m for m in METRICS if m != 'retrieval')}")
    try:
        stored = read_sections(out) if out.is_dir() else {"sections": {}}
    except (ValueError, OSError) as error:
        raise UsageError(f"--out {str(out)!r}: {error}") from error
    run = _Analysis(args, loaded.model, loaded.tokenizer, loaded.causal, console, out / "results.jsonl",
                    {"model": args.model, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    inputs = run.probe(args.probe_tokens)
    record = capture(run.model, inputs, what=("probs", "hidden") if "sinks" in metrics else ("probs",))
    probs = record.stacked("probs")  # (L, B, H, N, N)
    if request.heads:  # the config may not have said (checked there when it did)
        _check_heads(request.heads, probs.shape[0], probs.shape[2], args.model)
    steps = {"distance": lambda: _distance(run, probs), "entropy": lambda: _entropy(run, probs),
             "sinks": lambda: _sinks(run, record, inputs),
             "importance": lambda: _importance(run, probs.shape[0] * probs.shape[2], progress),
             "retrieval": lambda: _retrieval(run, progress)}
    new: dict[str, dict[str, Any]] = {}  # metric -> its report section
    probe_note = f"probe {args.probe_tokens} tokens of {'--text' if args.text else 'gensim Wikipedia text'}"
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            for metric in [m for m in ("distance", "entropy", "sinks", "importance", "retrieval") if m in metrics]:
                t0, heatmaps, tables, chosen = time.time(), set(run.heatmaps), set(run.tables), len(run.chosen)
                steps[metric]()
                new[metric] = {
                    "heatmaps": {k: v for k, v in run.heatmaps.items() if k not in heatmaps},
                    "tables": {k: v for k, v in run.tables.items() if k not in tables},
                    "chosen": run.chosen[chosen:], "patterns": [],
                    "notes": [f"{metric}: {args.model} ({type(run.model).__name__}), {probe_note}, "
                              f"run {run.base['time']}, {time.time() - t0:.0f} s"]}
    except KeyboardInterrupt:
        done = [m for m in metrics if m in new]
        if new:
            _store(run, request, new, stored)
        rest = [m for m in metrics if m not in new]
        raise Interrupted(f"interrupted; {len(done)} of {len(metrics)} metrics saved in {out} "
                          f"({','.join(done) or 'none'}); rerun with --metrics {','.join(rest)} "
                          "to add the rest") from None
    report, kept = _store(run, request, new, stored)
    if kept:
        console.print(f"kept from earlier runs in {out / SECTIONS_FILE}: {', '.join(kept)}")
    console.print(f"results: {run.results}\nreport: {report}")
    return 0


def _store(run: _Analysis, request: _Request, new: dict[str, dict[str, Any]],
           stored: dict[str, Any]) -> tuple[Path, list[str]]:
    """Draw the patterns of the finished metrics' heads, merge their sections into the stored ones,
    write ``report_sections.json`` and ``report.html``; return the report and the kept metrics."""
    from attnlab.analysis.report import merge_sections, write_sections, write_sections_report

    patterns = _patterns(run, request.heads, [c for section in new.values() for c in section["chosen"]])
    for section in new.values():
        heads = {head for _, head in section.pop("chosen")}
        section["patterns"] = [p for p in patterns if p[3] in heads and not request.heads]
    sections = dict(new)
    if request.heads:  # heads the user chose: their own section, replaced by the next --heads
        sections["heads"] = {"heatmaps": {}, "tables": {}, "notes": [], "patterns": list(patterns)}
    for section in sections.values():
        section["patterns"] = [list(p[:3]) for p in section["patterns"]]
    kept = sorted(set(stored.get("sections", {})) - set(sections))
    document = merge_sections(stored, sections, title=f"attnlab analyze: {run.args.model}")
    if kept:
        document["notes"] = [f"sections kept from earlier runs in this folder (see each section's note): "
                             f"{', '.join(kept)}; results.jsonl holds every run"]
    write_sections(request.out, document)
    return write_sections_report(request.out, document), kept


def _distance(run: _Analysis, probs: torch.Tensor) -> None:
    """Mean attention distance per head of ``probs (L, B, H, N, N)``; for a causal model also local / global
    heads by backward distance."""
    import torch

    from attnlab.analysis import distance as dist
    from attnlab.analysis.report import append_result

    t0 = time.time()
    L, N = probs.shape[0], probs.shape[-1]
    values = torch.stack([dist.mean_attention_distance(probs[layer]) for layer in range(L)])  # (L, H)
    run.heatmaps["mean attention distance (tokens)"] = values
    entry = {**run.base, "metric": "distance", "values": values, "tokens": N, "seconds": time.time() - t0}
    if run.causal:
        backward = torch.stack([dist.backward_distance(probs[layer]).mean(0) for layer in range(L)])
        classes = dist.classify_heads(backward)
        entry.update(local_heads=classes.local, global_heads=classes.global_)
        run.tables["local / global heads (bottom / top 30 % by mean backward distance)"] = [
            {"class": "local", "heads": ", ".join(f"{a}-{b}" for a, b in classes.local[:12])},
            {"class": "global", "heads": ", ".join(f"{a}-{b}" for a, b in classes.global_[-12:])}]
    run.tables["mean attention distance by layer (mean over heads)"] = [
        {"layer": layer, "mean distance": float(values[layer].mean()), "min head": float(values[layer].min()),
         "max head": float(values[layer].max())} for layer in range(L)]
    run.choose_top("shortest mean distance", values, largest=False)
    append_result(run.results, entry)


def _entropy(run: _Analysis, probs: torch.Tensor) -> None:
    """Normalised attention entropy per head of ``probs (L, B, H, N, N)``."""
    import torch

    from attnlab.analysis import distance as dist
    from attnlab.analysis.report import append_result

    t0 = time.time()
    values = torch.stack([dist.attention_entropy(probs[layer], normalized=True) for layer in range(probs.shape[0])])
    run.heatmaps["normalised attention entropy"] = values
    append_result(run.results, {**run.base, "metric": "entropy", "values": values, "tokens": probs.shape[-1],
                                "seconds": time.time() - t0})


def _sinks(run: _Analysis, record: Any, inputs: dict[str, torch.Tensor]) -> None:
    """Sink tokens per layer (massive hidden-state dimensions), and the share of attention they take."""
    from attnlab.analysis.report import append_result
    from attnlab.analysis.sinks import find_sink_dims, massive_activations, sink_attention_share, sinks_by_layer

    args, tokenizer = run.args, run.tokenizer
    t0 = time.time()
    L = record.num_layers
    first_layer = 2 if L > 2 else 0  # the paper's layers >= 2 (all layers of a tiny model)
    dims = (_ints(args.sink_dims, "--sink-dims") if args.sink_dims
            else find_sink_dims(record, top=2, first_layer=first_layer))
    sinks = sinks_by_layer(record, dims, tau=args.tau, first_layer=first_layer)
    share = sink_attention_share(record, sinks, query_start=1)
    first = sink_attention_share(record, [0], query_start=1)
    run.heatmaps["share of attention on sink tokens"] = share
    run.heatmaps["share of attention on the first token"] = first
    ids = inputs["input_ids"][0].tolist()
    massive = massive_activations(record)
    run.tables[f"sink tokens by layer (layers >= {first_layer}, dims {dims}, tau {args.tau})"] = [
        {"layer": layer, "sink positions": str(pos[:8]),
         "tokens": str([tokenizer.decode([ids[p]]) for p in pos[:8]]),
         "attention share": float(share[layer].mean()), "share on token 0": float(first[layer].mean())}
        for layer, pos in sinks.items()]
    run.tables["largest hidden-state entry entering each layer (massive activations)"] = [
        {"layer": m.layer, "value": m.value, "token": m.token, "token text": tokenizer.decode([ids[m.token]]),
         "dim": m.dim, "x median |X|": m.ratio_to_median} for m in massive]
    run.choose_top("largest sink share", share)
    append_result(run.results, {**run.base, "metric": "sinks", "dims": dims, "tau": args.tau, "sinks": sinks,
                                "share": share, "share_first_token": first,
                                "massive": [vars(m) for m in massive], "seconds": time.time() - t0})


def _importance(run: _Analysis, heads_total: int, progress: Any) -> None:
    """Head importance by ablation: the LM loss increase (causal) or the pooled-embedding change (encoder)."""
    import torch

    from attnlab.analysis.importance import embedding_change_importance, lm_loss_importance
    from attnlab.analysis.report import append_result

    t0 = time.time()
    task = progress.add_task("importance (ablate each head)", total=heads_total)

    def step(done: int, total: int) -> None:
        progress.update(task, completed=done)

    small = run.probe(run.args.importance_tokens)
    if run.causal:
        full, values = lm_loss_importance(run.model, small["input_ids"], progress=step)
        name, extra = "loss increase when the head is zeroed", {"loss_full": full}
    else:
        values = embedding_change_importance(run.model, small, progress=step)
        name, extra = "1 - cos(pooled embedding) when the head is zeroed", {}
    run.heatmaps[name] = values
    run.choose_top("most important", values)
    order = torch.argsort(values.flatten(), descending=True)[:10].tolist()
    run.tables[f"most important heads ({name})"] = [
        {"head": f"{i // values.shape[1]}-{i % values.shape[1]}", "value": float(values.flatten()[i])}
        for i in order]
    append_result(run.results, {**run.base, "metric": "importance", "measure": name, "values": values,
                                "tokens": int(small["input_ids"].shape[1]), **extra, "seconds": time.time() - t0})


def _retrieval(run: _Analysis, progress: Any) -> None:
    """Retrieval heads by needle-in-a-haystack detection, then (``--mask-k``) the masking experiment."""
    from attnlab.analysis.report import append_result
    from attnlab.analysis.retrieval import NEEDLE_TASKS, detect_retrieval_heads, masking_experiment

    args = run.args
    t0 = time.time()

    def tick(task: Any, test: Any) -> None:
        progress.advance(task)
        run.console.print(f"  needle {test.task}, {test.length} tokens, depth {test.depth}: "
                          f"ROUGE-1 recall {test.recall:.0f}: {test.response[:60]!r}")

    tasks = NEEDLE_TASKS[: max(1, args.needles)]
    lengths, depths = _ints(args.lengths, "--lengths"), _ints(args.depths, "--depths")
    task = progress.add_task("retrieval: detection", total=len(tasks) * len(lengths) * len(depths))
    result = detect_retrieval_heads(run.model, run.tokenizer, text_for_haystack(run.text()), lengths=lengths,
                                    depths=depths, tasks=tasks, buffer=args.buffer, max_new_tokens=args.max_new_tokens,
                                    progress=lambda test: tick(task, test))
    scores = result.scores
    run.heatmaps["retrieval score"] = scores
    run.tables["NIAH detection tests"] = [
        {"task": t.task, "length": t.length, "depth": t.depth, "ROUGE-1 recall": t.recall,
         "response": t.response[:90]} for t in result.tests]
    top = result.ranking()[:10]
    run.tables["top retrieval heads"] = [{"head": f"{a}-{b}", "score": float(scores[a, b])} for a, b in top]
    for a, b in top[:2]:
        run.chosen.append(("retrieval head", (a, b)))
    entry = {**run.base, "metric": "retrieval", "scores": scores, "retrieval_heads": result.retrieval_heads,
             "threshold": result.threshold, "counter": result.counter.scores, "lengths": lengths,
             "depths": depths, "tests": [{"task": t.task, "length": t.length, "depth": t.depth,
                                          "response": t.response, "recall": t.recall} for t in result.tests]}
    if args.mask_k > 0:
        mask_lengths = _ints(args.mask_lengths, "--mask-lengths")
        mask_depths = _ints(args.mask_depths, "--mask-depths")
        task = progress.add_task(f"retrieval: masking top-{args.mask_k} vs random",
                                 total=3 * len(tasks) * len(mask_lengths) * len(mask_depths))
        experiment = masking_experiment(run.model, run.tokenizer, text_for_haystack(run.text()), scores,
                                        k=args.mask_k, lengths=mask_lengths, depths=mask_depths, tasks=tasks,
                                        seed=args.seed, buffer=args.buffer, max_new_tokens=args.max_new_tokens,
                                        progress=lambda test: tick(task, test))
        entry["masking"] = experiment
        run.tables[f"needle accuracy (ROUGE-1 recall) with heads masked, k = {args.mask_k}"] = [
            {"masked": name, "accuracy": experiment[f"accuracy_{name}"],
             "heads": ", ".join(f"{a}-{b}" for a, b in experiment.get(f"{name}_heads", []))}
            for name in ("none", "top", "random")]
    entry["seconds"] = time.time() - t0
    append_result(run.results, entry)


def _patterns(run: _Analysis, heads: list[tuple[int, int]] | None,
              chosen: list[tuple[str, tuple[int, int]]]) -> list[tuple[str, torch.Tensor, list[str], tuple[int, int]]]:
    """The attention pattern ``(caption, probs [N, N], tokens, head)`` of each chosen head (``heads``,
    else those the metrics picked) on a short input."""
    from attnlab.analysis.capture import capture

    chosen = [("chosen", h) for h in heads] if heads else chosen
    if not chosen:
        return []
    short = run.probe(run.args.pattern_tokens)
    small_record = capture(run.model, short, what=("probs",))
    tokens = [run.tokenizer.decode([t]) for t in short["input_ids"][0].tolist()]
    patterns, seen = [], set()
    for reason, (layer, head) in chosen:
        if (layer, head) in seen:
            continue
        seen.add((layer, head))
        patterns.append((f"layer {layer} head {head} ({reason})", small_record.probs[layer][0, head], tokens,
                         (layer, head)))
    return patterns


def text_for_haystack(text: str) -> str:
    """The haystack text (repeated until it is long enough for the longest context)."""
    return text if len(text) > 40_000 else (text + "\n") * (40_000 // max(len(text), 1) + 1)

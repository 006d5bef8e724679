"""``attnlab eval``: perplexity, bits per byte and needle retrieval of a local causal LM whose attention
is replaced by attnlab mechanisms (see :mod:`attnlab.hf.eval`). Imports torch and transformers only
when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "add_parser", "run"]

MECHANISMS_HELP = ("comma list of mechanism[:option=value...] entries, e.g. "
                   "'softmax,hip:k_budget=256,sliding_window:window=256:sink_tokens=4' "
                   "(options use the mechanism's own names; see attnlab.hf.compatible())")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t.strip())


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, then write ``leaderboard.md`` and ``report.html``; print the leaderboard."""
    from attnlab.console import make_console
    from attnlab.hf.eval import EvalConfig, parse_mechanisms, run_eval
    from attnlab.hf.eval_report import write_eval_report

    console = make_console()
    try:
        config = EvalConfig(model=args.model, mechanisms=tuple(parse_mechanisms(args.mechanisms)),
                            contexts=_ints(args.context), out=Path(args.out), windows=args.windows,
                            stride=args.stride, needle_depths=_floats(args.needle_depths),
                            needle_tasks=args.needle_tasks, needle_new_tokens=args.needle_new_tokens,
                            text_file=Path(args.text) if args.text else None, threads=args.threads,
                            dtype=args.dtype, compare_sdpa=args.compare_sdpa)
        records = run_eval(config, console=console, progress=not args.no_progress)
    except (ValueError, KeyError, FileNotFoundError, ImportError) as error:
        console.print(f"[red]{error.args[0] if error.args else error}[/red]")
        return 2
    report, leaderboard = write_eval_report(config.out, records)
    console.print(leaderboard.read_text())
    console.print(f"results: {config.out / 'results.jsonl'}; wrote {report} and {leaderboard}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` to the top-level subparsers."""
    p = subparsers.add_parser("eval", help="long-context perplexity and needle retrieval of a local causal LM "
                                           "with attnlab mechanisms swapped in (no training)")
    p.add_argument("--model", default="smollm2", help="smollm2, or a local Hugging Face causal LM folder")
    p.add_argument("--mechanisms", default="softmax", help=MECHANISMS_HELP)
    p.add_argument("--context", default="2048", help="comma list of context lengths in tokens")
    p.add_argument("--out", required=True, help="run folder (results.jsonl is appended; reruns resume)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per row (default 4)")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (default context // 2)")
    p.add_argument("--text", default=None, help="held-out text file (default: Wikipedia paragraphs from gensim's "
                                                "test data that the needle haystack does not use)")
    p.add_argument("--needle-depths", default="0.5", help="comma list of needle depths in [0, 1] ('' = no needles)")
    p.add_argument("--needle-tasks", type=int, default=1, help="how many of the analysis toolkit's needles (1-2)")
    p.add_argument("--needle-new-tokens", type=int, default=24, help="greedy tokens generated per needle test")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--compare-sdpa", type=int, default=0, metavar="REPEATS",
                   help="also time the prefill of the model's own SDPA against attnlab_softmax, interleaved, "
                        "REPEATS times per context (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def add_commands(sub: Any, bench: Any) -> None:
    """The hook ``attnlab.cli`` calls for each command module: adds ``attnlab eval``."""
    add_parser(sub)

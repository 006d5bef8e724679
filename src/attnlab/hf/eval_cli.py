"""``attnlab eval``: perplexity, bits per byte and needle retrieval of a local causal LM whose attention
is replaced by attnlab mechanisms (see :mod:`attnlab.hf.eval`). Imports torch and transformers only
when the command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attnlab.cli_errors import Interrupted, UsageError

__all__ = ["add_commands", "add_parser", "run"]

MECHANISMS_HELP = ("comma list of mechanism[:option=value...] entries, e.g. "
                   "'softmax,hip:k_budget=256,sliding_window:window=256:sink_tokens=4' "
                   "(options use the mechanism's own names; see attnlab.hf.compatible())")


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers, e.g. 512,2048") from None


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.1,0.5,0.9") from None


def _check_arguments(args: argparse.Namespace) -> None:
    """Refusals that need no model: each a UsageError naming the option and the fix."""
    contexts = _ints(args.context, "--context")
    if not contexts:
        raise UsageError("--context is empty: nothing to evaluate; give context lengths, e.g. 512,2048")
    if min(contexts) < 2:
        raise UsageError(f"--context {args.context!r}: every context must be >= 2 tokens")
    for option, value, low in (("--windows", args.windows, 1), ("--needle-new-tokens", args.needle_new_tokens, 1),
                               ("--compare-sdpa", args.compare_sdpa, 0)):
        if value < low:
            raise UsageError(f"{option}={value}: must be >= {low}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads={args.threads}: must be >= 1 (or leave it out for torch's default)")
    if args.stride is not None and not 1 <= args.stride < min(contexts):
        raise UsageError(f"--stride={args.stride}: must be in [1, {min(contexts) - 1}] (below the shortest context)")
    depths = _floats(args.needle_depths, "--needle-depths")
    if any(not 0 <= d <= 1 for d in depths):
        raise UsageError(f"--needle-depths {args.needle_depths!r}: depths are fractions in [0, 1]")
    if depths and not 1 <= args.needle_tasks <= 2:
        raise UsageError(f"--needle-tasks={args.needle_tasks}: must be 1 or 2 (the needles there are)")
    if args.text is not None and not Path(args.text).is_file():
        raise UsageError(f"--text {args.text!r}: no such file; give a UTF-8 text file or leave it out")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; give a folder (new, or an earlier run's to resume)")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, then write ``leaderboard.md`` and ``report.html``; print the leaderboard.

    Every argument is checked first (mechanism names and options included; the model's folder
    before its weights are loaded)."""
    _check_arguments(args)
    from attnlab.analysis.models import model_folder
    from attnlab.console import make_console
    from attnlab.hf.eval import EvalConfig, parse_mechanisms, run_eval
    from attnlab.hf.eval_report import write_eval_report

    try:
        mechanisms = tuple(parse_mechanisms(args.mechanisms))
    except (ValueError, KeyError) as error:
        message = str(error.args[0] if error.args else error)
        raise UsageError(message if message.startswith("--mechanisms") else f"--mechanisms: {message}") from None
    if args.model != "smollm2":  # smollm2's folder is made (converted) by the run itself
        try:
            model_folder(args.model)
        except (ImportError, FileNotFoundError, ValueError) as error:
            raise UsageError(f"--model: {error}") from None
    console = make_console()
    config = EvalConfig(model=args.model, mechanisms=mechanisms, contexts=_ints(args.context, "--context"),
                        out=Path(args.out), windows=args.windows, stride=args.stride,
                        needle_depths=_floats(args.needle_depths, "--needle-depths"),
                        needle_tasks=args.needle_tasks, needle_new_tokens=args.needle_new_tokens,
                        text_file=Path(args.text) if args.text else None, threads=args.threads,
                        dtype=args.dtype, compare_sdpa=args.compare_sdpa)
    try:
        records = run_eval(config, console=console, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as error:  # e.g. an encoder model, a text too short
        raise UsageError(str(error.args[0] if error.args else error)) from None
    except KeyboardInterrupt:
        results = config.out / "results.jsonl"
        saved = sum(1 for line in results.read_text().splitlines() if line.strip()) if results.exists() else 0
        raise Interrupted(f"interrupted; {saved} rows saved in {results}; rerun the same command to resume "
                          "(finished rows are skipped)") from None
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
    p.add_argument("--windows", type=int, default=4, help="perplexity windows per row")
    p.add_argument("--stride", type=int, default=None, help="window stride in tokens (None: context // 2)")
    p.add_argument("--text", default=None, help="held-out text file (None: Wikipedia paragraphs from gensim's "
                                                "test data that the needle haystack does not use)")
    p.add_argument("--needle-depths", default="0.5", help="comma list of needle depths in [0, 1] ('' = no needles)")
    p.add_argument("--needle-tasks", type=int, default=1, help="how many of the analysis toolkit's needles (1-2)")
    p.add_argument("--needle-new-tokens", type=int, default=24, help="greedy tokens generated per needle test")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and activations")
    p.add_argument("--compare-sdpa", type=int, default=0, metavar="REPEATS",
                   help="also time the prefill of the model's own SDPA against attnlab_softmax, interleaved, "
                        "REPEATS times per context (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def add_commands(sub: Any, bench: Any) -> None:
    """The hook ``attnlab.cli`` calls for each command module: adds ``attnlab eval``."""
    add_parser(sub)

"""Retrieval heads: the needle-in-a-haystack harness, the retrieval score and the masking experiment.

Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", arXiv 2404.15574
(the procedure of the official ``retrieval_head_detection.py``, step by step in ``docs/analysis.md``):

- a head's score on one test: every decoding step whose generated token ``w`` is copied by the
  head, i.e. the head's top-1 attention position ``i*`` lies in the needle span ``[s, e)`` and
  ``prompt_ids[i*] == w``, adds ``1 / (e - s)`` (no de-duplication, as the code; ``dedup=True``
  gives the paper's set ratio ``|g_h ∩ k| / |k|``, inferred);
- only tests answered with ROUGE-1 recall > 50 count; the retrieval score is the mean over them;
- retrieval heads: score > 0.1 (the paper's threshold).

The masking experiment masks the top-K heads against K random non-retrieval heads (uniform
attention during decoding, :func:`attnlab.analysis.interventions.mask_heads`).
"""

from __future__ import annotations

import bz2
import inspect
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnlab.analysis.hooks.intervene import attention_layers, intervene
from attnlab.analysis.interventions import mask_heads

__all__ = [
    "NeedleTask", "NEEDLE_TASKS", "wikipedia_haystack", "insert_needle", "find_needle_span", "rouge1_recall",
    "retrieval_step_scores", "HeadCounter", "NeedleTest", "build_needle_prompt", "greedy_decode",
    "run_needle_test", "detect_retrieval_heads", "RetrievalResult", "needle_accuracy", "masking_experiment",
]


@dataclass(frozen=True)
class NeedleTask:
    """One needle: the sentence inserted into the haystack, the question, and the answer span."""

    needle: str
    question: str
    real_needle: str


# The classic needles of the NIAH tests used by the paper (the San Francisco needle of its masking
# evaluation and the Beijing needle of its detection set), re-typed here.
NEEDLE_TASKS: tuple[NeedleTask, ...] = (
    NeedleTask(needle="\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a "
                      "sunny day.\n",
               question="What is the best thing to do in San Francisco?",
               real_needle="eat a sandwich and sit in Dolores Park on a sunny day"),
    NeedleTask(needle="\nThe best thing to do in Beijing is take a walk in Chaoyang Park and have a cup of Espresso "
                      "in the evening.\n",
               question="What is the best thing to do in Beijing?",
               real_needle="take a walk in Chaoyang Park and have a cup of Espresso in the evening"),
)


def wikipedia_haystack(max_chars: int = 200_000) -> str:
    """Plain English text from the shortened Wikipedia dump that ships in gensim's test data.

    Markup is removed with ``gensim.corpora.wikicorpus.filter_wiki``; headings, lists and short
    lines are dropped; paragraphs are joined until ``max_chars``.
    """
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as error:
        raise ImportError("the Wikipedia haystack needs the package 'gensim' (pip install gensim)") from error
    paragraphs: list[str] = []
    total = 0
    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(path) as stream:
        for _, text, _ in extract_pages(stream):
            for line in filter_wiki(text).split("\n"):
                line = re.sub(r"'{2,}", "", line).strip()
                if len(line) < 200 or line.startswith(("=", "*", "|", "!", "{", "#")):
                    continue
                line = re.sub(r"\s+", " ", line)
                paragraphs.append(line)
                total += len(line) + 1
                if total >= max_chars:
                    return "\n".join(paragraphs)
    return "\n".join(paragraphs)


def insert_needle(context_ids: Sequence[int], needle_ids: Sequence[int], depth: float,
                  period_ids: Iterable[int]) -> list[int]:
    """Insert ``needle_ids`` at ``depth`` percent of ``context_ids`` (detection step 2).

    ``depth == 100`` appends. Otherwise the insertion point ``int(len * depth / 100)`` moves back
    until the token before it is a period token (or the start is reached).
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth={depth} must be a percentage in [0, 100]")
    context = list(context_ids)
    if depth == 100:
        return context + list(needle_ids)
    periods = set(period_ids)
    point = int(len(context) * depth / 100)
    while point > 0 and context[point - 1] not in periods:
        point -= 1
    return context[:point] + list(needle_ids) + context[point:]


def find_needle_span(prompt_ids: Sequence[int], needle_ids: Sequence[int], *,
                     threshold: float = 0.9) -> tuple[int, int]:
    """``[s, e)``: the first window of ``len(needle_ids)`` prompt tokens whose token set covers more
    than ``threshold`` of the needle's token set (detection step 4). Raises ValueError if none does."""
    n = len(needle_ids)
    target = set(needle_ids)
    if not n:
        raise ValueError("needle_ids is empty")
    for i in range(len(prompt_ids) - n + 1):
        if len(set(prompt_ids[i:i + n]) & target) / len(target) > threshold:
            return i, i + n
    raise ValueError(f"the needle ({n} tokens) was not found in the prompt ({len(prompt_ids)} tokens)")


def _rouge_tokens(text: str, stem: bool) -> list[str]:
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if not stem:
        return tokens
    from gensim.parsing.porter import PorterStemmer

    stemmer = PorterStemmer()
    return [stemmer.stem(t) if len(t) > 3 else t for t in tokens]


def rouge1_recall(reference: str, response: str, *, stem: bool = True) -> float:
    """ROUGE-1 recall (x100) of ``response`` against ``reference``: clipped unigram overlap over the
    reference's unigrams. Tokenisation as ``rouge_score`` (lower case, alphanumeric runs, Porter
    stemming of tokens longer than 3 characters; the stemmer is gensim's Porter implementation)."""
    ref = _rouge_tokens(reference, stem)
    if not ref:
        return 0.0
    counts: dict[str, int] = {}
    for t in _rouge_tokens(response, stem):
        counts[t] = counts.get(t, 0) + 1
    hits = 0
    for t in ref:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            hits += 1
    return 100.0 * hits / len(ref)


def retrieval_step_scores(rows: torch.Tensor, token: int, prompt_ids: Sequence[int] | torch.Tensor,
                          span: tuple[int, int], *, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The score increment of one decoding step for every head (detection step 6).

    Args:
        rows: the current query's attention rows ``[L, H, M]`` (``M`` keys, the prompt first).
        token: the token generated from this query.
        prompt_ids: the prompt token ids.
        span: the needle span ``[s, e)`` in the prompt.
        seen: optional boolean ``[L, H, e - s]`` of needle positions already counted (``dedup=True``);
            updated in place.

    Returns:
        ``[L, H]``: ``1 / (e - s)`` where the head's top-1 key is in the span and holds ``token``.
    """
    s, e = span
    prompt = torch.as_tensor(prompt_ids)
    top = rows.argmax(dim=-1)  # (L, H)
    in_span = (top >= s) & (top < e)
    copied = prompt[top.clamp(max=len(prompt) - 1)] == token
    hit = in_span & copied & (top < len(prompt))
    if seen is not None:
        offset = (top - s).clamp(0, e - s - 1)
        already = seen.gather(-1, offset[..., None])[..., 0]
        hit = hit & ~already
        seen.scatter_(-1, offset[..., None], (already | hit)[..., None])
    return hit.to(torch.float64) / (e - s)


@dataclass
class HeadCounter:
    """``{"l-h": [score per successful test]}`` as in the official JSON; merging concatenates lists."""

    scores: dict[str, list[float]] = field(default_factory=dict)

    def add(self, test_scores: torch.Tensor, recall: float, *, min_recall: float = 50.0) -> bool:
        """Append every head's score of one test if ``recall > min_recall``; return whether it counted."""
        if recall <= min_recall:
            return False
        L, H = test_scores.shape
        for layer in range(L):
            for head in range(H):
                self.scores.setdefault(f"{layer}-{head}", []).append(float(test_scores[layer, head]))
        return True

    def merge(self, other: HeadCounter) -> None:
        for key, values in other.scores.items():
            self.scores.setdefault(key, []).extend(values)

    def mean(self, layers: int, heads: int) -> torch.Tensor:
        """``[L, H]`` mean score per head (0 where no test counted)."""
        out = torch.zeros(layers, heads, dtype=torch.float64)
        for key, values in self.scores.items():
            layer, head = (int(x) for x in key.split("-"))
            if values and layer < layers and head < heads:
                out[layer, head] = sum(values) / len(values)
        return out


@dataclass
class NeedleTest:
    """One NIAH test: its setting, the model's answer, ROUGE-1 recall and per-head scores ``[L, H]``."""

    task: int
    length: int
    depth: float
    response: str
    recall: float
    scores: torch.Tensor | None = None


def _period_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.encode(".", add_special_tokens=False))
    ids |= set(tokenizer.encode(" .", add_special_tokens=False)[-1:])
    for token, index in tokenizer.get_vocab().items():
        if token.rstrip().endswith(".") and len(token.strip("Ġ▁ ")) == 1:
            ids.add(index)
    return ids


def build_needle_prompt(tokenizer: Any, haystack: str, task: NeedleTask, length: int, depth: float, *,
                        buffer: int = 200, chat: bool | None = None) -> tuple[list[int], tuple[int, int]]:
    """The prompt ids of one test and the needle span ``[s, e)`` in them (detection steps 1-4).

    ``length`` is the context length in tokens before the ``buffer`` is subtracted (as the code).
    ``chat=None`` uses the tokenizer's chat template when it has one.
    """
    context = tokenizer.encode(haystack, add_special_tokens=False)
    if len(context) < length:
        raise ValueError(f"the haystack has {len(context)} tokens, fewer than the context length {length}")
    budget = length - buffer
    needle = tokenizer.encode(task.needle, add_special_tokens=False)
    if budget <= len(needle):
        raise ValueError(f"context length {length} minus buffer {buffer} leaves no room for the needle "
                         f"({len(needle)} tokens)")
    context = context[: budget - len(needle)]
    text = tokenizer.decode(insert_needle(context, needle, depth, _period_ids(tokenizer)))
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    question = f"Based on the content of the book, Question: {task.question}\nAnswer:"
    if chat:
        message = [{"role": "user", "content": f"<book>{text}</book>\n{question}"}]
        prompt = tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
        prompt = list(prompt)
    else:
        prompt = tokenizer.encode(text + question)
    real = tokenizer.encode(task.real_needle, add_special_tokens=False)
    return prompt, find_needle_span(prompt, real)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int = 50,
                  stop: Callable[[int], bool] | None = None,
                  on_step: Callable[[dict[int, torch.Tensor], int], None] | None = None) -> list[int]:
    """Greedy decoding with a KV cache: prefill ``prompt_ids[:-1]``, then decode from the last prompt token.

    ``on_step(rows, token)`` receives, for every decoding step, the current query's attention rows
    ``{layer: [H, M]}`` and the token generated from them. Decoding stops after ``stop(token)``.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], device=device)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(out, cache_name)
    current = ids[:, -1:]
    generated: list[int] = []
    rows: dict[int, torch.Tensor] = {}

    def keep(probs: torch.Tensor, layer: int) -> None:
        rows[layer] = probs[0, :, -1].detach().float().cpu()

    for _ in range(max_new_tokens):
        rows.clear()
        if on_step is None:
            out = model(input_ids=current, use_cache=True, **{cache_name: cache})
        else:
            with intervene(model, on_probs=keep):
                out = model(input_ids=current, use_cache=True, **{cache_name: cache})
        cache = getattr(out, cache_name)
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        if on_step is not None:
            on_step(rows, token)
        if stop is not None and stop(token):
            break
        current = torch.tensor([[token]], device=device)
    return generated


def _stopper(tokenizer: Any) -> Callable[[int], bool]:
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def stop(token: int) -> bool:
        return token in eos or "\n" in tokenizer.decode([token])
    return stop


def run_needle_test(model: nn.Module, tokenizer: Any, haystack: str, task: NeedleTask, length: int, depth: float,
                    *, task_index: int = 0, score: bool = True, dedup: bool = False, max_new_tokens: int = 50,
                    buffer: int = 200, chat: bool | None = None) -> NeedleTest:
    """One NIAH test: build the prompt, decode greedily, ROUGE-1 recall, per-head retrieval scores."""
    prompt, span = build_needle_prompt(tokenizer, haystack, task, length, depth, buffer=buffer, chat=chat)
    layers = len(attention_layers(model))
    totals: list[torch.Tensor] = []
    seen: list[torch.Tensor] = []

    def on_step(rows: dict[int, torch.Tensor], token: int) -> None:
        stacked = torch.stack([rows[layer] for layer in range(layers)])  # (L, H, M)
        if dedup and not seen:
            seen.append(torch.zeros(*stacked.shape[:2], span[1] - span[0], dtype=torch.bool))
        totals.append(retrieval_step_scores(stacked, token, prompt, span, seen=seen[0] if dedup else None))

    tokens = greedy_decode(model, prompt, max_new_tokens=max_new_tokens, stop=_stopper(tokenizer),
                           on_step=on_step if score else None)
    response = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    scores = torch.stack(totals).sum(0) if totals else None
    return NeedleTest(task=task_index, length=length, depth=depth, response=response,
                      recall=rouge1_recall(task.real_needle, response), scores=scores)


@dataclass
class RetrievalResult:
    """Retrieval scores ``[L, H]``, the raw counter, every test, and the heads above the threshold."""

    scores: torch.Tensor
    counter: HeadCounter
    tests: list[NeedleTest]
    threshold: float = 0.1

    @property
    def retrieval_heads(self) -> list[tuple[int, int]]:
        """Heads with score > threshold, best first."""
        return [h for h in self.ranking() if float(self.scores[h]) > self.threshold]

    def ranking(self) -> list[tuple[int, int]]:
        """All heads sorted by decreasing score."""
        L, H = self.scores.shape
        order = torch.argsort(self.scores.flatten(), descending=True, stable=True)
        return [(int(i) // H, int(i) % H) for i in order]


def detect_retrieval_heads(model: nn.Module, tokenizer: Any, haystack: str, *, lengths: Sequence[int],
                           depths: Sequence[float], tasks: Sequence[NeedleTask] = NEEDLE_TASKS,
                           dedup: bool = False, min_recall: float = 50.0, threshold: float = 0.1,
                           max_new_tokens: int = 50, buffer: int = 200, chat: bool | None = None,
                           progress: Callable[[NeedleTest], None] | None = None) -> RetrievalResult:
    """Run the grid ``tasks x lengths x depths`` and return the retrieval scores (detection steps 1-9).

    The paper's grid is 20 lengths up to 50k tokens and 10 depths; pass smaller grids on a CPU.
    """
    layers = attention_layers(model)
    counter = HeadCounter()
    tests: list[NeedleTest] = []
    for index, task in enumerate(tasks):
        for length in lengths:
            for depth in depths:
                test = run_needle_test(model, tokenizer, haystack, task, length, depth, task_index=index,
                                       dedup=dedup, max_new_tokens=max_new_tokens, buffer=buffer, chat=chat)
                if test.scores is not None:
                    counter.add(test.scores, test.recall, min_recall=min_recall)
                tests.append(test)
                if progress is not None:
                    progress(test)
    heads = tests[0].scores.shape[1] if tests and tests[0].scores is not None else 0
    return RetrievalResult(scores=counter.mean(len(layers), heads), counter=counter, tests=tests,
                           threshold=threshold)


def needle_accuracy(model: nn.Module, tokenizer: Any, haystack: str, *, lengths: Sequence[int],
                    depths: Sequence[float], tasks: Sequence[NeedleTask] = NEEDLE_TASKS,
                    masked: Sequence[tuple[int, int]] = (), mode: str = "uniform_attention",
                    phase: str = "decode", max_new_tokens: int = 50, buffer: int = 200,
                    chat: bool | None = None,
                    progress: Callable[[NeedleTest], None] | None = None) -> tuple[float, list[NeedleTest]]:
    """Mean ROUGE-1 recall (x100) over the grid with ``masked`` heads masked (the masking experiment)."""
    tests = []
    with mask_heads(model, masked, mode=mode, phase=phase):  # type: ignore[arg-type]
        for index, task in enumerate(tasks):
            for length in lengths:
                for depth in depths:
                    test = run_needle_test(model, tokenizer, haystack, task, length, depth, task_index=index,
                                           score=False, max_new_tokens=max_new_tokens, buffer=buffer, chat=chat)
                    tests.append(test)
                    if progress is not None:
                        progress(test)
    return sum(t.recall for t in tests) / max(len(tests), 1), tests


def masking_experiment(model: nn.Module, tokenizer: Any, haystack: str, scores: torch.Tensor, *, k: int,
                       lengths: Sequence[int], depths: Sequence[float],
                       tasks: Sequence[NeedleTask] = NEEDLE_TASKS, seed: int = 0, exclude_top: int = 100,
                       progress: Callable[[NeedleTest], None] | None = None, **options: Any) -> dict[str, Any]:
    """Needle accuracy with nothing masked, the top-``k`` retrieval heads masked, and ``k`` random
    heads masked (drawn without replacement outside the top-``exclude_top`` heads): the paper's
    masking experiment."""
    L, H = scores.shape
    order = torch.argsort(scores.flatten(), descending=True, stable=True).tolist()
    top = [(i // H, i % H) for i in order[:k]]
    pool = [(i // H, i % H) for i in order[min(exclude_top, len(order) - k):]]
    rng = random.Random(seed)
    random_heads = rng.sample(pool, k)
    result: dict[str, Any] = {"k": k, "top_heads": top, "random_heads": random_heads}
    for name, heads in (("none", []), ("top", top), ("random", random_heads)):
        accuracy, tests = needle_accuracy(model, tokenizer, haystack, lengths=lengths, depths=depths, tasks=tasks,
                                          masked=heads, progress=progress, **options)
        result[f"accuracy_{name}"] = accuracy
        result[f"responses_{name}"] = [t.response for t in tests]
    return result

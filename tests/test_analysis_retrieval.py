"""Retrieval heads (analysis spec A1.5): step scores, filter, masking semantics, span finder, harness."""

from __future__ import annotations

import pytest
import torch

from attnlab.analysis.capture import capture
from attnlab.analysis.interventions import mask_heads
from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.analysis.retrieval import (
    HeadCounter,
    NeedleTask,
    build_needle_prompt,
    detect_retrieval_heads,
    find_needle_span,
    insert_needle,
    masking_experiment,
    retrieval_step_scores,
    rouge1_recall,
)


def _copying_rows(L, H, M, target_head, positions, generator):
    """Random attention rows whose top-1 key is ``positions[step]`` for head ``target_head`` only."""
    rows = []
    for position in positions:
        r = torch.rand(L, H, M, generator=generator)
        r[..., position] = 0.0  # no other head looks at the needle position
        r[target_head[0], target_head[1], position] = 5.0
        rows.append(r / r.sum(-1, keepdim=True))
    return rows


def _synthetic_test(repeats, dedup):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 200, (30,), generator=g).tolist()
    span = (12, 16)
    prompt[12:16] = [7, 8, 9, 10]  # a 4-token needle with distinct tokens
    positions = list(range(12, 16)) * repeats
    tokens = [prompt[p] for p in positions]
    L, H, M = 4, 6, 30
    seen = torch.zeros(L, H, 4, dtype=torch.bool) if dedup else None
    total = torch.zeros(L, H, dtype=torch.float64)
    for rows, token in zip(_copying_rows(L, H, M, (2, 3), positions, g), tokens, strict=True):
        total += retrieval_step_scores(rows, token, prompt, span, seen=seen)
    return total


def test_synthetic_copy_head_scores_one_and_others_zero():
    total = _synthetic_test(repeats=1, dedup=False)
    assert total[2, 3] == pytest.approx(1.0)
    others = total.clone()
    others[2, 3] = 0
    assert others.abs().max() == 0


def test_needle_generated_twice_scores_two_without_dedup_and_one_with_dedup():
    assert _synthetic_test(repeats=2, dedup=False)[2, 3] == pytest.approx(2.0)
    assert _synthetic_test(repeats=2, dedup=True)[2, 3] == pytest.approx(1.0)


def test_attention_on_needle_without_copying_scores_nothing():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 200, (20,), generator=g).tolist()
    rows = _copying_rows(2, 2, 20, (1, 1), [5], g)[0]
    wrong_token = prompt[5] + 1
    assert retrieval_step_scores(rows, wrong_token, prompt, (4, 8)).abs().max() == 0


def test_filter_keeps_counter_unchanged_at_low_recall():
    counter = HeadCounter()
    scores = torch.rand(3, 4, dtype=torch.float64)
    assert not counter.add(scores, recall=50.0)
    assert counter.scores == {}
    assert counter.add(scores, recall=75.0)
    assert counter.add(scores * 0, recall=100.0)
    torch.testing.assert_close(counter.mean(3, 4), scores / 2)


def test_rouge1_recall_counts_clipped_unigrams_with_stemming():
    reference = "eat a sandwich and sit in Dolores Park"
    assert rouge1_recall(reference, "They eat a sandwich and sit in Dolores Park today") == 100.0
    assert rouge1_recall(reference, "eat a sandwich") == pytest.approx(100 * 3 / 8)
    assert rouge1_recall("walking parks", "walked park") == 100.0  # Porter stems: walk, park
    assert rouge1_recall("walking parks", "walked park", stem=False) == 0.0
    assert rouge1_recall("a a b", "a") == pytest.approx(100 / 3)


def test_insert_needle_moves_back_to_a_period_and_span_finder_finds_it():
    g = torch.Generator().manual_seed(2)
    period = 1
    context = torch.randint(10, 50, (40,), generator=g).tolist()
    context[9] = period  # the token before position 10 is a period
    needle = [90, 91, 92, 93, 94]
    out = insert_needle(context, needle, depth=30, period_ids={period})  # int(40 * 0.3) = 12 -> back to 10
    assert out[10:15] == needle and out[:10] == context[:10] and out[15:] == context[10:]
    assert find_needle_span(out, needle) == (10, 15)
    assert insert_needle(context, needle, 100, {period})[-5:] == needle
    assert insert_needle(context, needle, 0, {period})[:5] == needle
    with pytest.raises(ValueError, match="not found"):
        find_needle_span(context, needle)


def test_span_finder_tolerates_one_changed_token_of_a_long_needle():
    needle = list(range(100, 120))
    prompt = list(range(20)) + [999] + needle[1:] + list(range(20, 30))
    # window at 20: 19 of 20 needle tokens (0.95 > 0.9); window at 19: 18 of 20 (0.9, not > 0.9)
    assert find_needle_span(prompt, needle) == (20, 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("llama"), kind="llama", layers=2, heads=4)))


def test_mask_heads_uniform_attention_makes_rows_uniform_over_visible_keys(tiny):
    inputs = tiny.tokenizer(["some words for a causal model to read here"], return_tensors="pt")
    N = inputs["input_ids"].shape[1]
    plain = capture(tiny.model, inputs, what=("probs",))
    with mask_heads(tiny.model, [(1, 2)], mode="uniform_attention", phase="all"):
        masked = capture(tiny.model, inputs, what=("probs",))
    expected = torch.tril(torch.ones(N, N)) / torch.arange(1, N + 1)[:, None]
    torch.testing.assert_close(masked.probs[1][0, 2], expected)
    for layer, head in [(0, 0), (0, 2), (1, 0), (1, 1), (1, 3)]:
        assert torch.equal(masked.probs[layer][0, head], plain.probs[layer][0, head])
    # phase="decode": a multi-token pass is untouched
    with mask_heads(tiny.model, [(1, 2)]):
        prefill = capture(tiny.model, inputs, what=("probs",))
    assert torch.equal(prefill.probs[1], plain.probs[1])


def test_mask_heads_zero_output_zeroes_only_that_head(tiny):
    inputs = tiny.tokenizer(["another short input"], return_tensors="pt")
    plain = capture(tiny.model, inputs, what=("head_outputs",))
    with mask_heads(tiny.model, [(0, 1)], mode="zero_output", phase="all"):
        masked = capture(tiny.model, inputs, what=("head_outputs",))
    assert masked.head_outputs[0][:, 1].abs().max() == 0
    assert torch.equal(masked.head_outputs[0][:, 0], plain.head_outputs[0][:, 0])
    with pytest.raises(ValueError, match="out of range"), mask_heads(tiny.model, [(0, 9)], phase="all"):
        capture(tiny.model, inputs, what=("head_outputs",))


def test_build_prompt_span_holds_the_real_needle(tiny):
    tokenizer = tiny.tokenizer
    haystack = " ".join(f"Sentence number {i} talks about rivers and hills." for i in range(200))
    task = NeedleTask(needle=" The secret code is purple elephant seven. ", question="What is the secret code?",
                      real_needle="purple elephant seven")
    prompt, (s, e) = build_needle_prompt(tokenizer, haystack, task, 400, 50, buffer=100, chat=False)
    assert tokenizer.decode(prompt[s:e]) == "purple elephant seven"
    assert 100 < s < 300


def test_detection_and_masking_harness_runs_on_a_tiny_model(tiny):
    haystack = " ".join(f"Line {i} describes a quiet town by the sea." for i in range(200))
    task = NeedleTask(needle=" The secret code is purple elephant seven. ", question="What is the secret code?",
                      real_needle="purple elephant seven")
    result = detect_retrieval_heads(tiny.model, tiny.tokenizer, haystack, lengths=[150], depths=[0, 50],
                                    tasks=[task], buffer=50, max_new_tokens=4, chat=False)
    assert len(result.tests) == 2 and result.scores.shape == (2, 4)
    # a random model does not answer: nothing passes the recall filter, so every score is 0
    assert all(t.recall <= 50 for t in result.tests) and result.counter.scores == {}
    out = masking_experiment(tiny.model, tiny.tokenizer, haystack, torch.rand(2, 4), k=2, lengths=[150],
                             depths=[50], tasks=[task], buffer=50, max_new_tokens=3, chat=False, exclude_top=2)
    assert len(out["top_heads"]) == 2 and not set(out["top_heads"]) & set(out["random_heads"])
    assert {"accuracy_none", "accuracy_top", "accuracy_random"} <= set(out)

"""Interventions (analysis spec A2.5, A5.4 scaling, A6.3, B6): VAR, HeadFork, PAINT, T3-S2S, VHR scaling."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from attnlab.analysis.capture import capture
from attnlab.analysis.interventions import (
    boost_scores,
    dense_tuning,
    headfork_select,
    iqr_outlier_count,
    paint_modulate,
    paint_select_tokens,
    prompt_balance,
    redistribute_sinks,
    scale_heads,
    topk_prominence,
    var_redistribute,
)
from attnlab.nn import Attention


def test_var_redistribution_known_row():
    row = torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=torch.float64)  # text sink 0, image 1..3, visual sink 2
    out = var_redistribute(row, [0, 2], slice(1, 4), p=0.6)
    torch.testing.assert_close(out, torch.tensor([0.24, 0.1 + 0.28 / 3, 0.18, 0.2 + 0.28 * 2 / 3],
                                                 dtype=torch.float64))
    assert out.sum().item() == pytest.approx(1.0)


def test_var_preserves_random_row_sums_and_guards_empty_rows():
    g = torch.Generator().manual_seed(0)
    rows = torch.softmax(torch.randn(3, 5, 12, generator=g, dtype=torch.float64), -1)
    out = var_redistribute(rows, [0, 4, 5], slice(3, 9), p=0.3)
    torch.testing.assert_close(out.sum(-1), rows.sum(-1))
    torch.testing.assert_close(out[..., [0, 4, 5]], 0.3 * rows[..., [0, 4, 5]])
    assert bool((out[..., [3, 6, 7, 8]] > rows[..., [3, 6, 7, 8]]).all())
    # the only image tokens are sinks: no non-sink image attention, row left unchanged (no NaN)
    guarded = var_redistribute(rows, [3, 4], slice(3, 5), p=0.5)
    torch.testing.assert_close(guarded, rows)


def test_headfork_selection_rules():
    image = slice(1, 5)
    # portion 0.6 -> not selected
    a = torch.tensor([0.2, 0.48, 0.16, 0.08, 0.08], dtype=torch.float64)
    assert not headfork_select(a, [1], image, eps=0.0)
    # portion 0.4 but image attention 0.1 < 0.2 -> not selected
    b = torch.tensor([0.9, 0.04, 0.03, 0.02, 0.01], dtype=torch.float64)
    assert not headfork_select(b, [1], image, eps=0.0)
    # portion 0.4 with image attention 0.5 -> selected
    c = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    assert headfork_select(c, [1], image, eps=0.0)
    # no sink inside the image -> nothing selected
    assert not headfork_select(c, [0], image).any()


def test_paint_modulation_known_values_and_disjoint_sets():
    scores = torch.tensor([[0.5, 2.0, -1.0, 0.7]])
    out = paint_modulate(scores, [1, 2], [], alpha=0.7)
    torch.testing.assert_close(out, torch.tensor([[0.5, 3.4, -0.3, 0.7]]))
    out = paint_modulate(scores, [1], [3], alpha=0.7, beta=0.4)
    assert out[0, 3].item() == pytest.approx(0.98) and out[0, 0] == scores[0, 0] and out[0, 2] == scores[0, 2]
    with pytest.raises(ValueError, match="disjoint"):
        paint_modulate(scores, [1, 3], [3])
    multi = torch.randn(2, 3, 4, 6)
    edited = paint_modulate(multi, [0], [5])
    assert torch.equal(edited[..., :-1, :], multi[..., :-1, :])  # only the last query row changes


def test_iqr_rule_and_token_selection():
    values = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 10])
    assert iqr_outlier_count(values) == 1
    g = torch.Generator().manual_seed(0)
    first = torch.rand(16, generator=g)
    penultimate = torch.rand(16, generator=g) * 0.1
    penultimate[[3, 9]] = 5.0
    local, summary = paint_select_tokens(first, penultimate, local_ratio=0.25)
    assert summary.tolist() == [3, 9]
    assert not set(local.tolist()) & set(summary.tolist())
    assert set(local.tolist()) == set(torch.topk(first, 4).indices.tolist()) - {3, 9}


def test_prompt_balance_rescales_key_tokens_only():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(8, 16, generator=g, dtype=torch.float64)
    out = prompt_balance(e, [2, 4], eot=6, beta=1.0)
    energy = e.pow(2).sum(-1)
    torch.testing.assert_close(out[[2, 4]].pow(2).sum(-1), energy[[6, 6]])
    untouched = [0, 1, 3, 5, 6, 7]
    assert torch.equal(out[untouched], e[untouched])


def test_topk_prominence_and_dense_tuning_identity():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 6, generator=g)  # 5 tokens x 6 channels
    values[2, :3] = 10.0  # token 2 is top in channels 0..2
    out = torch.randn(4, 6, generator=g)  # 4 pixels
    region = torch.tensor([[True, False, True, False]])
    edited = topk_prominence(out, values, [2], region, k=1, alpha=2.0)
    expected = out.clone()
    expected[[0, 2], :3] *= 2
    torch.testing.assert_close(edited, expected)
    legacy = topk_prominence(out, values, [2], region, k=1, alpha=2.0, legacy_zero_others=True)
    assert legacy[1].abs().max() == 0 and legacy[0, 3:].abs().max() == 0
    scores = torch.randn(3, 4, 5, generator=g)
    mask = torch.rand(3, 4, 5, generator=g) > 0.5
    assert torch.equal(dense_tuning(scores, mask, weight=0.0), scores)
    tuned = dense_tuning(scores, mask, weight=0.5)
    assert bool((tuned[mask] >= scores[mask]).all()) and bool((tuned[~mask] <= scores[~mask]).all())


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention(24, 4)

    def forward(self, x):
        return self.attn(x)


class _ThreeLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_OneLayer() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_scale_heads_equals_output_projection_of_scaled_heads():
    torch.manual_seed(0)
    model = _OneLayer().double()
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    record = capture(model, x, what=("head_outputs",))
    heads = record.head_outputs[0].clone()
    heads[:, 0] *= 2
    expected = model.attn.to_out(rearrange(heads, "b h n d -> b n (h d)"))
    with scale_heads(model, {(0, 0): 2.0}):
        got = model(x)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, model(x))


def test_redistribute_sinks_context_keeps_rows_stochastic_and_raises_image_attention():
    torch.manual_seed(1)
    model = _ThreeLayers()
    x = torch.randn(1, 10, 24)
    x[0, 2] *= 8  # a token that draws attention
    plain = capture(model, x, what=("probs",))
    with redistribute_sinks(model, {0: [0, 2], 1: [0, 2], 2: [0, 2]}, slice(1, 6), p=0.5, rho=1.0, summ=0.0):
        edited = capture(model, x, what=("probs",))
    torch.testing.assert_close(edited.probs[1].sum(-1), torch.ones(1, 4, 10))
    torch.testing.assert_close(edited.probs[0][..., [0, 2]], 0.5 * plain.probs[0][..., [0, 2]])
    assert bool((edited.probs[0][..., [1, 3, 4, 5]] >= plain.probs[0][..., [1, 3, 4, 5]]).all())
    # the last layer is skipped (except_last_layer=1)
    with redistribute_sinks(model, {2: [0, 2]}, slice(1, 6), p=0.5, rho=1.0, summ=0.0):
        last_only = capture(model, x, what=("probs",))
    assert torch.equal(last_only.probs[2], plain.probs[2])


def test_boost_scores_changes_last_row_only():
    torch.manual_seed(2)
    model = _ThreeLayers()
    x = torch.randn(1, 7, 24)
    plain = capture(model, x, what=("scores",))
    with boost_scores(model, [1, 2], [4], alpha=0.7, beta=0.3):
        edited = capture(model, x, what=("scores",))
    assert torch.equal(edited.scores[0], plain.scores[0]) and torch.equal(edited.scores[1], plain.scores[1])
    torch.testing.assert_close(edited.scores[2], paint_modulate(plain.scores[2], [1, 2], [4]))

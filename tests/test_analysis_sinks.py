"""Attention sinks (analysis spec A2.5): sink detection, sink dims, attention share."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.analysis.capture import AttentionRecord
from attnlab.analysis.sinks import (
    find_sink_dims,
    massive_activations,
    rms_normalize,
    sink_attention_share,
    sink_tokens,
    sinks_by_layer,
)


def test_one_massive_entry_makes_exactly_one_sink_token():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 12, 4096, generator=g)
    hidden[0, 5, 2533] = 100.0
    z = rms_normalize(hidden)
    expected = 100 / math.sqrt((100 ** 2 + 4095) / 4096)  # about 54
    assert z[0, 5, 2533].item() == pytest.approx(expected, rel=0.03)
    sinks = sink_tokens(hidden, [2533, 1415], tau=20)
    assert sinks.tolist() == [[t == 5 for t in range(12)]]


def test_sink_tokens_checks_dims():
    with pytest.raises(ValueError, match="out of range"):
        sink_tokens(torch.randn(3, 8), [9])
    with pytest.raises(ValueError, match="empty"):
        sink_tokens(torch.randn(3, 8), [])


def _record_with_sink(seed=0, L=4, H=3, N=10, d=64, sink=0, dim=7):
    g = torch.Generator().manual_seed(seed)
    record = AttentionRecord(num_layers=L, num_heads=H)
    for layer in range(L):
        hidden = torch.randn(1, N, d, generator=g)
        hidden[0, sink, dim] = 300.0  # massive activation on the sink token
        logits = torch.randn(1, H, N, N, generator=g)
        logits[..., sink] += 4.0  # the sink token gets most attention
        record.hidden[layer] = hidden
        record.probs[layer] = torch.softmax(logits, -1)
    return record


def test_find_sink_dims_ranks_the_massive_dimension_first_and_sinks_by_layer_finds_the_token():
    record = _record_with_sink(sink=2, dim=41)
    assert find_sink_dims(record, top=1) == [41]
    found = sinks_by_layer(record, [41], tau=5.0)
    assert found == {2: [2], 3: [2]}  # layers >= 2 only
    assert massive_activations(record)[0].dim == 41 and massive_activations(record)[0].token == 2


def test_sink_attention_share_is_the_mass_on_the_sink_columns():
    record = _record_with_sink()
    share = sink_attention_share(record, {1: [0, 3]})
    expected = record.probs[1][0][..., [0, 3]].sum(-1).mean(-1).double()
    torch.testing.assert_close(share[1], expected)
    assert share[0].abs().max() == 0 and share.shape == (4, 3)
    later = sink_attention_share(record, [0], query_start=4)
    torch.testing.assert_close(later[2], record.probs[2][0, :, 4:, 0].mean(-1).double())

"""Efficient probing (EP), mechanisms spec section 17: query m aggregates only its own value chunk."""

from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.nn import EfficientProbe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_matches_a_per_query_transcription() -> None:
    torch.manual_seed(0)
    probe = EfficientProbe(24, num_queries=4, d_out=2).double()
    x = torch.randn(3, 10, 24, generator=seeded(1), dtype=torch.float64)
    out = probe(x)
    assert out.shape == (3, 12)
    width = 24 // (2 * 4)
    for b in range(3):
        values = x[b] @ probe.to_v.weight.T  # (N, 12), no bias by default
        for m in range(4):
            logits = torch.stack([probe.queries[m] @ x[b, n] for n in range(10)]) * 24**-0.5
            weights = torch.exp(logits - logits.max())
            weights = weights / weights.sum()
            chunk = values[:, m * width:(m + 1) * width]
            torch.testing.assert_close(out[b, m * width:(m + 1) * width], weights @ chunk)


def test_query_m_aggregates_only_its_own_chunk() -> None:
    torch.manual_seed(1)
    probe = EfficientProbe(16, num_queries=4).double()
    x = torch.randn(2, 9, 16, generator=seeded(2), dtype=torch.float64)
    base = probe(x)
    width = 4
    for m in range(4):
        with torch.no_grad():
            probe.queries[m] += torch.randn(16, generator=seeded(10 + m), dtype=torch.float64)
        changed = probe(x)
        for other in range(4):
            part = slice(other * width, (other + 1) * width)
            if other == m:
                assert not torch.allclose(changed[:, part], base[:, part])
            else:
                torch.testing.assert_close(changed[:, part], base[:, part])
        base = changed
    # the value rows of chunk m feed only output chunk m
    with torch.no_grad():
        probe.to_v.weight[width:2 * width] += 1.0
    changed = probe(x)
    torch.testing.assert_close(changed[:, :width], base[:, :width])
    torch.testing.assert_close(changed[:, 2 * width:], base[:, 2 * width:])
    assert not torch.allclose(changed[:, width:2 * width], base[:, width:2 * width])


def test_keys_are_the_raw_tokens_and_padding_is_ignored() -> None:
    torch.manual_seed(2)
    probe = EfficientProbe(8, num_queries=2).double()
    names = {name for name, _ in probe.named_parameters()}
    assert names == {"queries", "to_v.weight"}  # no query or key projection, no value bias by default
    x = torch.randn(2, 6, 8, generator=seeded(3), dtype=torch.float64)
    attn = probe.attention(x)
    torch.testing.assert_close(attn, torch.softmax(torch.einsum("mc,bnc->bmn", probe.queries, x) * 8**-0.5, -1))
    padding = torch.ones(2, 6, dtype=torch.bool)
    padding[1, 4:] = False
    padded = probe(x, key_padding_mask=padding)
    torch.testing.assert_close(padded[1], probe(x[1:, :4])[0])
    torch.testing.assert_close(padded[0], probe(x[:1])[0])


def test_probe_head_batchnorm_and_linear() -> None:
    torch.manual_seed(3)
    probe = EfficientProbe(16, num_queries=8, num_classes=5).double()
    x = torch.randn(6, 7, 16, generator=seeded(4), dtype=torch.float64)
    logits = probe(x)
    assert logits.shape == (6, 5)
    pooled = probe.pool(x)
    normed = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(logits, normed @ probe.head[1].weight.T + probe.head[1].bias)
    assert probe.head[0].affine is False


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="dim=30 must be divisible by d_out \\* num_queries"):
        EfficientProbe(30, num_queries=4)
    with pytest.raises(ValueError, match="num_classes"):
        EfficientProbe(32, num_classes=0)
    probe = EfficientProbe(32)
    with pytest.raises(ValueError, match="x must have shape"):
        probe(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="key_padding_mask has a row without any real token"):
        probe(torch.randn(2, 5, 32), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))


def test_registered_as_a_probe() -> None:
    record = attnlab.get("efficient_probe")
    assert record.layer is EfficientProbe and record.role == "probe" and record.arxiv == "2506.10178"

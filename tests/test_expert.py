"""SHRP Expert Attention (arXiv 2512.20635): routing, usage statistics and pruning (spec analysis.md A9)."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn import ExpertAttention, PrunedAttention


def forced_to_head(layer: ExpertAttention, head: int) -> torch.Tensor:
    """Make the router pick ``head`` on inputs whose feature 0 is large: returns such an input."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[head, 0] = 10.0
    x = torch.randn(3, 9, layer.dim, dtype=torch.float64)
    x[..., 0] = 5.0 + 0.1 * x[..., 0]
    return x


@pytest.mark.parametrize("router", ["sequence", "token", "prefix"])
def test_router_forced_to_head_two_then_pruning_the_others_keeps_the_output(router: str) -> None:
    torch.manual_seed(0)
    layer = ExpertAttention(32, 4, router=router).double().eval()
    x = forced_to_head(layer, 2)
    probs, chosen = layer.route(x)
    assert (chosen == 2).all()
    pruned = layer.prune([2])
    assert pruned.heads == 1 and pruned.router is None
    torch.testing.assert_close(pruned(x), layer(x), rtol=1e-12, atol=1e-13)
    # the output is the expander applied to expert 2 alone (straight-through gate value 1)
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    d = layer.head_dim
    q2, k2, v2 = (t[..., 2 * d:3 * d] for t in (q, k, v))
    expert = torch.softmax(q2 @ k2.transpose(-1, -2) / d**0.5, dim=-1) @ v2  # (B, N, d)
    torch.testing.assert_close(layer(x), layer.expander(expert), rtol=1e-10, atol=1e-12)


def test_pruning_keeps_outputs_on_inputs_routed_to_kept_heads() -> None:
    torch.manual_seed(1)
    layer = ExpertAttention(24, 6).double().eval()  # one expert per sequence: 3 sequences use <= 3 of 6
    x = torch.randn(3, 10, 24, dtype=torch.float64)
    _, chosen = layer.route(x)
    kept = sorted(set(chosen.flatten().tolist()))
    assert len(kept) <= 3
    pruned = layer.prune(kept)
    assert pruned.heads == len(kept)
    torch.testing.assert_close(pruned(x), layer(x), rtol=1e-12, atol=1e-13)


def test_parameter_count_after_pruning_is_analytic() -> None:
    dim, heads, d, hidden = 32, 8, 4, 16
    layer = ExpertAttention(dim, heads, head_dim=d, expander_hidden=hidden)
    expander = d * hidden + hidden + hidden * dim + dim

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(layer) == 3 * dim * heads * d + heads * dim + expander
    for keep in (5, 2):
        assert count(layer.prune(keep)) == 3 * dim * keep * d + keep * dim + expander
    assert count(layer.prune(1)) == 3 * dim * d + expander  # one head: no router
    assert count(layer.prune(0)) == 0
    assert isinstance(layer.prune(0), PrunedAttention)


def test_usage_statistics_sum_to_one_and_drive_pruning() -> None:
    torch.manual_seed(2)
    layer = ExpertAttention(16, 4, router="token", usage_momentum=0.5).train()
    x = forced_to_head(layer.double(), 3)
    for _ in range(6):
        layer(x)
        torch.testing.assert_close(layer.usage.sum(), torch.tensor(1.0, dtype=layer.usage.dtype))
    assert layer.usage.argmax() == 3 and layer.usage[3] > 0.9
    assert layer.kept_heads(1) == [3]
    assert layer.kept_heads(min_usage=0.5) == [3]
    assert layer.selections.tolist() == [0, 0, 0, 6 * 3 * 9]  # 6 batches of 3 x 9 tokens, all to head 3
    assert layer.kept_heads() == [3]  # the unused heads go
    assert layer.prune().heads == 1
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    # deterministic: the same statistics give the same pruned weights; ties go to the lower index
    a, b = layer.prune(2), layer.prune(2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    fresh = ExpertAttention(16, 4)
    assert fresh.kept_heads(2) == [0, 1]


def test_sequence_router_picks_one_expert_per_sequence_and_ignores_padding() -> None:
    torch.manual_seed(3)
    layer = ExpertAttention(16, 4).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    probs, chosen = layer.route(x)
    assert probs.shape == (2, 1, 4) and chosen.shape == (2, 1)
    padding = torch.ones(2, 9, dtype=torch.bool)
    padding[:, 7:] = False
    padded = torch.cat([x, torch.randn(2, 2, 16, dtype=torch.float64) * 10], dim=1)
    torch.testing.assert_close(layer(padded, key_padding_mask=padding)[:, :7], layer(x))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="router='sequence'"):
        ExpertAttention(16, 4, router="sequence", causal=True)
    with pytest.raises(ValueError, match="router='mean'"):
        ExpertAttention(16, 4, router="mean")
    layer = ExpertAttention(16, 4)
    with pytest.raises(ValueError, match="no routing statistics"):
        layer.prune()
    with pytest.raises(ValueError, match="keep=5"):
        layer.prune(5)
    with pytest.raises(ValueError, match="keep="):
        layer.prune([0, 7])
    with pytest.raises(ValueError, match="key_padding_mask"):
        layer(torch.randn(2, 5, 16), key_padding_mask=torch.ones(2, 4, dtype=torch.bool))

"""MoH (arXiv 2410.11842): identities from the spec, section 5."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn import MoHAttention, moh_load_balance_loss


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_all_shared_heads_with_unit_gates_is_standard_multi_head_attention(causal: bool) -> None:
    torch.manual_seed(0)
    dim, heads, N = 24, 4, 9
    layer = MoHAttention(dim, heads, shared_heads=heads, routed_heads_per_token=0, causal=causal).double()
    torch.nn.init.zeros_(layer.router_shared.weight)  # softmax uniform -> every gate is exactly 1
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(layer.qkv.weight)
        mha.in_proj_bias.zero_()
        mha.out_proj.weight.copy_(layer.proj.weight)
        mha.out_proj.bias.copy_(layer.proj.bias)
    x = torch.randn(2, N, dim, dtype=torch.float64)
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None  # True = not allowed
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.head_gates(x).gates, torch.ones(2, N, heads, dtype=torch.float64))


def test_gates_select_exactly_k_routed_heads_and_sum_to_their_stage_weight() -> None:
    torch.manual_seed(1)
    heads, shared, k = 8, 3, 2
    layer = MoHAttention(32, heads, shared_heads=shared, routed_heads_per_token=k).double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    routing = layer.head_gates(x)
    routed = routing.gates[..., shared:]
    assert ((routed != 0).sum(dim=-1) == k).all()
    alpha1, alpha2 = routing.stage_weights.unbind(-1)
    torch.testing.assert_close(alpha1 + alpha2, torch.full_like(alpha1, 2.0))
    torch.testing.assert_close(routed.sum(dim=-1), k * alpha2)
    torch.testing.assert_close(routing.gates[..., :shared].sum(dim=-1), shared * alpha1)
    # the selected heads are the top-k router probabilities, weighted in their proportion
    top = routing.router_probs.topk(k, dim=-1)
    picked = routed.gather(-1, top.indices)
    torch.testing.assert_close(picked, top.values / top.values.sum(-1, keepdim=True) * k * alpha2[..., None])


def test_load_balance_loss_on_a_hand_example() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    selected = torch.tensor([[1, 0, 0], [0, 1, 0]])
    # P = (0.4, 0.4, 0.2), f = (0.5, 0.5, 0); E * sum P f = 3 * (0.2 + 0.2) = 1.2
    torch.testing.assert_close(moh_load_balance_loss(probs, selected), torch.tensor(1.2))


def test_aux_loss_is_set_in_training_and_reaches_the_router() -> None:
    torch.manual_seed(2)
    layer = MoHAttention(16, 4, shared_heads=1, routed_heads_per_token=1)
    x = torch.randn(2, 7, 16)
    layer.train()
    layer(x)
    routing = layer.head_gates(x)
    E = 3
    P = routing.router_probs.reshape(-1, E).mean(0)
    f = routing.selected.reshape(-1, E).mean(0)
    torch.testing.assert_close(layer.aux_loss, E * (P * f).sum())
    layer.aux_loss.backward()
    assert layer.router_routed.weight.grad.abs().sum() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_single_shared_head_has_gate_one_before_the_stage_weight() -> None:
    layer = MoHAttention(16, 4, shared_heads=1, routed_heads_per_token=2)
    routing = layer.head_gates(torch.randn(2, 5, 16))
    torch.testing.assert_close(routing.gates[..., 0], routing.stage_weights[..., 0])


def test_defaults_and_bad_arguments() -> None:
    layer = MoHAttention(32, 8)
    assert (layer.shared_heads, layer.routed_heads_per_token) == (4, 2)
    with pytest.raises(ValueError, match="routed_heads_per_token=5"):
        MoHAttention(32, 8, shared_heads=4, routed_heads_per_token=5)
    with pytest.raises(ValueError, match="routed_heads_per_token=0"):
        MoHAttention(32, 8, shared_heads=4, routed_heads_per_token=0)
    with pytest.raises(ValueError, match="shared_heads=9"):
        MoHAttention(32, 8, shared_heads=9)
    with pytest.raises(ValueError, match="heads=3"):
        MoHAttention(32, 3)

"""Deconstructing Attention (arXiv 2510.11602): what each inferred variant keeps and drops (spec 16, A11)."""

from __future__ import annotations

import pytest
import torch

from attnlab.nn import DeconstructedAttention, variant_layers


def layer(variant: str, causal: bool = False, **options: object) -> DeconstructedAttention:
    torch.manual_seed(0)
    return DeconstructedAttention(12, 3, variant=variant, causal=causal, **options).double()


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_standard_variant_is_multi_head_attention(causal: bool) -> None:
    attn = layer("standard", causal)
    mha = torch.nn.MultiheadAttention(12, 3, bias=False, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]))
        mha.out_proj.weight.copy_(attn.to_out.weight)
    x = rand(2, 6, 12)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1) if causal else None
    expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x), expected)


def test_no_mixing_is_a_per_token_linear_map() -> None:
    attn = layer("no_mixing")
    x = rand(2, 5, 12)
    torch.testing.assert_close(attn(x), x @ attn.to_v.weight.T @ attn.to_out.weight.T)
    x2 = x.clone()
    x2[:, 1:] = rand(2, 4, 12)
    torch.testing.assert_close(attn(x2)[:, 0], attn(x)[:, 0])
    assert not hasattr(attn, "to_q")


@pytest.mark.parametrize("variant,extra", [
    ("fixed_sequence_qk", {}),
    ("static_embedding_qk", {"embeddings": rand(2, 7, 12)}),
    ("random_embedding_qk", {"token_ids": torch.randint(0, 20, (2, 7))}),
], ids=["fixed-sequence", "static-embedding", "random-embedding"])
def test_attention_weights_do_not_depend_on_the_hidden_states(variant: str, extra: dict) -> None:
    """Q/K decoupled from x: the output is linear in x (fixed weights), unlike standard attention."""
    attn = layer(variant, causal=True, max_length=16, vocab_size=20)
    x1, x2 = rand(2, 7, 12), rand(2, 7, 12)
    torch.testing.assert_close(attn(x1 + 2 * x2, **extra), attn(x1, **extra) + 2 * attn(x2, **extra))
    standard = layer("standard")
    assert not torch.allclose(standard(x1 + 2 * x2), standard(x1) + 2 * standard(x2))


def test_what_the_attention_weights_do_depend_on() -> None:
    x = rand(2, 7, 12)
    fixed = layer("fixed_sequence_qk", max_length=16)
    before = fixed(x)
    with torch.no_grad():
        fixed.positions[:7].normal_()  # the per-position matrix is what the weights depend on
    assert not torch.allclose(fixed(x), before)
    static = layer("static_embedding_qk")
    e1, e2 = rand(2, 7, 12), rand(2, 7, 12)
    assert not torch.allclose(static(x, embeddings=e1), static(x, embeddings=e2))
    random_qk = layer("random_embedding_qk", vocab_size=20)
    ids = torch.randint(0, 20, (2, 7))
    assert not torch.allclose(random_qk(x, token_ids=ids), random_qk(x, token_ids=(ids + 1) % 20))
    assert "random_embeddings" not in dict(random_qk.named_parameters())  # frozen
    again = DeconstructedAttention(12, 3, variant="random_embedding_qk", vocab_size=20)
    assert torch.equal(again.random_embeddings, random_qk.random_embeddings.float())  # seeded table
    frozen_positions = DeconstructedAttention(12, 3, variant="fixed_sequence_qk", fixed_sequence="random")
    assert "positions" not in dict(frozen_positions.named_parameters())


def test_variant_layer_patterns() -> None:
    assert variant_layers(4) == [True] * 4
    assert variant_layers(6, "every_k", 3) == [True, True, False, True, True, False]
    assert variant_layers(4, "first_k", 1) == [True, False, False, False]
    assert variant_layers(4, "last_k", 2) == [False, False, True, True]
    with pytest.raises(ValueError, match="pattern='middle'"):
        variant_layers(4, "middle")


def test_missing_or_bad_extra_inputs_raise() -> None:
    x = rand(2, 5, 12)
    with pytest.raises(ValueError, match="embeddings="):
        layer("static_embedding_qk")(x)
    with pytest.raises(ValueError, match="token_ids="):
        layer("random_embedding_qk", vocab_size=9)(x)
    with pytest.raises(ValueError, match="vocab_size=9"):
        layer("random_embedding_qk", vocab_size=9)(x, token_ids=torch.full((2, 5), 9))
    with pytest.raises(ValueError, match="vocab_size"):
        DeconstructedAttention(12, 3, variant="random_embedding_qk")
    with pytest.raises(ValueError, match="max_length=4"):
        layer("fixed_sequence_qk", max_length=4)(x)
    with pytest.raises(ValueError, match="Approximate"):
        DeconstructedAttention(12, 3, variant="approximate")

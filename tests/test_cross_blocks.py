"""Cross-attention blocks of the applied papers (analysis spec Part B): each block's equivalence test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.nn import (
    ClassSemanticsAttention,
    DuplexAlignmentAttention,
    GlobalLocalCrossAttention,
    PairwiseCrossAttention,
    PooledVisualCrossAttention,
    TripleAlignmentAttention,
    attention_rollout,
    merge_visual_tokens,
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed), dtype=torch.float64)


def mha(q_in: torch.Tensor, kv_in: torch.Tensor, wq, wk, wv, wo, heads: int, *, bq=None, bk=None, bv=None, bo=None,
        key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Multi-head softmax attention written out with plain matrix products (independent of attnlab)."""
    def lin(x, w, b):
        return x @ w.T + (0 if b is None else b)

    q, k, v = lin(q_in, wq, bq), lin(kv_in, wk, bk), lin(kv_in, wv, bv)
    B, N, D = q.shape
    d = D // heads
    outs = []
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / d**0.5  # (B, N, M)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        if causal:
            scores = scores.masked_fill(torch.ones(N, k.shape[1], dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v[..., part])
    return lin(torch.cat(outs, dim=-1), wo, bo)


# --- DCAL (B3) ---------------------------------------------------------------------------------------

def test_attention_rollout_is_the_product_of_residual_maps() -> None:
    maps = [randn(2, 3, 6, 6, seed=s).softmax(-1) for s in range(3)]
    expected = torch.eye(6, dtype=torch.float64).expand(2, 6, 6)
    for attn in maps:
        expected = (0.5 * attn.mean(1) + 0.5 * torch.eye(6, dtype=torch.float64)) @ expected
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout, expected)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="attentions\\[1\\] must have shape"):
        attention_rollout([maps[0], maps[1][0]])


def test_glca_local_queries_attend_to_all_global_keys() -> None:
    torch.manual_seed(0)
    glca = GlobalLocalCrossAttention(16, 4, top_ratio=0.3).double()
    x = randn(2, 11, 16, seed=1)
    rollout = attention_rollout([randn(2, 2, 11, 11, seed=2).softmax(-1)])
    out, indices = glca(x, rollout=rollout)
    assert out.shape == (2, 1 + 3, 16)  # CLS + round(0.3 * 10) patches
    expected_top = rollout[:, 0, 1:].argsort(dim=-1, descending=True)[:, :3] + 1
    assert torch.equal(indices[:, 0], torch.zeros(2, dtype=torch.long))
    assert torch.equal(indices[:, 1:], expected_top)
    p = glca.proj
    full = mha(x, x, p.to_q.weight, p.to_kv.weight[:16], p.to_kv.weight[16:], p.to_out.weight, 4,
               bq=p.to_q.bias, bk=p.to_kv.bias[:16], bv=p.to_kv.bias[16:], bo=p.to_out.bias)
    torch.testing.assert_close(out, torch.stack([full[b, indices[b]] for b in range(2)]))
    same, _ = glca(x, attentions=[randn(2, 2, 11, 11, seed=2).softmax(-1)])
    torch.testing.assert_close(same, out)


def test_pwca_with_the_same_image_equals_self_attention() -> None:
    torch.manual_seed(1)
    pwca = PairwiseCrossAttention(16, 4).double()
    x1, x2 = randn(2, 7, 16, seed=3), randn(2, 9, 16, seed=4)
    p = pwca.proj
    weights = dict(bq=p.to_q.bias, bk=p.to_kv.bias[:16], bv=p.to_kv.bias[16:], bo=p.to_out.bias)
    self_attention = mha(x1, x1, p.to_q.weight, p.to_kv.weight[:16], p.to_kv.weight[16:], p.to_out.weight, 4,
                         **weights)
    torch.testing.assert_close(pwca(x1, x1), self_attention)
    torch.testing.assert_close(pwca.self_attention(x1), self_attention)
    joint = torch.cat([x1, x2], dim=1)
    expected = mha(x1, joint, p.to_q.weight, p.to_kv.weight[:16], p.to_kv.weight[16:], p.to_out.weight, 4,
                   **weights)
    torch.testing.assert_close(pwca(x1, x2), expected)
    assert not torch.allclose(pwca(x1, x2), self_attention)


# --- CrossLMM (B4) -----------------------------------------------------------------------------------

def test_crosslmm_with_zero_gates_is_the_self_attention_sublayer() -> None:
    torch.manual_seed(2)
    layer = PooledVisualCrossAttention(16, 4, visual_length=3).double()
    x, visual = randn(2, 8, 16, seed=5), randn(2, 20, 16, seed=6)
    expected = layer.norm(layer.self_attention(x) + x)
    torch.testing.assert_close(layer(x, visual), expected)


def test_crosslmm_gated_visual_and_text_branches() -> None:
    torch.manual_seed(3)
    layer = PooledVisualCrossAttention(16, 4, causal=True).double()
    with torch.no_grad():
        layer.gate_v2v.fill_(0.7)
        layer.gate_t2v.fill_(-0.4)
    x, visual = randn(2, 8, 16, seed=7), randn(2, 20, 16, seed=8)
    mixed = layer.norm(layer.self_attention(x) + x)
    p = layer.cross
    attended = mha(mixed, visual, p.to_q.weight, p.to_kv.weight[:16], p.to_kv.weight[16:], p.to_out.weight, 4)
    out = layer(x, visual, visual_length=3)
    torch.testing.assert_close(out[:, :3], mixed[:, :3] + torch.tanh(torch.tensor(0.7)) * attended[:, :3])
    torch.testing.assert_close(out[:, 3:], mixed[:, 3:] + torch.tanh(torch.tensor(-0.4)) * attended[:, 3:])
    with pytest.raises(ValueError, match="visual_length"):
        layer(x, visual)
    with pytest.raises(ValueError, match="visual_length must be an int in \\[0, N=8\\]"):
        layer(x, visual, visual_length=9)


def test_merge_visual_tokens_pools_each_frame_to_a_grid() -> None:
    frames = randn(2, 3, 27, 27, 5, seed=9)
    merged = merge_visual_tokens(frames)
    assert merged.shape == (2, 3 * 9, 5)
    # token (frame 1, row 2, column 0) is the mean of rows 18..26, columns 0..8 of frame 1
    torch.testing.assert_close(merged[:, 9 + 2 * 3 + 0], frames[:, 1, 18:27, 0:9].mean(dim=(1, 2)))
    torch.testing.assert_close(merge_visual_tokens(frames, mode="max")[:, 0], frames[:, 0, :9, :9].amax(dim=(1, 2)))


# --- SegVG (B1) --------------------------------------------------------------------------------------

def test_triple_alignment_with_text_and_objects_masked_is_visual_self_attention() -> None:
    torch.manual_seed(4)
    layer = TripleAlignmentAttention(16, 4, text_dim=12, dropout=0.0).double().eval()
    visual, text, objects = randn(2, 9, 16, seed=10), randn(2, 5, 12, seed=11), randn(2, 3, 16, seed=12)
    pos = randn(2, 9, 16, seed=13)
    out = layer(visual, text, objects, visual_pos=pos, object_pos=randn(3, 16, seed=14),
                text_mask=torch.zeros(2, 5, dtype=torch.bool), object_mask=torch.zeros(2, 3, dtype=torch.bool))
    expected = visual + _visual_self_attention(layer, visual, pos)
    torch.testing.assert_close(out.visual, expected)
    assert out.text.shape == (2, 5, 12) and out.objects.shape == (2, 3, 16)


def _visual_self_attention(layer: TripleAlignmentAttention, visual: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Standard pre-LN MHSA on the visual stream alone: position added to q and k, not to v."""
    m = layer.visual
    normed = m.norm(visual)
    q = (normed + pos) @ m.to_q.weight.T + m.to_q.bias
    k = (normed + pos) @ m.to_k.weight.T + m.to_k.bias
    v = normed @ m.to_v.weight.T + m.to_v.bias
    d = 4
    heads = [torch.softmax(q[..., h * d:(h + 1) * d] @ k[..., h * d:(h + 1) * d].transpose(1, 2) / d**0.5, -1)
             @ v[..., h * d:(h + 1) * d] for h in range(4)]
    return torch.cat(heads, -1) @ m.to_out.weight.T + m.to_out.bias


def test_triple_alignment_streams_see_each_other_and_drop_key() -> None:
    torch.manual_seed(5)
    layer = TripleAlignmentAttention(16, 4, text_dim=12, dropout=0.0, drop_key=0.3).double()
    visual, text, objects = randn(2, 9, 16, seed=15), randn(2, 5, 12, seed=16), randn(2, 3, 16, seed=17)
    layer.eval()
    base = layer(visual, text, objects)
    changed_text = layer(visual, text + randn(2, 5, 12, seed=18), objects)
    assert not torch.allclose(base.visual, changed_text.visual)  # visual tokens attend to text
    assert not torch.allclose(base.objects, changed_text.objects)  # so do the object queries
    padded = layer(visual, text, objects, text_mask=torch.tensor([[True] * 3 + [False] * 2] * 2))
    torch.testing.assert_close(padded.visual, layer(visual, text[:, :3], objects).visual)
    layer.train()
    torch.manual_seed(6)
    assert not torch.allclose(layer(visual, text, objects).visual, base.visual)  # real DropKey in training
    layer.drop_key = 0.0
    torch.testing.assert_close(layer(visual, text, objects).visual, base.visual)  # the code's no-op DropKey
    with pytest.raises(ValueError, match="visual_pos must have shape"):
        layer(visual, text, objects, visual_pos=randn(8, 16, seed=19))


# --- MODA (B2) ---------------------------------------------------------------------------------------

def test_moda_with_zero_ratio_and_identity_fuse_is_standard_attention() -> None:
    torch.manual_seed(6)
    layer = DuplexAlignmentAttention(16, 4, causal=True, duplex=True).double()
    x = randn(2, 10, 16, seed=20)
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[:, 2:6] = True
    expected = mha(x, x, layer.to_q.weight, layer.to_k.weight, layer.to_v.weight, layer.to_out.weight, 4, causal=True)
    torch.testing.assert_close(layer(x, visual), expected)


def moda_code_transcription(layer: DuplexAlignmentAttention, x: torch.Tensor, vflag: torch.Tensor) -> torch.Tensor:
    """The released MODA forward (global text basis), one sample at a time, written out with loops."""
    B, N, _ = x.shape
    H, d = layer.heads, layer.head_dim
    q = (x @ layer.to_q.weight.T).view(B, N, H, d).transpose(1, 2)
    k = (x @ layer.to_k.weight.T).view(B, N, H, d)  # (B, N, H, d): the code's layout after transpose(1, 2)
    v = (x @ layer.to_v.weight.T).view(B, N, H, d)
    k = k.clone()
    for i in range(B):
        tflag = ~vflag[i]
        key_v, key_t, value_t = k[i][vflag[i]], k[i][tflag], v[i][tflag]  # (n, H, d)
        res_v = key_v
        key_v = (key_v + 1e-6) / (key_v + 1e-6).norm(dim=-1, keepdim=True)
        key_t = (key_t + 1e-6) / (key_t + 1e-6).norm(dim=-1, keepdim=True)
        gram_t = torch.einsum("nhd,nhe->hde", key_t, value_t)
        gram_t = gram_t / gram_t.norm(dim=-1, keepdim=True)
        aligned_v = torch.einsum("nhd,hde->nhe", key_v, gram_t)
        k[i][vflag[i]] = (res_v + layer.ratio_v * aligned_v) @ layer.fuse_v.weight.T
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * d)
    return out @ layer.to_out.weight.T


def test_moda_matches_the_released_code() -> None:
    torch.manual_seed(7)
    layer = DuplexAlignmentAttention(16, 4, causal=True, fuse_init="random").double()
    with torch.no_grad():
        layer.ratio_v.normal_()
    x = randn(2, 10, 16, seed=21)
    visual = torch.zeros(2, 10, dtype=torch.bool)
    visual[0, 1:5] = True
    visual[1, 3:9] = True
    torch.testing.assert_close(layer(x, visual), moda_code_transcription(layer, x, visual))


def test_moda_prefix_basis_is_causal_and_global_basis_reads_later_text() -> None:
    torch.manual_seed(8)
    visual = torch.zeros(1, 10, dtype=torch.bool)
    visual[:, 1:5] = True
    x = randn(1, 10, 16, seed=22)
    later = x.clone()
    later[:, 7:] += randn(1, 3, 16, seed=23)
    for alignment, causal_safe in (("prefix", True), ("global", False)):
        layer = DuplexAlignmentAttention(16, 4, causal=True, duplex=True, alignment=alignment).double()
        with torch.no_grad():
            layer.ratio_v.normal_()
            layer.ratio_t.normal_()
        before, after = layer(x, visual), layer(later, visual)
        assert torch.allclose(before[:, :7], after[:, :7]) == causal_safe, alignment


def test_moda_duplex_changes_text_keys_only_through_its_own_ratio() -> None:
    torch.manual_seed(9)
    single = DuplexAlignmentAttention(16, 4, causal=False).double()
    duplex = DuplexAlignmentAttention(16, 4, causal=False, duplex=True).double()
    duplex.load_state_dict(single.state_dict(), strict=False)
    with torch.no_grad():
        single.ratio_v.normal_()
        duplex.ratio_v.copy_(single.ratio_v)
    x = randn(2, 8, 16, seed=24)
    visual = torch.zeros(2, 8, dtype=torch.bool)
    visual[:, :3] = True
    torch.testing.assert_close(duplex(x, visual), single(x, visual))  # r_t = 0, W_fuse_t = I
    with torch.no_grad():
        duplex.ratio_t.normal_()
    assert not torch.allclose(duplex(x, visual), single(x, visual))
    with pytest.raises(ValueError, match="overlap"):
        single(x, visual, text_mask=torch.ones(2, 8, dtype=torch.bool))


# --- CSA (B5) ----------------------------------------------------------------------------------------

def test_csa_matches_its_formula() -> None:
    torch.manual_seed(10)
    layer = ClassSemanticsAttention(12, 20, reduction=4).double()
    x, r = randn(2, 9, 12, seed=25), randn(2, 9, 20, seed=26)
    w1, b1 = layer.channel_gate[0].weight, layer.channel_gate[0].bias
    w2, b2 = layer.channel_gate[2].weight, layer.channel_gate[2].bias
    a_c = torch.sigmoid(torch.relu(r.mean(1) @ w1.T + b1) @ w2.T + b2)  # (B, C)
    conv_w, conv_b = layer.temporal_gate.weight[0], layer.temporal_gate.bias[0]  # (C_r, 3)
    padded = F.pad(r, (0, 0, 1, 1))  # zero padding in time
    a_t = torch.sigmoid(torch.stack([(padded[:, t:t + 3] * conv_w.T).sum((1, 2)) for t in range(9)], 1) + conv_b)
    torch.testing.assert_close(layer(x, r), x * a_c[:, None] + x * a_t[:, :, None])
    product = ClassSemanticsAttention(12, 20, reduction=4, fusion="product").double()
    product.load_state_dict(layer.state_dict())
    torch.testing.assert_close(product(x, r), x * a_c[:, None] * a_t[:, :, None])


def test_csa_weights_come_from_the_semantics_only() -> None:
    torch.manual_seed(11)
    layer = ClassSemanticsAttention(12, 20, reduction=4).double()
    f1, f2, r = randn(2, 9, 12, seed=27), randn(2, 9, 12, seed=28), randn(2, 9, 20, seed=29)
    torch.testing.assert_close(layer(f1 + 2 * f2, r), layer(f1, r) + 2 * layer(f2, r))  # linear in F for fixed R
    _, temporal = layer.weights(r)
    r2 = r.clone()
    r2[:, 5] += randn(2, 20, seed=30)
    _, temporal2 = layer.weights(r2)
    torch.testing.assert_close(temporal2[:, [0, 1, 2, 3, 7, 8]], temporal[:, [0, 1, 2, 3, 7, 8]])  # kernel 3
    assert not torch.allclose(temporal2[:, 5], temporal[:, 5])
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ClassSemanticsAttention(12, kernel_size=4)
    with pytest.raises(ValueError, match="semantics must have the batch and length"):
        layer(f1, r[:, :8])


@pytest.mark.parametrize("name,arxiv", [("dcal_glca", "2205.02151"), ("dcal_pwca", "2205.02151"),
                                        ("crosslmm", "2505.17020"), ("segvg_triple", "2407.03200"),
                                        ("moda_duplex", "2507.04635"), ("csa", "2109.02613")])
def test_registered_with_paper_and_arxiv(name: str, arxiv: str) -> None:
    record = attnlab.get(name)
    assert record.arxiv == arxiv and record.paper and record.role == "cross" and record.layer is not None

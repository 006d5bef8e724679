"""NiNformer (arXiv 2403.02411): gating unit, shared LayerNorm, position-specific token mixing (spec 14)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnlab.nn import MixerGatingUnit, NiNBlock


def mlp(x: torch.Tensor, first: torch.nn.Linear, second: torch.nn.Linear) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(x, first.weight, first.bias)), second.weight, second.bias)


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)


def test_gating_unit_is_projection_times_mixer_block() -> None:
    torch.manual_seed(0)
    unit = MixerGatingUnit(6, seq_len=5, token_dim=4, channel_dim=7).double()
    randomise(unit)  # LayerNorm weights too, so their use is tested
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    m = unit.mixer
    token = mlp(layer_norm(x, m.token_norm).transpose(1, 2), m.token_mlp[0], m.token_mlp[3]).transpose(1, 2)
    y = x + token
    y = y + mlp(layer_norm(y, m.channel_norm), m.channel_mlp[0], m.channel_mlp[3])
    expected = F.linear(x, unit.proj.weight, unit.proj.bias) * y
    torch.testing.assert_close(unit(x), expected)
    with torch.no_grad():  # no sigmoid on the gate: the output is linear in the projection
        unit.proj.bias.zero_()
        base = unit(x)
        unit.proj.weight.mul_(2.0)
    torch.testing.assert_close(unit(x), 2 * base)


def test_nin_block_uses_one_layer_norm_for_both_sublayers() -> None:
    torch.manual_seed(1)
    block = NiNBlock(6, 10, 7).double()
    randomise(block)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    h = x + block.mgu(layer_norm(x, block.norm))
    expected = h + mlp(layer_norm(h, block.norm), block.ffn[0], block.ffn[3])
    torch.testing.assert_close(block(x), expected)
    names = [name for name, _ in block.named_modules() if isinstance(_, torch.nn.LayerNorm)]
    assert names == ["norm", "mgu.mixer.token_norm", "mgu.mixer.channel_norm"]


def test_token_mixing_is_position_specific() -> None:
    torch.manual_seed(2)
    block = NiNBlock(8, 16, 9).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    perm = torch.randperm(9)
    assert not torch.allclose(block(x[:, perm]), block(x)[:, perm])
    x2 = x.clone()
    x2[:, 8] += torch.randn(2, 8, dtype=torch.float64)  # every position sees the last token (token MLP)
    assert not torch.allclose(block(x2)[:, 0], block(x)[:, 0])


def test_fixed_length_and_no_causal_form() -> None:
    unit = MixerGatingUnit(8, 2, seq_len=6)
    with pytest.raises(ValueError, match="N=5"):
        unit(torch.randn(1, 5, 8))
    with pytest.raises(NotImplementedError, match="causal"):
        MixerGatingUnit(8, 2, seq_len=6, causal=True)
    with pytest.raises(TypeError, match="seq_len"):
        MixerGatingUnit(8, 2)

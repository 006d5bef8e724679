"""One softmax with hook points: the reference, nn.Attention's hooks and the Hugging Face dispatcher agree,
and a fully masked row gives zeros and finite gradients in every path (left and right padding)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab.analysis.capture import capture
from attnlab.analysis.hooks import intervene
from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.nn import Attention
from attnlab.ops import softmax_attention, softmax_attention_reference
from attnlab.ops.softmax import softmax_attention_hooked


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def dense(q, k, v, allowed, scale):
    """Independent oracle on the rows that have a key: loops over rows, softmax over the allowed keys only."""
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    B, _, N, _ = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    probs = torch.zeros(B, H, N, k.shape[2], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys):
                    p = torch.softmax(k[b, h, keys] @ q[b, h, i] * scale, 0)
                    probs[b, h, i, keys] = p
                    out[b, h, i] = p @ v[b, h, keys]
    return out, probs


def identity(tensor: torch.Tensor, layer: int) -> torch.Tensor:
    return tensor


def padding_mask(side: str, B: int, N: int, pad: int) -> torch.Tensor:
    """``[B, N]`` True = real token: row 0 padded by ``pad`` on ``side``, row 1 by 1, the last row not at all."""
    mask = torch.ones(B, N, dtype=torch.bool)
    for b, count in enumerate((pad, 1)[: B - 1]):
        if side == "left":
            mask[b, :count] = False
        else:
            mask[b, N - count:] = False
    return mask


# --- the function itself ----------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mask_type", ["padding", "boolean", "additive"])
def test_hooked_softmax_equals_the_oracle_with_zero_empty_rows(side: str, mask_type: str) -> None:
    B, H, Hkv, N, D = 3, 4, 2, 9, 8
    q, k, v = (rand(B, h, N, D, seed=s).requires_grad_() for s, h in ((1, H), (2, Hkv), (3, Hkv)))
    padding = padding_mask(side, B, N, pad=4)
    options: dict = {"causal": True}
    if mask_type == "padding":
        options["key_padding_mask"] = padding
    elif mask_type == "boolean":
        options["attn_mask"] = padding[:, None, None, :]
    else:
        options["attn_mask"] = torch.zeros(B, 1, 1, N, dtype=torch.float64).masked_fill(
            ~padding[:, None, None, :], float("-inf"))
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & padding[:, None, None, :]  # (B, 1, N, N)
    allowed = allowed.expand(B, H, N, N)
    empty = ~allowed.any(-1)
    assert empty.any() == (side == "left")  # left padding + causal: the first queries see no key
    seen = {}

    def keep(name):
        def hook(t):
            seen[name] = t
            return t
        return hook

    out, probs = softmax_attention_hooked(q, k, v, on_scores=keep("scores"), on_probs=keep("probs"), **options)
    expected_out, expected_probs = dense(q.detach(), k.detach(), v.detach(), allowed, D ** -0.5)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probs, expected_probs, rtol=1e-10, atol=1e-12)
    assert probs is seen["probs"] and torch.equal(probs[empty], torch.zeros_like(probs[empty]))
    assert torch.isneginf(seen["scores"][~allowed]).all() and torch.isfinite(seen["scores"][allowed]).all()
    # the same bits as the reference (it is this function without hooks); SDPA's path agrees
    assert torch.equal(out, softmax_attention_reference(q, k, v, **options))
    torch.testing.assert_close(out, softmax_attention(q, k, v, impl="sdpa", **options), rtol=1e-10, atol=1e-12)
    weights = rand(B, H, N, D, seed=4)
    (out * weights).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    assert all(torch.isfinite(g).all() for g in grads)
    for x in (q, k, v):
        x.grad = None
    (softmax_attention(q, k, v, impl="sdpa", **options) * weights).sum().backward()
    for g, x in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, x.grad, rtol=1e-10, atol=1e-12)


def test_a_hook_that_masks_a_whole_row_gives_zeros_and_finite_gradients() -> None:
    q, k, v = (rand(2, 3, 6, 4, seed=s).requires_grad_() for s in (5, 6, 7))

    def drop_row_2(scores):
        return scores.index_fill(2, torch.tensor([2]), float("-inf"))

    out, probs = softmax_attention_hooked(q, k, v, on_scores=drop_row_2)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert torch.equal(probs[:, :, 2], torch.zeros_like(probs[:, :, 2]))
    reference = softmax_attention_reference(q, k, v)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(out[:, :, keep], reference[:, :, keep])
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_hooks_edit_the_probabilities_used_for_the_output() -> None:
    q, k, v = (rand(1, 2, 5, 4, seed=s) for s in (8, 9, 10))
    out, probs = softmax_attention_hooked(q, k, v, causal=True, on_probs=lambda a: torch.ones_like(a).tril() / 5)
    expected = torch.cumsum(v, dim=2) / 5  # uniform 1/5 over the keys up to i
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(probs, torch.ones(1, 2, 5, 5, dtype=torch.float64).tril() / 5)


@pytest.mark.parametrize("kwargs,error,words", [
    ({"on_scores": lambda s: s[..., :2]}, ValueError, "on_scores must return a tensor of shape (1, 2, 4, 4)"),
    ({"on_probs": lambda a: None}, ValueError, "on_probs must return a tensor"),
    ({"dropout": 1.0}, ValueError, "dropout=1.0"),
    ({"dropout": True}, ValueError, "dropout=True"),
    ({"on_probs": 0.5}, TypeError, "on_probs must be a function"),
    ({"causal": 1}, TypeError, "causal must be a bool"),
])
def test_bad_hooks_and_options_are_refused_by_name(kwargs: dict, error: type, words: str) -> None:
    q = rand(1, 2, 4, 8, seed=11)
    with pytest.raises(error) as info:
        softmax_attention_hooked(q, q, q, **kwargs)
    assert words in str(info.value)


def test_dropout_acts_on_the_output_only() -> None:
    q, k, v = (rand(2, 2, 16, 8, seed=s) for s in (12, 13, 14))
    torch.manual_seed(0)
    out, probs = softmax_attention_hooked(q, k, v, dropout=0.5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 16, dtype=torch.float64))
    torch.manual_seed(0)
    kept = torch.nn.functional.dropout(probs, p=0.5)
    torch.testing.assert_close(out, kept @ v)
    assert not torch.allclose(out, probs @ v)


# --- nn.Attention: stacked causal layers ---------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, causal: bool, impl: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = Attention(32, 4, kv_heads=2, causal=causal, impl=impl)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x), key_padding_mask=key_padding_mask)


class _Stack(nn.Module):
    def __init__(self, causal: bool, impl: str, layers: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(causal, impl) for _ in range(layers)])

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x


def _grads(model: nn.Module, x: torch.Tensor, weights: torch.Tensor, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = run(x)
    (out * weights).sum().backward()
    return out.detach(), [x.grad, *[p.grad for p in model.parameters()]]


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_capture_and_identity_hooks_on_padded_attnlab_layers_change_nothing(side: str, causal: bool,
                                                                            impl: str) -> None:
    B, N = 3, 10
    x = rand(B, N, 32, seed=20)
    padding = padding_mask(side, B, N, pad=4)
    weights = rand(B, N, 32, seed=21)
    torch.manual_seed(0)
    model = _Stack(causal, impl).double()
    plain, plain_grads = _grads(model, x, weights, lambda x: model(x, padding))
    assert torch.isfinite(plain).all() and all(torch.isfinite(g).all() for g in plain_grads)

    def captured(x):
        record = capture(model, (x, padding), grad=True)
        for store in (record.probs, record.scores, record.head_outputs, record.hidden):
            assert len(store) == 3
        for layer in range(3):
            assert not torch.isnan(record.probs[layer]).any() and not torch.isnan(record.head_outputs[layer]).any()
        return record.output

    def hooked(x):
        with intervene(model, on_query=identity, on_scores=identity, on_probs=identity,
                       on_head_output=identity, on_layer_input=identity):
            return model(x, padding)

    for run in (captured, hooked):
        out, grads = _grads(model, x, weights, run)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
        if impl == "reference":  # the same function with and without hooks: the same bits
            assert torch.equal(out, plain)
            assert all(torch.equal(g, h) for g, h in zip(grads, plain_grads, strict=True))
        else:  # SDPA without hooks, the explicit softmax with them
            torch.testing.assert_close(out, plain, rtol=1e-10, atol=1e-12)
            for g, h in zip(grads, plain_grads, strict=True):
                torch.testing.assert_close(g, h, rtol=1e-9, atol=1e-11)
    assert all(not block.attn.hooks for block in model.blocks)


def test_captured_probabilities_of_padded_rows() -> None:
    torch.manual_seed(0)
    model = _Stack(True, "auto").double()
    N = 8
    padding = padding_mask("left", 2, N, pad=3)
    record = capture(model, (rand(2, N, 32, seed=22), padding), what=("probs",))
    for layer in range(3):
        probs = record.probs[layer]  # (B, H, N, N)
        assert torch.equal(probs[0, :, :3], torch.zeros_like(probs[0, :, :3]))  # pad queries see no real key
        torch.testing.assert_close(probs[0, :, 3:].sum(-1), torch.ones(4, N - 3, dtype=torch.float64))
        assert probs[0, :, :, :3].abs().max() == 0  # nobody attends to the padding
        torch.testing.assert_close(probs[1].sum(-1)[:, 1:], torch.ones(4, N - 1, dtype=torch.float64))


# --- Hugging Face models through the analysis dispatcher -----------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("llama"), kind="llama", layers=3, heads=4,
                                          kv_heads=2)))


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


def _hf_inputs(side: str, vocab: int, *, B: int = 3, N: int = 12, seed: int = 30) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab, (B, N), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": padding_mask(side, B, N, pad=5).long()}


def _hf_run(model: nn.Module, inputs: dict[str, torch.Tensor], run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    output = run(inputs)
    logits = output.logits if hasattr(output, "logits") else output.last_hidden_state
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(31))
    (logits * weights).sum().backward()
    return logits.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny_llama", "minilm"])
def test_capture_and_identity_hooks_on_a_padded_hugging_face_model_change_nothing(
        request: pytest.FixtureRequest, name: str, side: str) -> None:
    loaded = request.getfixturevalue(name)
    model = loaded.model
    inputs = _hf_inputs(side, len(loaded.tokenizer))
    plain, plain_grads = _hf_run(model, inputs, lambda i: model(**i))
    assert torch.isfinite(plain).all() and plain_grads and all(torch.isfinite(g).all() for g in plain_grads)
    records = []

    def captured(i):
        record = capture(model, i, grad=True)
        records.append(record)
        return record.output

    def hooked(i):
        with intervene(model, on_query=identity, on_scores=identity, on_probs=identity, on_head_output=identity,
                       on_layer_input=identity):
            return model(**i)

    for run in (captured, hooked):
        out, grads = _hf_run(model, inputs, run)
        assert torch.equal(out, plain)  # float32 weights: the dispatcher gives the model's own bits
        assert len(grads) == len(plain_grads)
        for g, h in zip(grads, plain_grads, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-7)
    (record,) = records
    assert record.layers == list(range(record.num_layers))
    for store in (record.probs, record.scores, record.head_outputs, record.hidden):
        assert all(not torch.isnan(t).any() for t in store.values())


def test_dispatcher_gives_zeros_for_a_row_masked_with_minus_infinity(tiny_llama) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = tiny_llama.model.model.layers[0].self_attn
    q = rand(2, 4, 6, 16, seed=40, dtype=torch.float32).requires_grad_()
    k, v = (rand(2, 2, 6, 16, seed=s, dtype=torch.float32).requires_grad_() for s in (41, 42))
    mask = torch.zeros(2, 1, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    mask[1, :, 3] = float("-inf")  # query 3 of the second sequence may see no key
    seen = []
    with intervene(tiny_llama.model, on_probs=lambda a, layer: seen.append(layer)):
        out, probs = ALL_ATTENTION_FUNCTIONS["eager"](attention, q, k, v, mask, scaling=0.25)
    assert seen == [0]
    assert out.shape == (2, 6, 4, 16)  # transformers' layout (B, N, H, d)
    assert torch.equal(out[1, 3], torch.zeros(4, 16)) and torch.equal(probs[1, :, 3], torch.zeros(4, 6))
    expected = softmax_attention_reference(q, k, v, attn_mask=mask, scale=0.25).transpose(1, 2)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))

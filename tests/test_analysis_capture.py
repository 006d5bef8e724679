"""capture() and intervene() on MiniLM, on a tiny LLaMA with grouped key/value heads, and on attnlab layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnlab.analysis.capture import capture
from attnlab.analysis.hooks import intervene
from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.nn import Attention


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return load_model(str(save_tiny_model(tmp_path_factory.mktemp("llama"), kind="llama", heads=4, kv_heads=2)))


def _texts():
    return ["The cat sat quietly on the warm mat.", "Attention heads copy tokens from far away in long texts."]


def test_capture_on_minilm_equals_output_attentions(minilm):
    inputs = minilm.tokenizer(_texts(), return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = minilm.model(**inputs, output_attentions=True, output_hidden_states=True)
    record = capture(minilm.model, inputs)
    assert record.num_layers == 6 and record.num_heads == 12 and record.layers == list(range(6))
    B, N = inputs["input_ids"].shape
    for layer in range(6):
        assert record.probs[layer].shape == (B, 12, N, N)
        torch.testing.assert_close(record.probs[layer], reference.attentions[layer], rtol=0, atol=1e-7)
        torch.testing.assert_close(record.hidden[layer], reference.hidden_states[layer], rtol=0, atol=1e-6)
        assert record.head_outputs[layer].shape == (B, 12, N, 32)
        # probs = softmax(scores): the two captures agree with each other
        torch.testing.assert_close(torch.softmax(record.scores[layer], -1), record.probs[layer], rtol=0, atol=1e-6)
    # the padded key of the short sentence gets no attention
    short = int(inputs["attention_mask"][0].sum())
    assert short < N and record.probs[0][0, :, :, short:].abs().max() < 1e-6
    torch.testing.assert_close(record.output.last_hidden_state, reference.last_hidden_state, rtol=0, atol=0)


def test_capture_on_grouped_kv_llama_expands_heads_and_is_causal(tiny_llama):
    inputs = tiny_llama.tokenizer(_texts()[:1], return_tensors="pt")
    with torch.no_grad():
        reference = tiny_llama.model(**inputs, output_attentions=True)
    record = capture(tiny_llama.model, inputs, what=("probs", "head_outputs"), layers=[1])
    assert record.layers == [1] and set(record.probs) == {1}
    N = inputs["input_ids"].shape[1]
    probs = record.probs[1]
    assert probs.shape == (1, 4, N, N)  # 4 query heads although there are 2 key/value heads
    torch.testing.assert_close(probs, reference.attentions[1], rtol=0, atol=1e-7)
    assert torch.triu(probs[0], diagonal=1).abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 4, N))
    # the head outputs through o_proj give the attention block's output
    attn = tiny_llama.model.model.layers[1].self_attn
    seen = {}
    handle = attn.register_forward_hook(lambda m, a, out: seen.update(out=out[0]))
    capture(tiny_llama.model, inputs, what=("head_outputs",))
    handle.remove()
    heads = record.head_outputs[1].transpose(1, 2).reshape(1, N, -1)
    torch.testing.assert_close(attn.o_proj(heads), seen["out"], rtol=1e-5, atol=1e-6)


def test_intervene_edits_inside_and_restores_exactly(tiny_llama):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama.model
    inputs = tiny_llama.tokenizer(_texts()[1:], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits

        def zero_head(out, layer):
            out = out.clone()
            out[:, 2] = 0
            return out

        calls = []
        with intervene(model, on_head_output=zero_head,
                       on_query=lambda q, layer: calls.append(("q", layer, tuple(q.shape))),
                       on_scores=lambda s, layer: calls.append(("s", layer, tuple(s.shape)))):
            inside = model(**inputs).logits
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert not torch.allclose(before, inside, atol=1e-4)
    N = inputs["input_ids"].shape[1]
    assert ("q", 0, (1, 4, N, 16)) in calls and ("s", 1, (1, 4, N, N)) in calls
    assert "eager" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_intervene_restores_after_an_exception(minilm):
    inputs = minilm.tokenizer(_texts()[:1], return_tensors="pt")
    with torch.no_grad():
        before = minilm.model(**inputs).last_hidden_state
        def explode(probs, layer):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"), intervene(minilm.model, on_probs=explode):
            minilm.model(**inputs)
        after = minilm.model(**inputs).last_hidden_state
    assert torch.equal(before, after)


def test_nested_contexts_outer_edit_is_seen_by_inner_capture(minilm):
    inputs = minilm.tokenizer(_texts()[:1], return_tensors="pt")
    N = inputs["input_ids"].shape[1]
    plain = capture(minilm.model, inputs, what=("probs",))

    def uniform(a, layer):
        return torch.full_like(a, 1.0 / a.shape[-1])

    with intervene(minilm.model, on_probs=uniform, layers=[0]):
        record = capture(minilm.model, inputs, what=("probs",))
    torch.testing.assert_close(record.probs[0], torch.full_like(record.probs[0], 1 / N))
    assert not torch.allclose(record.probs[1], torch.full_like(record.probs[1], 1 / N), atol=1e-3)
    assert not torch.allclose(record.probs[1], plain.probs[1], atol=1e-4)  # layer 1 sees the edited layer 0


def test_sdpa_model_is_refused_with_a_message(tmp_path):
    import transformers

    folder = save_tiny_model(tmp_path, kind="bert")
    model = transformers.AutoModel.from_pretrained(folder, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="eager"):
        capture(model, torch.randint(0, 100, (1, 5)))


class _Block(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = Attention(32, 4, kv_heads=2, causal=causal)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class _TinyOwnModel(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(causal) for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_capture_and_intervene_on_attnlab_layers(causal):
    torch.manual_seed(0)
    model = _TinyOwnModel(causal).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    plain = model(x)
    record = capture(model, x)
    assert record.num_layers == 2 and record.num_heads == 4
    torch.testing.assert_close(record.output, plain)  # explicit softmax path == the op
    probs = record.probs[1]
    assert probs.shape == (2, 4, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7, dtype=torch.float64))
    if causal:
        assert torch.triu(probs, diagonal=1).abs().max() == 0
    # hidden[1] is the residual stream entering block 1
    torch.testing.assert_close(record.hidden[1], x + model.blocks[0].attn(model.blocks[0].norm(x)))
    # head outputs through to_out give the layer output
    attn = model.blocks[0].attn
    heads = record.head_outputs[0].transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn.to_out(heads), attn(attn_input := model.blocks[0].norm(x)))
    assert attn_input.shape == x.shape
    with intervene(model, on_head_output=lambda o, layer: o * 0):
        zeroed = model(x)
    torch.testing.assert_close(zeroed, x)  # both attention blocks contribute nothing
    assert all(not block.attn.hooks for block in model.blocks)
    torch.testing.assert_close(model(x), plain, rtol=0, atol=0)


def test_capture_mask_and_importance_on_attnlab_language_model():
    from attnlab.analysis.importance import lm_loss_importance
    from attnlab.analysis.interventions import mask_heads
    from attnlab.models import LanguageModel

    torch.manual_seed(0)
    model = LanguageModel(50, 32, 2, 4, max_len=16).eval()
    tokens = torch.randint(50, (2, 12))
    with torch.no_grad():
        plain = model(tokens)
    record = capture(model, tokens)
    assert record.num_layers == 2 and record.num_heads == 4 and record.probs[1].shape == (2, 4, 12, 12)
    assert torch.triu(record.probs[0], diagonal=1).abs().max() == 0
    torch.testing.assert_close(record.output, plain, rtol=1e-5, atol=1e-5)  # explicit softmax vs the op
    with mask_heads(model, [(1, 3)], mode="uniform_attention", phase="all"):
        masked = capture(model, tokens, what=("probs",))
    uniform = torch.tril(torch.ones(12, 12)) / torch.arange(1, 13)[:, None]
    torch.testing.assert_close(masked.probs[1][:, 3], uniform.expand(2, 12, 12))
    full, delta = lm_loss_importance(model, tokens)
    assert delta.shape == (2, 4) and delta.abs().min() > 0
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)


def test_non_softmax_mechanism_refuses_probability_hooks():
    from attnlab.models import LanguageModel

    torch.manual_seed(1)
    model = LanguageModel(50, 32, 2, 4, max_len=16, mechanism="lightning").eval()
    tokens = torch.randint(50, (1, 10))
    record = capture(model, tokens, what=("head_outputs", "hidden"))
    assert record.head_outputs[1].shape == (1, 4, 10, 8)
    with pytest.raises(NotImplementedError, match="lightning"):
        capture(model, tokens, what=("probs",))


@pytest.mark.parametrize("point", ["on_query", "on_scores", "on_probs", "on_head_output"])
@pytest.mark.parametrize("kind", ["hf_llama", "attnlab_layers"])
def test_a_callback_returning_the_wrong_shape_is_named(point, kind, tiny_llama):
    """A callback result that would broadcast (last axis 1) or fail in a matmul is refused with the callback's
    name, the shape it returned and the shape expected; the model is restored afterwards."""
    torch.manual_seed(0)
    if kind == "hf_llama":
        model, inputs = tiny_llama.model, {"input_ids": torch.randint(5, 200, (2, 9))}
        run = lambda: model(**inputs).logits  # noqa: E731
    else:
        model, x = _TinyOwnModel(causal=True).double(), torch.randn(2, 7, 32, dtype=torch.float64)
        run = lambda: model(x)  # noqa: E731
    with torch.no_grad():
        plain = run()
    seen = []

    def bad(tensor, layer):
        seen.append(tuple(tensor.shape))
        return tensor[..., :1]  # (B, H, N, 1): broadcastable, the silent kind of wrong

    with pytest.raises(ValueError, match=rf"{point} callback returned \(\d+, \d+, \d+, 1\)") as caught, \
            intervene(model, **{point: bad}), torch.no_grad():
        run()
    assert f"expected None or a tensor of the shape it received, {seen[0]}" in str(caught.value)
    with torch.no_grad():
        torch.testing.assert_close(run(), plain, rtol=0, atol=0)

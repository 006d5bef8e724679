"""attnlab.hf: mechanisms inside Hugging Face models, checked against the models' own eager attention."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnlab.hf as hf
from attnlab.analysis.models import load_model, save_tiny_model
from attnlab.ops import sliding_window_mask

TEXTS = ["the cat sat on the mat and looked at the birds in the garden for a long while",
         "a short one"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", kind="llama", layers=2, heads=4, kv_heads=2,
                           dim=64, seed=3)
    loaded = load_model(str(path))
    loaded.tokenizer.padding_side = "left"
    return loaded


@pytest.fixture(scope="module")
def minilm() -> Any:
    return load_model("minilm")


def left_padded(llama: Any) -> dict[str, torch.Tensor]:
    batch = llama.tokenizer(TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert not bool(batch["attention_mask"][1, 0]) and bool(batch["attention_mask"][1, -1])  # really left padded
    return dict(batch)


@torch.no_grad()
def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits


def real(x: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rows of real (unpadded) tokens: ``[tokens, ...]``."""
    return x[batch["attention_mask"].bool()]


def explicit_window_mask(attention_mask: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Eager's additive ``[B, 1, N, N]`` mask of a causal window with sinks over each row's real tokens."""
    B, N = attention_mask.shape
    mask = torch.full((B, 1, N, N), torch.finfo(torch.float32).min)
    for b in range(B):
        idx = attention_mask[b].nonzero().squeeze(1)
        n = idx.numel()
        allowed = sliding_window_mask(n, window, causal=True, sink_tokens=sinks)
        mask[b, 0, idx[:, None], idx[None, :]] = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        # padded queries: let them see their own position only (their outputs are not compared)
        pads = (~attention_mask[b].bool()).nonzero().squeeze(1)
        mask[b, 0, pads, pads] = 0.0
    return mask


def test_compatible_lists_the_training_free_mechanisms_with_reasons() -> None:
    table = hf.compatible()
    assert {"softmax", "sliding_window", "hip", "neighborhood"} <= set(table)
    for name, entry in table.items():
        assert entry.name == name and len(entry.why) > 30
    assert "lightning" not in table
    assert table["hip"].defaults["k_budget"] == 512 and table["hip"].causal_only
    assert table["sliding_window"].defaults["sink_tokens"] == 0


def test_register_is_idempotent_and_fills_both_interfaces() -> None:
    first = hf.register()
    second = hf.register()
    assert first == second and "attnlab_hip" in first
    for name in first:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping


def test_from_pretrained_with_attnlab_hip_runs_with_its_defaults(llama: Any) -> None:
    hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained(llama.path, attn_implementation="attnlab_hip",
                                                              local_files_only=True).eval()
    batch = left_padded(llama)
    # the default k_budget=512 covers these short sequences: dense attention
    torch.testing.assert_close(real(logits(model, batch), batch), real(logits(llama.model, batch), batch),
                               rtol=1e-5, atol=1e-5)


def test_softmax_reproduces_eager_on_a_left_padded_batch_and_restores(llama: Any) -> None:
    model, batch = llama.model, left_padded(llama)
    eager = logits(model, batch)
    with hf.use(model, "softmax") as switched:
        assert switched is model and model.config._attn_implementation == "attnlab_softmax"
        ours = logits(model, batch)
    torch.testing.assert_close(real(ours, batch), real(eager, batch), rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(logits(model, batch), eager, rtol=0, atol=0)


def test_the_switch_is_undone_after_an_exception(llama: Any) -> None:
    model, batch = llama.model, left_padded(llama)
    eager = logits(model, batch)
    with pytest.raises(RuntimeError, match="boom"), hf.use(model, "sliding_window", window=2):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert all(not hasattr(m, "_attnlab_setting") for m in hf.attention_modules(model))
    torch.testing.assert_close(logits(model, batch), eager, rtol=0, atol=0)


def test_plain_call_switches_until_restore(llama: Any) -> None:
    model, batch = llama.model, left_padded(llama)
    eager = logits(model, batch)
    switch = hf.use(model, "sliding_window", window=2)
    narrow = logits(model, batch)
    assert not torch.allclose(real(narrow, batch), real(eager, batch), atol=1e-3)
    switch.restore()
    torch.testing.assert_close(logits(model, batch), eager, rtol=0, atol=0)


@pytest.mark.parametrize("mechanism,options", [("softmax", {}), ("hip", {"k_budget": 64}),
                                               ("sliding_window", {"window": 64}),
                                               ("sliding_window", {"window": 64, "sink_tokens": 4}),
                                               ("neighborhood", {"kernel_size": 64})],
                         ids=["softmax", "hip-dense", "window-dense", "window-sinks-dense", "neighborhood-dense"])
def test_covering_budgets_equal_eager_and_generate_the_same_tokens(llama: Any, mechanism: str,
                                                                  options: dict[str, Any]) -> None:
    model, batch = llama.model, left_padded(llama)
    N = batch["input_ids"].shape[1]
    assert N + 16 <= 64  # the budgets cover prompt and generation
    eager = logits(model, batch)
    greedy = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    eager_tokens = model.generate(**batch, **greedy)
    with hf.use(model, mechanism, **options):
        ours = logits(model, batch)
        tokens = model.generate(**batch, **greedy)
    torch.testing.assert_close(real(ours, batch), real(eager, batch), rtol=1e-5, atol=1e-5)
    assert tokens.shape[1] == N + 16
    assert torch.equal(tokens, eager_tokens)


@pytest.mark.parametrize("window,sinks", [(3, 0), (5, 2), (1, 4)])
def test_narrow_window_equals_eager_with_the_explicit_mask(llama: Any, window: int, sinks: int) -> None:
    model, batch = llama.model, left_padded(llama)
    explicit = explicit_window_mask(batch["attention_mask"], window, sinks)
    expected = logits(model, {"input_ids": batch["input_ids"], "attention_mask": explicit})
    with hf.use(model, "sliding_window", window=window, sink_tokens=sinks):
        ours = logits(model, batch)
    torch.testing.assert_close(real(ours, batch), real(expected, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(real(ours, batch), real(logits(model, batch), batch), atol=1e-3)


@pytest.mark.parametrize("mechanism,options", [("sliding_window", {"window": 3, "sink_tokens": 2}),
                                               ("neighborhood", {"kernel_size": 4}),
                                               ("hip", {"k_budget": 4, "block_size_q": 1, "block_size_k": 2,
                                                        "window": 2, "sink_tokens": 1})],
                         ids=["window-sinks", "neighborhood", "hip"])
def test_cached_decoding_equals_the_full_forward(llama: Any, mechanism: str, options: dict[str, Any]) -> None:
    """Prefill, then one token at a time (queries end-aligned over the cache) == one full forward pass."""
    model, batch = llama.model, left_padded(llama)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    split = ids.shape[1] - 4
    with hf.use(model, mechanism, **options), torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
        steps = [out.logits]
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        for t in range(split, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], use_cache=True,
                        **{cache_name: getattr(out, cache_name)})
            steps.append(out.logits)
    torch.testing.assert_close(real(torch.cat(steps, dim=1), batch), real(full, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(real(full, batch), real(logits(model, batch), batch), atol=1e-3)


def test_layers_switches_only_the_given_layers(llama: Any) -> None:
    model, batch = llama.model, left_padded(llama)
    with torch.no_grad():
        eager = model(**batch, output_hidden_states=True).hidden_states
        with hf.use(model, "sliding_window", layers=[1], window=1):
            ours = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(real(ours[1], batch), real(eager[1], batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(real(ours[2], batch), real(eager[2], batch), atol=1e-3)


def test_bfloat16_model(llama: Any) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(llama.path, attn_implementation="eager",
                                                              dtype=torch.bfloat16, local_files_only=True).eval()
    batch = left_padded(llama)
    eager = logits(model, batch)
    with hf.use(model, "softmax"):
        ours = logits(model, batch)
    with hf.use(model, "sliding_window", window=64, sink_tokens=4):
        window = logits(model, batch)
    assert ours.dtype == window.dtype == torch.bfloat16
    torch.testing.assert_close(real(ours, batch).float(), real(eager, batch).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(real(window, batch).float(), real(eager, batch).float(), rtol=2e-2, atol=2e-2)


def test_minilm_right_padded_softmax_and_covering_window_equal_eager(minilm: Any) -> None:
    model, tokenizer = minilm.model, minilm.tokenizer
    assert tokenizer.padding_side == "right"
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    assert not bool(batch["attention_mask"][1, -1])
    with torch.no_grad():
        eager = model(**batch).last_hidden_state
        with hf.use(model, "softmax"):
            ours = model(**batch).last_hidden_state
        with hf.use(model, "sliding_window", window=2 * batch["input_ids"].shape[1]):
            window = model(**batch).last_hidden_state
        with hf.use(model, "sliding_window", window=3):
            narrow = model(**batch).last_hidden_state
    torch.testing.assert_close(real(ours, batch), real(eager, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real(window, batch), real(eager, batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(real(narrow, batch), real(eager, batch), atol=1e-3)
    assert model.config._attn_implementation == "eager"


def test_refusals_name_the_reason(llama: Any, minilm: Any) -> None:
    with pytest.raises(ValueError, match="needs a model trained with it"):
        hf.use(llama.model, "lightning")
    with pytest.raises(ValueError, match="'windw'.*window, sink_tokens"):
        hf.use(llama.model, "sliding_window", windw=4)
    with pytest.raises(ValueError, match="causal only"):
        hf.use(minilm.model, "hip")
    with pytest.raises(ValueError, match=r"layers=\[7\]"):
        hf.use(llama.model, "softmax", layers=[7])
    with pytest.raises(TypeError, match="AttentionInterface"):
        hf.use(torch.nn.Linear(3, 3), "softmax")
    with pytest.raises(TypeError, match="mechanism"):
        hf.use(llama.model, 3)  # type: ignore[arg-type]
    assert llama.model.config._attn_implementation == "eager"


def test_keys_attended_are_recorded_for_the_first_layer(llama: Any) -> None:
    model = llama.model
    ids = llama.tokenizer([TEXTS[0]], return_tensors="pt", return_token_type_ids=False)["input_ids"]
    N = ids.shape[1]
    with hf.record_keys_attended() as dense, hf.use(model, "softmax"), torch.no_grad():
        model(input_ids=ids)
    with hf.record_keys_attended() as window, hf.use(model, "sliding_window", window=4), torch.no_grad():
        model(input_ids=ids)
    assert dense.mean() == pytest.approx((N + 1) / 2)
    expected = sum(min(i + 1, 4) for i in range(N)) / N
    assert window.mean() == pytest.approx(expected)

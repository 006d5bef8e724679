"""Hook points inside attention layers: ``intervene(model, on_scores=..., on_probs=..., ...)``.

Every analysis in ``attnlab.analysis`` reads or edits, per attention layer,

1. ``on_query(Q, layer)``: the query states after the position encoding (RoPE), ``[B, H, N, d]``;
2. ``on_scores(S, layer)``: the pre-softmax scores after the mask is added, ``[B, H, N, M]``;
3. ``on_probs(A, layer)``: the post-softmax probabilities, ``[B, H, N, M]``;
4. ``on_head_output(O, layer)``: the per-head output ``A @ V`` before the output projection, ``[B, H, N, d]``;

plus ``on_layer_input(X, layer)``: the residual stream entering the layer, ``[B, N, dim]``
(read only). Each callback receives ``(tensor, layer_index)`` and returns the tensor to use, or
``None`` to leave it unchanged. Head indices are query-head indices: grouped key/value heads are
expanded (``repeat_kv``) before the scores are formed.

Two kinds of model are supported:

- Hugging Face transformers models loaded with ``attn_implementation="eager"``. While a context is
  open, the "eager" entry of transformers' attention-function table points to one dispatcher. For a
  layer of a hooked model it runs :func:`attnlab.ops.softmax.softmax_attention_hooked` (the
  function behind attnlab's softmax reference and :class:`attnlab.nn.Attention`'s hooks): the
  operations of transformers' eager attention, in float32 (float64 for float64 weights), so a
  float32 model gives the same bits as without the hooks; every other module gets its own file's
  ``eager_attention_forward`` unchanged. The entry is removed when the last context closes.
- attnlab's own models: every :class:`attnlab.nn.Attention` inside them gets an
  :class:`attnlab.nn.attention.AttentionHooks` entry for the duration of the context.

A row whose every key is masked (with ``-inf``) outputs zeros and passes finite gradients in both
kinds. (transformers' eager masks use the dtype's most negative finite value instead, so there such
a row averages the values, exactly as the model does without hooks.)

Layer ``l`` is the ``l``-th attention module in ``model.modules()`` order (for decoder-only and
encoder-only models this is the transformer layer index). Nesting contexts is allowed; the hooks of
an outer context run before those of an inner one.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnlab.nn.attention import Attention, AttentionHooks, HookFn, apply_hook, chain_hooks
from attnlab.ops.softmax import softmax_attention_hooked

__all__ = ["intervene", "attention_layers", "HookFn", "is_hf_model"]


def is_hf_model(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` (it has a ``config`` with ``_attn_implementation``)."""
    return hasattr(getattr(model, "config", None), "_attn_implementation") and not any(
        isinstance(m, Attention) for m in model.modules())


_HF_ATTENTION_CLASSES: dict[type, bool] = {}


def _is_hf_attention(module: nn.Module) -> bool:
    """An attention module of transformers: its forward dispatches through ``ALL_ATTENTION_FUNCTIONS``."""
    cls = type(module)
    if cls not in _HF_ATTENTION_CLASSES:
        verdict = False
        if cls.__module__.startswith("transformers."):
            try:
                verdict = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
            except (OSError, TypeError):
                verdict = False
        _HF_ATTENTION_CLASSES[cls] = verdict
    return _HF_ATTENTION_CLASSES[cls]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in layer order (attnlab ``Attention`` or transformers ones).

    Raises:
        ValueError if the model has none, or if a transformers model was not loaded with eager attention.
    """
    own = [m for m in model.modules() if isinstance(m, Attention)]
    if own:
        return own
    layers = [m for m in model.modules() if _is_hf_attention(m)]
    if not layers:
        raise ValueError(f"model of type {type(model).__name__} contains no attnlab.nn.Attention and no "
                         f"Hugging Face attention module: nothing to capture or intervene on")
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation != "eager":
        raise ValueError(f"the model uses attn_implementation={implementation!r}: load it with "
                         f"attn_implementation='eager' (flash/SDPA kernels return no attention probabilities)")
    return layers


@dataclass
class _HookSet:
    layer_of: dict[nn.Module, int]
    on_query: HookFn | None
    on_scores: HookFn | None
    on_probs: HookFn | None
    on_head_output: HookFn | None


_ACTIVE: list[_HookSet] = []


def _own_eager(module: nn.Module) -> Callable[..., Any]:
    source = sys.modules.get(type(module).__module__)
    function = getattr(source, "eager_attention_forward", None)
    if function is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward in its module")
    return function


def _hooked_eager(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention with the hook points of every open context for ``module``."""
    active = [(hooks, hooks.layer_of[module]) for hooks in _ACTIVE if module in hooks.layer_of]
    if not active:
        return _own_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)
    if getattr(getattr(module, "config", None), "attn_logit_softcapping", None) or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{type(module).__name__}: logit soft-capping / attention sinks are not "
                                  f"covered by the analysis hooks")
    for hooks, layer in active:
        query = apply_hook(hooks.on_query, query, layer)  # (B, H, N, d)
    if attention_mask is not None:
        attention_mask = attention_mask[..., : key.shape[-2]]  # (B, 1, N, M): additive, or boolean True = attend
    out, probs = softmax_attention_hooked(
        query, key, value, scale=scaling, attn_mask=attention_mask,
        on_scores=chain_hooks([(hooks.on_scores, layer) for hooks, layer in active]),
        on_probs=chain_hooks([(hooks.on_probs, layer) for hooks, layer in active]),
        dropout=dropout if module.training else 0.0)  # (B, H, N, d), (B, H, N, M)
    for hooks, layer in active:
        out = apply_hook(hooks.on_head_output, out, layer)
    return out.transpose(1, 2).contiguous(), probs.to(query.dtype)


def _install_hf_dispatcher() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["eager"] = _hooked_eager


def _remove_hf_dispatcher() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS._local_mapping.get("eager") is _hooked_eager:
        del ALL_ATTENTION_FUNCTIONS["eager"]


@contextlib.contextmanager
def intervene(model: nn.Module, *, on_query: HookFn | None = None, on_scores: HookFn | None = None,
              on_probs: HookFn | None = None, on_head_output: HookFn | None = None,
              on_layer_input: HookFn | None = None, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Run ``model`` with callbacks at the attention hook points (listed in the module docstring).

    Args:
        model: a transformers model loaded with eager attention, or a model built from
            :class:`attnlab.nn.Attention` layers.
        on_query / on_scores / on_probs / on_head_output: ``f(tensor, layer) -> tensor | None``
            (shapes in the module docstring).
        on_layer_input: ``f(X, layer)`` with the residual stream entering layer ``layer``,
            ``[B, N, dim]`` (read only: the return value is ignored). It is the input of the
            module that contains the attention module (the transformer block).
        layers: restrict every callback to these layer indices (default: all layers).

    The model is restored exactly when the block exits (even on an exception): no parameter is
    touched; only the hook entries added here are removed.
    """
    on_query, on_scores = _checked("on_query", on_query), _checked("on_scores", on_scores)
    on_probs, on_head_output = _checked("on_probs", on_probs), _checked("on_head_output", on_head_output)
    modules = attention_layers(model)
    chosen = range(len(modules)) if layers is None else list(layers)
    for index in chosen:
        if not 0 <= index < len(modules):
            raise ValueError(f"layers contains {index}; the model has {len(modules)} attention layers "
                             f"(0..{len(modules) - 1})")
    layer_of = {modules[i]: i for i in chosen}
    handles: list[Any] = []
    if on_layer_input is not None:
        parents = _parents(model)
        for module, index in layer_of.items():
            block = _block_of(module, parents)

            def pre_hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], index: int = index) -> None:
                x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
                if isinstance(x, torch.Tensor):
                    on_layer_input(x, index)

            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
    if isinstance(modules[0], Attention):
        entries = []
        for module, index in layer_of.items():
            entry = AttentionHooks(layer=index, on_query=on_query, on_scores=on_scores, on_probs=on_probs,
                                   on_head_output=on_head_output)
            module.hooks.append(entry)
            entries.append((module, entry))
        try:
            yield
        finally:
            for module, entry in entries:
                module.hooks.remove(entry)
            for handle in handles:
                handle.remove()
        return
    hook_set = _HookSet(layer_of, on_query, on_scores, on_probs, on_head_output)
    if not _ACTIVE:
        _install_hf_dispatcher()
    _ACTIVE.append(hook_set)
    try:
        yield
    finally:
        _ACTIVE.remove(hook_set)
        if not _ACTIVE:
            _remove_hf_dispatcher()
        for handle in handles:
            handle.remove()


def _checked(name: str, hook: HookFn | None) -> HookFn | None:
    """``hook`` refusing a result of the wrong shape with a ValueError naming the callback, before the
    result reaches the attention math (where it would fail deep inside a matmul, or broadcast)."""
    if hook is None:
        return None

    def checked(tensor: torch.Tensor, layer: int) -> torch.Tensor | None:
        result = hook(tensor, layer)
        if result is not None and (not isinstance(result, torch.Tensor) or result.shape != tensor.shape):
            got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(f"intervene: the {name} callback returned {got} at layer {layer}; expected None or "
                             f"a tensor of the shape it received, {tuple(tensor.shape)}")
        return result

    return checked


def _parents(model: nn.Module) -> dict[nn.Module, nn.Module]:
    parents: dict[nn.Module, nn.Module] = {}
    for parent in model.modules():
        for child in parent.children():
            parents.setdefault(child, parent)
    return parents


def _block_of(attention: nn.Module, parents: dict[nn.Module, nn.Module]) -> nn.Module:
    """The transformer block holding ``attention``: the first ancestor that also holds a module
    other than attention parts (an MLP, a norm), i.e. whose input is the residual stream."""
    module = attention
    while module in parents:
        parent = parents[module]
        siblings = [c for c in parent.children() if c is not module]
        if any(not _is_attention_part(c) for c in siblings):
            return parent
        module = parent
    return module


def _is_attention_part(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()

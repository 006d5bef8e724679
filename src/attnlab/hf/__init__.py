"""attnlab mechanisms inside pretrained Hugging Face models, through transformers' ``AttentionInterface``.

Training-free replacements of softmax attention: HiP (Lee et al., "A Training-free Sub-quadratic Cost
Transformer Model Serving Framework With Hierarchically Pruned Attention", arXiv 2406.09827), the
sliding window with attention sinks (Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", arXiv 2309.17453) and the causal 1-D neighbourhood (Hassani et al., "Neighborhood Attention
Transformer", arXiv 2204.07143) keep softmax over a subset of the keys a model was trained to attend,
so they can run in a model trained with dense softmax attention.

```python
import attnlab.hf
attnlab.hf.register()        # "attnlab_softmax", "attnlab_hip", ... for from_pretrained(attn_implementation=...)
with attnlab.hf.use(model, "sliding_window", window=256, sink_tokens=4):
    logits = model(ids).logits  # every attention layer runs the window; restored on exit
```
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch

import attnlab
from attnlab.hf.attention import SETTING_ATTRIBUTE, attnlab_attention_function, record_keys_attended

__all__ = ["CompatibleMechanism", "compatible", "register", "use", "MechanismSwitch", "attention_modules",
           "implementation_name", "record_keys_attended", "check_options"]

PREFIX = "attnlab_"


@dataclass(frozen=True)
class CompatibleMechanism:
    """A registered mechanism that can replace softmax attention in a model trained with softmax.

    ``options`` are the names :func:`use` accepts; ``defaults`` what ``attn_implementation="attnlab_<name>"``
    runs with (the op's own defaults where it has them).
    """

    name: str
    why: str
    options: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    causal_only: bool = False


_COMPATIBLE = (
    CompatibleMechanism(
        "softmax", "exact softmax attention (PyTorch SDPA): the model's own computation, the baseline of every "
        "comparison", options=()),
    CompatibleMechanism(
        "sliding_window", "exact softmax over the last `window` keys (plus the first `sink_tokens` keys, "
        "StreamingLLM, arXiv 2309.17453): a subset of the keys the model was trained to attend, no new weights",
        options=("window", "sink_tokens", "impl"), defaults={"window": 1024, "sink_tokens": 0}),
    CompatibleMechanism(
        "hip", "training-free by design (arXiv 2406.09827): exact softmax over sink tokens, a local window and "
        "the key blocks a hierarchical top-k search selects; k_budget >= N is dense attention",
        options=("k_budget", "block_size_q", "block_size_k", "window", "sink_tokens", "query_stride", "impl"),
        causal_only=True),
    CompatibleMechanism(
        "neighborhood", "1-D neighbourhood (NATTEN, arXiv 2204.07143): exact softmax over the `kernel_size` "
        "nearest keys (causal: the last ones), no new weights; stride/dilation/grids are not used here",
        options=("kernel_size", "impl"), defaults={"kernel_size": 1024}),
)


def compatible() -> dict[str, CompatibleMechanism]:
    """The registered mechanisms that replace softmax attention without training, each with why it qualifies."""
    out = {}
    for entry in _COMPATIBLE:
        record = attnlab.get(entry.name)
        defaults = {name: value for name, value in record.defaults.items() if name in entry.options}
        out[entry.name] = CompatibleMechanism(entry.name, entry.why, entry.options, {**defaults, **entry.defaults},
                                              entry.causal_only)
    return out


def implementation_name(mechanism: str) -> str:
    """The ``attn_implementation`` name of a mechanism: ``attnlab_<mechanism>``."""
    return PREFIX + mechanism


def _entry(mechanism: str) -> CompatibleMechanism:
    if not isinstance(mechanism, str):
        raise TypeError(f"mechanism must be a str, got {type(mechanism).__name__}")
    table = compatible()
    if mechanism in table:
        return table[mechanism]
    record = attnlab.get(mechanism)  # unknown names raise with the closest valid names
    raise ValueError(f"mechanism {mechanism!r} ({record.family} family) is not a training-free replacement of "
                     "softmax attention: it needs a model trained with it. Compatible: "
                     f"{', '.join(table)}")


def check_options(mechanism: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` merged over the mechanism's Hugging Face defaults; unknown names raise ValueError."""
    entry = _entry(mechanism)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        accepted = ", ".join(entry.options) if entry.options else "none"
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for mechanism {mechanism!r}; "
                         f"its options: {accepted}")
    return {**entry.defaults, **options}


def register() -> list[str]:
    """Register ``attnlab_<mechanism>`` for every compatible mechanism with transformers (idempotent).

    Each name goes into ``AttentionInterface`` (the attention function) and ``AttentionMaskInterface``
    (transformers' boolean SDPA mask function: without an entry there transformers builds no causal
    or padding mask at all). Returns the registered names.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as error:
        raise ImportError("attnlab.hf needs the package 'transformers' with AttentionInterface and "
                          "masking_utils.AttentionMaskInterface (tested with 5.24): pip install -U transformers"
                          ) from error

    names = []
    for entry in compatible().values():
        name = implementation_name(entry.name)
        AttentionInterface.register(name, attnlab_attention_function(name, entry.name, dict(entry.defaults)))
        AttentionMaskInterface.register(name, sdpa_mask)
        names.append(name)
    return names


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a transformers model (those that call ``AttentionInterface``), in layer order."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if "Attention" not in name or not hasattr(module, "layer_idx") or not hasattr(module, "is_causal"):
            continue
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in source:
            found.append(module)
    return found


class MechanismSwitch:
    """The switch :func:`use` applied; ``restore()`` (or leaving the ``with`` block) undoes it."""

    def __init__(self, model: torch.nn.Module, implementation: str, previous: str | None,
                 settings: list[tuple[torch.nn.Module, Any]]) -> None:
        self.model = model
        self.implementation = implementation
        self._previous = previous
        self._settings = settings
        self._restored = False

    def restore(self) -> None:
        """Put back the previous attention implementation and the modules' previous settings."""
        if self._restored:
            return
        for module, setting in self._settings:
            if setting is None:
                if hasattr(module, SETTING_ATTRIBUTE):
                    delattr(module, SETTING_ATTRIBUTE)
            else:
                setattr(module, SETTING_ATTRIBUTE, setting)
        if self._previous is not None:
            self.model.set_attn_implementation(self._previous)
        self._restored = True

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.restore()


def use(model: torch.nn.Module, mechanism: str, *, layers: list[int] | tuple[int, ...] | None = None,
        **options: Any) -> MechanismSwitch:
    """Switch a loaded transformers model to an attnlab mechanism: a plain call, or a context manager.

    ``use(model, "hip", k_budget=256)`` switches until :meth:`MechanismSwitch.restore`;
    ``with use(model, "hip", k_budget=256): ...`` restores the previous implementation and options on
    exit, also after an exception.

    Args:
        model: a ``PreTrainedModel`` whose attention goes through ``AttentionInterface``.
        mechanism: a name of :func:`compatible`.
        layers: indices of the attention layers to switch (default all); the other layers run exact
            softmax attention (PyTorch SDPA) while the switch holds.
        **options: the mechanism's own options (``window``, ``sink_tokens``, ``k_budget``, ``kernel_size``...).

    Raises:
        ValueError for a mechanism that is not a training-free replacement, an unknown option, a
        layer index that does not exist, or a bidirectional model with a causal-only mechanism;
        TypeError for a model whose attention does not go through ``AttentionInterface``.
    """
    entry = _entry(mechanism)
    merged = check_options(mechanism, options)
    if not hasattr(model, "set_attn_implementation") or not getattr(model, "_supports_attention_backend", False):
        raise TypeError(f"{type(model).__name__} does not route its attention through transformers' "
                        "AttentionInterface (_supports_attention_backend is not set): attnlab cannot replace it")
    modules = attention_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} has no attention module that calls AttentionInterface")
    if entry.causal_only and not all(bool(m.is_causal) for m in modules):
        raise ValueError(f"mechanism {mechanism!r} is causal only, but {type(model).__name__} has bidirectional "
                         "attention layers")
    indices = sorted({int(m.layer_idx) for m in modules if m.layer_idx is not None})
    chosen = set(indices) if layers is None else set(layers)
    missing = chosen - set(indices)
    if missing:
        raise ValueError(f"layers={sorted(missing)} do not exist; the model's attention layers are {indices}")
    register()
    name = implementation_name(mechanism)
    settings = [(module, getattr(module, SETTING_ATTRIBUTE, None)) for module in modules]
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    for module in modules:
        selected = module.layer_idx in chosen or module.layer_idx is None and layers is None
        setattr(module, SETTING_ATTRIBUTE, (name, mechanism, merged) if selected else (name, "softmax", {}))
    return MechanismSwitch(model, name, previous, settings)

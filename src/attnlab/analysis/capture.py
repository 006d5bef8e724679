"""``capture(model, inputs)``: per-layer attention tensors of one forward pass, as an ``AttentionRecord``.

Shapes (query-head indexed, grouped key/value heads expanded; see ``docs/analysis.md``, "Capture and
hook points"):

- ``probs[l]``: post-softmax attention ``A[l]``, ``[B, H, N, M]``, rows sum to 1 (0 for a query whose
  every key is masked);
- ``scores[l]``: pre-softmax scores after the mask, ``S[l] = Q K^T / sqrt(d) + mask``, ``[B, H, N, M]``;
- ``head_outputs[l]``: per-head outputs before the output projection, ``O[l] = A V``, ``[B, H, N, d]``;
- ``hidden[l]``: the residual stream entering layer ``l``, ``X[l]``, ``[B, N, dim]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnlab.analysis.hooks.intervene import attention_layers, intervene

__all__ = ["AttentionRecord", "capture", "run_model", "WHAT"]

WHAT = ("probs", "scores", "head_outputs", "hidden")


@dataclass
class AttentionRecord:
    """What :func:`capture` recorded. Each field maps a layer index to a tensor (on the CPU, detached);
    layers that were not asked for are absent.

    Attributes:
        probs / scores / head_outputs / hidden: ``{layer: tensor}`` in the shapes of the module docstring.
        num_layers: attention layers in the model.
        num_heads: query heads per layer.
        input_ids: the token ids ``[B, N]`` when the inputs had them, else ``None``.
        output: the model's own output of that forward pass.
    """

    probs: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    head_outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    num_layers: int = 0
    num_heads: int = 0
    input_ids: torch.Tensor | None = None
    output: Any = None

    @property
    def layers(self) -> list[int]:
        """The layer indices with at least one recorded tensor, ascending."""
        return sorted(set(self.probs) | set(self.scores) | set(self.head_outputs) | set(self.hidden))

    def stacked(self, what: str = "probs") -> torch.Tensor:
        """``what`` for every recorded layer stacked into ``[L, ...]`` (e.g. probs ``[L, B, H, N, M]``)."""
        tensors = getattr(self, what) if what in WHAT else None
        if tensors is None:
            raise ValueError(f"what={what!r}; expected one of {WHAT}")
        if not tensors:
            raise ValueError(f"nothing recorded for {what!r}: pass what=(..., {what!r}) to capture()")
        return torch.stack([tensors[layer] for layer in sorted(tensors)])


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a mapping is passed as keyword arguments, anything else positionally."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def capture(model: nn.Module, inputs: Any, *, what: Sequence[str] = WHAT,
            layers: Sequence[int] | None = None, grad: bool = False) -> AttentionRecord:
    """Run ``model`` once on ``inputs`` and record the attention tensors listed in the module docstring.

    Reads the eager attention path, as "Retrieval Head Mechanistically Explains Long-Context
    Factuality" (arXiv 2404.15574) does; the probabilities come from
    :func:`attnlab.ops.softmax.softmax_attention_hooked`, so a fully masked row records zeros and the
    model's output is the one it gives without capture.

    Args:
        model: a transformers model loaded with ``attn_implementation="eager"``, or a model built
            from :class:`attnlab.nn.Attention` layers.
        inputs: what the model's forward takes: a tokenizer's dict of tensors, or a tensor.
        what: any of ``"probs", "scores", "head_outputs", "hidden"``.
        layers: layer indices to record (default all).
        grad: keep the autograd graph (tensors are then not detached); default: run under ``no_grad``.

    Returns:
        an :class:`AttentionRecord`; the model's output is in ``record.output``.
    """
    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise ValueError(f"what={tuple(what)!r}; expected a non-empty subset of {WHAT}")
    modules = attention_layers(model)
    record = AttentionRecord(num_layers=len(modules))
    record.num_heads = int(getattr(modules[0], "heads", 0) or getattr(modules[0], "num_heads", 0)
                           or getattr(getattr(modules[0], "config", None), "num_attention_heads", 0))

    def keeper(store: dict[int, torch.Tensor]):
        def keep(tensor: torch.Tensor, layer: int) -> None:
            store[layer] = tensor if grad else tensor.detach().to("cpu", copy=True)
        return keep

    hook_of = {"probs": "on_probs", "scores": "on_scores", "head_outputs": "on_head_output",
               "hidden": "on_layer_input"}
    hooks = {hook_of[name]: keeper(getattr(record, name)) for name in what}
    with torch.set_grad_enabled(grad), intervene(model, layers=layers, **hooks):
        record.output = run_model(model, inputs)
    if isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), torch.Tensor):
        record.input_ids = inputs["input_ids"].detach().cpu()
    elif isinstance(inputs, torch.Tensor) and not inputs.is_floating_point():
        record.input_ids = inputs.detach().cpu()
    if not record.num_heads:
        for store in (record.probs, record.scores, record.head_outputs):
            if store:
                record.num_heads = next(iter(store.values())).shape[1]
                break
    return record

"""Head importance by ablation: the change in loss / accuracy / confidence when one head is masked.

Li et al., "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt"
(arXiv 2303.13731). Only the abstract was available ("multiple pruning-based metrics"): the
definitions below are inferred (ours, from standard head-pruning practice) and stay configurable:

- pruning head ``(l, h)`` = ``O[l][:, h] = 0`` before the output projection (``mean_ablate`` optional);
- ``dAcc(l, h) = Acc(full) - Acc(pruned)`` (accuracy points), ``dConf = mean_x [p_y(full) - p_y(pruned)]``;
- ``dLoss(l, h) = Loss(pruned) - Loss(full)`` for language models (next-token cross-entropy);
- the gradient proxy of Michel et al. 2019 ("Are Sixteen Heads Really Better than One?",
  arXiv 1905.10650): ``I(l, h) = mean_x |dL / d xi_{l,h}|`` with a head gate ``xi = 1`` multiplying ``O[l][:, h]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from attnlab.analysis.capture import run_model
from attnlab.analysis.hooks.intervene import attention_layers, intervene
from attnlab.analysis.interventions import mask_heads

__all__ = ["ablation_importance", "classification_importance", "lm_loss", "lm_loss_importance",
           "embedding_change_importance", "gradient_importance", "model_shape"]


def model_shape(model: nn.Module) -> tuple[int, int]:
    """``(layers, query heads per layer)`` of a model that the hooks support."""
    layers = attention_layers(model)
    first = layers[0]
    heads = getattr(first, "heads", None) or getattr(first, "num_heads", None) or getattr(
        getattr(first, "config", None), "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"cannot read the number of heads of {type(first).__name__}")
    return len(layers), int(heads)


def ablation_importance(model: nn.Module, metric: Callable[[], float], *, mode: str = "zero_output",
                        heads: Iterable[tuple[int, int]] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> tuple[float, torch.Tensor]:
    """``metric()`` with the full model and with each head masked in turn.

    Args:
        metric: evaluates the model (as it is now) and returns a float.
        mode: ``"zero_output"`` (default) or ``"mean_ablate"`` / ``"uniform_attention"``.
        heads: the heads to ablate (default all); the others are NaN in the result.
        progress: called with ``(done, total)`` after each head.

    Returns:
        ``(metric_full, metric_pruned [L, H])``.
    """
    L, H = model_shape(model)
    chosen = [(layer, head) for layer in range(L) for head in range(H)] if heads is None else list(heads)
    with torch.no_grad():
        full = float(metric())
        pruned = torch.full((L, H), float("nan"), dtype=torch.float64)
        for done, (layer, head) in enumerate(chosen, 1):
            with mask_heads(model, [(layer, head)], mode=mode, phase="all"):  # type: ignore[arg-type]
                pruned[layer, head] = float(metric())
            if progress is not None:
                progress(done, len(chosen))
    return full, pruned


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def classification_importance(model: nn.Module, inputs: Any, labels: torch.Tensor, *, mode: str = "zero_output",
                              progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """``dAcc [L, H]`` (points), ``dConf [L, H]`` and per-class ``dAcc_c [C, L, H]`` for a classifier
    whose output (or ``.logits``) is ``[B, C]``."""
    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        logits = _logits(run_model(model, inputs)).float()
        probs = torch.softmax(logits, -1)
        return (logits.argmax(-1) == labels).double(), probs.gather(-1, labels[:, None])[:, 0].double()

    L, H = model_shape(model)
    classes = int(labels.max()) + 1
    with torch.no_grad():
        correct, confidence = evaluate()
        d_acc = torch.zeros(L, H, dtype=torch.float64)
        d_conf = torch.zeros(L, H, dtype=torch.float64)
        d_acc_c = torch.zeros(classes, L, H, dtype=torch.float64)
        for done, (layer, head) in enumerate(((a, b) for a in range(L) for b in range(H)), 1):
            with mask_heads(model, [(layer, head)], mode=mode, phase="all"):  # type: ignore[arg-type]
                pruned_correct, pruned_confidence = evaluate()
            d_acc[layer, head] = 100 * (correct.mean() - pruned_correct.mean())
            d_conf[layer, head] = (confidence - pruned_confidence).mean()
            for c in range(classes):
                rows = labels == c
                if bool(rows.any()):
                    d_acc_c[c, layer, head] = 100 * (correct[rows].mean() - pruned_correct[rows].mean())
            if progress is not None:
                progress(done, L * H)
    return {"accuracy": float(correct.mean()) * 100, "delta_accuracy": d_acc, "delta_confidence": d_conf,
            "delta_accuracy_per_class": d_acc_c}


def lm_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy of a causal LM on ``input_ids [B, N]`` (a transformers causal LM,
    or a model mapping tokens ``[B, N]`` to logits ``[B, N, vocab]`` such as attnlab's LanguageModel)."""
    if hasattr(getattr(model, "config", None), "_attn_implementation"):  # a transformers model
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        logits = _logits(model(**kwargs)).float()
    else:  # attnlab's LanguageModel: tokens [B, N] -> logits [B, N, vocab]
        logits = _logits(model(input_ids)).float()
    target = input_ids[:, 1:]
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       reduction="none").view_as(target)
    if attention_mask is not None:
        keep = attention_mask[:, 1:].float()
        return float((loss * keep).sum() / keep.sum())
    return float(loss.mean())


def lm_loss_importance(model: nn.Module, input_ids: torch.Tensor, *, mode: str = "zero_output",
                       progress: Callable[[int, int], None] | None = None) -> tuple[float, torch.Tensor]:
    """``(loss_full, dLoss [L, H])`` with ``dLoss = loss(pruned) - loss(full)`` (inferred for LMs)."""
    full, pruned = ablation_importance(model, lambda: lm_loss(model, input_ids), mode=mode, progress=progress)
    return full, pruned - full


def embedding_change_importance(model: nn.Module, inputs: Any, *, mode: str = "zero_output",
                                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """For encoders without a task head: ``1 - cos`` between the mean-pooled last hidden state of the
    full and the pruned model, averaged over the batch, ``[L, H]`` (inferred; sentence-embedding
    models such as all-MiniLM-L6-v2 are used through this mean-pooled vector)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None

    def pooled() -> torch.Tensor:
        out = run_model(model, inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
        if mask is None:
            return hidden.float().mean(1)
        weights = mask[..., None].float()
        return (hidden.float() * weights).sum(1) / weights.sum(1)

    with torch.no_grad():
        reference = pooled()
    def change() -> float:
        return float(1 - nn.functional.cosine_similarity(pooled(), reference, dim=-1).mean())

    _, pruned = ablation_importance(model, change, mode=mode, progress=progress)
    return pruned


def gradient_importance(model: nn.Module, batches: Sequence[Any], loss: Callable[[Any, Any], torch.Tensor]
                        ) -> torch.Tensor:
    """Michel et al. 2019 head-gate proxy: ``mean over batches of |dL / d xi_{l,h}|`` with gates
    ``xi = 1`` multiplying each head's output, ``[L, H]``.

    Args:
        batches: model inputs (each run with :func:`attnlab.analysis.capture.run_model`).
        loss: ``loss(output, batch) -> scalar tensor``.
    """
    L, H = model_shape(model)
    total = torch.zeros(L, H, dtype=torch.float64)
    for batch in batches:
        gates = torch.ones(L, H, requires_grad=True)

        def gate(out: torch.Tensor, layer: int, gates: torch.Tensor = gates) -> torch.Tensor:
            return out * gates[layer].to(out.dtype)[None, :, None, None]

        with torch.enable_grad(), intervene(model, on_head_output=gate):
            value = loss(run_model(model, batch), batch)
            (grad,) = torch.autograd.grad(value, gates)
        total += grad.abs().double()
    return total / max(len(batches), 1)

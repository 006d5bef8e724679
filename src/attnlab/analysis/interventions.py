"""Head interventions: masking, scaling (VHR), sink redistribution (VAR), score boosting (PAINT), T3-S2S edits.

The context managers (:func:`mask_heads`, :func:`scale_heads`, :func:`redistribute_sinks`,
:func:`boost_scores`) act on any model that :func:`attnlab.analysis.intervene` supports; the
functions on tensors (:func:`var_redistribute`, :func:`headfork_select`, :func:`paint_modulate`,
:func:`paint_select_tokens`, :func:`prompt_balance`, :func:`topk_prominence`, :func:`dense_tuning`)
are the equations themselves, usable on score/probability tensors of any model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from attnlab.analysis.hooks.intervene import intervene

__all__ = [
    "mask_heads", "scale_heads", "redistribute_sinks", "boost_scores", "visible_keys",
    "var_redistribute", "headfork_select", "paint_modulate", "paint_select_tokens", "iqr_outlier_count",
    "prompt_balance", "topk_prominence", "dense_tuning",
]

MaskMode = Literal["uniform_attention", "zero_output", "mean_ablate"]
Phase = Literal["decode", "all"]


def _by_layer(heads: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = {}
    for pair in heads:
        if len(pair) != 2:
            raise ValueError(f"heads must be (layer, head) pairs, got {pair!r}")
        layer, head = int(pair[0]), int(pair[1])
        grouped.setdefault(layer, []).append(head)
    return grouped


def _check_heads(grouped: dict[int, list[int]], count: int) -> None:
    for layer, heads in grouped.items():
        bad = [h for h in heads if not 0 <= h < count]
        if bad:
            raise ValueError(f"heads {bad} of layer {layer} out of range: the layer has {count} query heads")


def visible_keys(scores: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., N, M]``: the keys a query may attend to, read off masked scores (a masked
    score is ``-inf`` or the additive mask's ``finfo.min``)."""
    return scores > torch.finfo(scores.dtype).min / 2


@contextlib.contextmanager
def mask_heads(model: nn.Module, heads: Iterable[tuple[int, int]], *, mode: MaskMode = "uniform_attention",
               phase: Phase = "decode") -> Iterator[None]:
    """Mask attention heads ``(layer, head)`` while the block runs.

    "Retrieval Head Mechanistically Explains Long-Context Factuality" (Wu et al., arXiv 2404.15574),
    masking experiment; zero/mean ablation as in head pruning (see ``docs/analysis.md``).

    Args:
        heads: ``(layer, query head)`` pairs.
        mode: ``"uniform_attention"`` (default, the paper's code): the head's scores are set to 0
            over its visible keys, so its softmax is uniform over them (the flash path of the code,
            ``query_states[:, h] = 0``; during one-token decoding identical to its eager path);
            ``"zero_output"``: ``O[:, h] = 0`` before the output projection;
            ``"mean_ablate"``: ``O[:, h]`` replaced by its mean over the positions of the current
            input (the averaging set is our choice).
        phase: ``"decode"`` (default, as the code): only forward passes with a single query
            position (KV-cache decoding steps) are masked; ``"all"``: every forward pass.
    """
    if mode not in ("uniform_attention", "zero_output", "mean_ablate"):
        raise ValueError(f"mode={mode!r}; expected 'uniform_attention', 'zero_output' or 'mean_ablate'")
    if phase not in ("decode", "all"):
        raise ValueError(f"phase={phase!r}; expected 'decode' or 'all'")
    grouped = _by_layer(heads)
    if not grouped:
        yield
        return

    def active(tensor: torch.Tensor) -> bool:
        return phase == "all" or tensor.shape[-2] == 1

    def uniform(scores: torch.Tensor, layer: int) -> torch.Tensor | None:
        if layer not in grouped or not active(scores):
            return None
        _check_heads(grouped, scores.shape[1])
        index = torch.tensor(grouped[layer], device=scores.device)
        edited = scores.clone()
        part = edited[:, index]  # (B, k, N, M)
        edited[:, index] = torch.where(visible_keys(part), torch.zeros_like(part), part)
        return edited

    def ablate(out: torch.Tensor, layer: int) -> torch.Tensor | None:
        if layer not in grouped or not active(out):
            return None
        _check_heads(grouped, out.shape[1])
        index = torch.tensor(grouped[layer], device=out.device)
        edited = out.clone()
        if mode == "zero_output":
            edited[:, index] = 0
        else:
            edited[:, index] = out[:, index].mean(dim=2, keepdim=True).expand_as(out[:, index])
        return edited

    with intervene(model, layers=sorted(grouped),
                   on_scores=uniform if mode == "uniform_attention" else None,
                   on_head_output=ablate if mode != "uniform_attention" else None):
        yield


@contextlib.contextmanager
def scale_heads(model: nn.Module, scales: dict[tuple[int, int], float], *,
                positions: slice | None = None) -> Iterator[None]:
    """Multiply the per-head outputs ``O[l][:, h]`` (before the output projection) by ``scales[(l, h)]``.

    VHR (Vision-aware Head Reinforcement), He et al., ACL 2025, arXiv 2412.13949, Alg. 1 step 4:
    ``A~_{l,i} = alpha * A_{l,i}`` for the selected heads (default alpha = 2). ``positions``
    restricts the scaling to query positions (default all, our reading of the paper:
    ``scale_prompt_positions=True``).
    """
    grouped: dict[int, dict[int, float]] = {}
    for (layer, head), alpha in scales.items():
        grouped.setdefault(int(layer), {})[int(head)] = float(alpha)

    def scale(out: torch.Tensor, layer: int) -> torch.Tensor | None:
        if layer not in grouped:
            return None
        _check_heads({layer: list(grouped[layer])}, out.shape[1])
        factor = torch.ones(out.shape[1], dtype=out.dtype, device=out.device)
        for head, alpha in grouped[layer].items():
            factor[head] = alpha
        factor = factor[None, :, None, None]  # (1, H, 1, 1)
        if positions is None:
            return out * factor
        edited = out.clone()
        edited[:, :, positions] = out[:, :, positions] * factor
        return edited

    with intervene(model, layers=sorted(grouped), on_head_output=scale):
        yield


def var_redistribute(probs: torch.Tensor, sinks: Sequence[int] | torch.Tensor, image: slice, *,
                     p: float = 0.6) -> torch.Tensor:
    """Move attention away from sink tokens to the non-sink image tokens (VARProcessor).

    Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal Models",
    ICLR 2025 (``VARProcessor`` of the authors' code)::

        a[S_all] *= p;  budget = (1 - p) * sum(a_orig[S_all])
        w = a_orig[I] with w[S_v] = 0;  a[I] += budget * w / sum(w)

    Args:
        probs: attention rows ``[..., M]`` (the selected rows; any leading shape).
        sinks: the sink key positions ``S_all`` (text and visual sinks).
        image: the image key span ``I`` as a slice.
        p: fraction of attention kept at the sinks (default 0.6).

    Returns:
        the redistributed rows; every row sum is preserved. A row whose non-sink image attention is
        0 would give NaN in the authors' code; it is left unchanged here.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p} must be in [0, 1] (the fraction of attention kept at the sinks)")
    M = probs.shape[-1]
    sink = torch.zeros(M, dtype=torch.bool, device=probs.device)
    sink[torch.as_tensor(sinks, dtype=torch.long, device=probs.device)] = True
    in_image = torch.zeros(M, dtype=torch.bool, device=probs.device)
    in_image[image] = True
    budget = (1 - p) * (probs * sink).sum(-1, keepdim=True)
    w = probs * (in_image & ~sink)
    total = w.sum(-1, keepdim=True)
    ok = total > 0
    ratio = torch.where(ok, w / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(w))
    out = torch.where(sink, probs * p, probs) + budget * ratio
    return torch.where(ok, out, probs)


def headfork_select(probs: torch.Tensor, sinks: Sequence[int] | torch.Tensor, image: slice, *,
                    rho: float = 0.5, summ: float = 0.2, eps: float = 1e-6) -> torch.Tensor:
    """Image-centric rows (HeadFork), Kang et al., ICLR 2025.

    ``portion = sum_{S_v} (a + eps) / sum_I (a + eps)`` (eps added to every element, as the code),
    ``summation = sum_I a``; a row is selected iff ``portion <= rho`` and ``summation >= summ``.
    ``rho`` has the code's meaning (the paper's "non-sink ratio >= rho" is ``1 - portion >= rho``).
    If no sink lies in the image span nothing is selected.

    Args:
        probs: ``[..., M]`` attention rows. Returns a boolean tensor of the leading shape.
    """
    M = probs.shape[-1]
    in_image = torch.zeros(M, dtype=torch.bool, device=probs.device)
    in_image[image] = True
    sink = torch.zeros(M, dtype=torch.bool, device=probs.device)
    sink[torch.as_tensor(sinks, dtype=torch.long, device=probs.device)] = True
    visual_sink = sink & in_image
    if not bool(visual_sink.any()):
        return torch.zeros(probs.shape[:-1], dtype=torch.bool, device=probs.device)
    shifted = probs + eps
    portion = (shifted * visual_sink).sum(-1) / (shifted * in_image).sum(-1)
    summation = (probs * in_image).sum(-1)
    return (portion <= rho) & (summation >= summ)


@contextlib.contextmanager
def redistribute_sinks(model: nn.Module, sinks: dict[int, Sequence[int]], image: slice, *, p: float = 0.6,
                       rho: float = 0.5, summ: float = 0.2, query_start: int = 0,
                       except_last_layer: int = 1) -> Iterator[None]:
    """VAR on a model: for each layer in ``sinks`` (its sink positions), rows selected by
    :func:`headfork_select` at query positions ``>= query_start`` are redistributed with
    :func:`var_redistribute`; the last ``except_last_layer`` layers are skipped.

    Kang et al., ICLR 2025 (HeadFork then VAR). During one-token decoding every selected row
    is modified (the query offset applies to multi-token passes only).
    """
    from attnlab.analysis.hooks.intervene import attention_layers

    last = len(attention_layers(model)) - except_last_layer

    def edit(probs: torch.Tensor, layer: int) -> torch.Tensor | None:
        if layer not in sinks or layer >= last or not len(sinks[layer]):
            return None
        selected = headfork_select(probs, sinks[layer], image, rho=rho, summ=summ)  # (B, H, N)
        if probs.shape[-2] > 1:
            selected[..., :query_start] = False
        if not bool(selected.any()):
            return None
        moved = var_redistribute(probs, sinks[layer], image, p=p)
        return torch.where(selected[..., None], moved, probs)

    with intervene(model, on_probs=edit):
        yield


def paint_modulate(scores: torch.Tensor, local: Sequence[int] | torch.Tensor,
                   summary: Sequence[int] | torch.Tensor, *, alpha: float = 0.7, beta: float = 0.3,
                   last_row_only: bool = True) -> torch.Tensor:
    """PAINT pre-softmax boosting ``S <- S + alpha |S|`` (local tokens), ``S + beta |S|`` (summary tokens).

    Arif et al., "PAINT: Paying Attention to INformed Tokens" (arXiv 2501.12206).

    Args:
        scores: ``[..., N, M]`` pre-softmax scores.
        local / summary: disjoint key positions (absolute, i.e. already offset by the image start).
        alpha / beta: boosts (code defaults 0.7 / 0.3; the paper's ablation prefers beta = 0.4).
        last_row_only: modulate only the last query row (the code); else every row.
    """
    local = torch.as_tensor(local, dtype=torch.long, device=scores.device)
    summary = torch.as_tensor(summary, dtype=torch.long, device=scores.device)
    if bool(torch.isin(local, summary).any()):
        raise ValueError("local and summary token sets must be disjoint (PAINT removes the summary tokens "
                         "from the local set)")
    out = scores.clone()
    rows = slice(-1, None) if last_row_only else slice(None)
    part = out[..., rows, :]
    part[..., local] = part[..., local] + alpha * part[..., local].abs()
    part[..., summary] = part[..., summary] + beta * part[..., summary].abs()
    out[..., rows, :] = part
    return out


@contextlib.contextmanager
def boost_scores(model: nn.Module, local: Sequence[int], summary: Sequence[int] = (), *, alpha: float = 0.7,
                 beta: float = 0.3, layers: Sequence[int] | None = None) -> Iterator[None]:
    """PAINT on a model: :func:`paint_modulate` on the last query row of ``layers`` (default: from
    layer 2 to the end, the code's ``[start_layer, end_layer)``)."""
    from attnlab.analysis.hooks.intervene import attention_layers

    chosen = list(range(2, len(attention_layers(model)))) if layers is None else list(layers)

    def edit(scores: torch.Tensor, layer: int) -> torch.Tensor:
        return paint_modulate(scores, local, summary, alpha=alpha, beta=beta)

    with intervene(model, layers=chosen, on_scores=edit):
        yield


def iqr_outlier_count(values: torch.Tensor) -> int:
    """``#{ j : v_j > Q3 + 1.5 IQR }`` (PAINT's ``get_top_ratio``)."""
    q1, q3 = torch.quantile(values.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    return int((values.double() > q3 + 1.5 * (q3 - q1)).sum())


def paint_select_tokens(first_layer_cls: torch.Tensor, penultimate_cls: torch.Tensor, *,
                        local_ratio: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """PAINT's dual-stream token selection (Arif et al., arXiv 2501.12206).

    Args:
        first_layer_cls: CLS->patch attention summed over heads in the first ViT layer, ``[N_v]``.
        penultimate_cls: the same in the penultimate ViT layer, ``[N_v]``.
        local_ratio: fraction of patches kept as local tokens (0.25).

    Returns:
        ``(local, summary)`` patch indices, disjoint: summary = top-``k_sum`` of the penultimate
        layer with ``k_sum`` the IQR outlier count; local = top-``floor(N_v r)`` of the first layer
        minus the summary tokens.
    """
    n = first_layer_cls.shape[-1]
    local = torch.topk(first_layer_cls, int(n * local_ratio)).indices
    k_sum = iqr_outlier_count(penultimate_cls)
    summary = torch.topk(penultimate_cls, k_sum).indices
    local = local[~torch.isin(local, summary)]
    return local.sort().values, summary.sort().values


def prompt_balance(embeddings: torch.Tensor, key_tokens: Sequence[int], eot: int, *, beta: float = 1.0,
                   adjective_tokens: Sequence[int] = (), beta_adj: float = 1.0) -> torch.Tensor:
    """T3-S2S prompt balance on text embeddings ``[T, C]`` (Sun et al., arXiv 2412.13486).

    ``e_k <- sqrt(beta E_EOT / E_k) e_k`` for key-noun tokens (``E = ||e||^2``), and
    ``e_a <- sqrt(beta_adj max_k E_k / E_a) e_a`` for adjective tokens (max over the balanced key
    nouns). Other tokens are unchanged.
    """
    out = embeddings.clone()
    energy = embeddings.pow(2).sum(-1)  # (T,)
    keys = torch.as_tensor(list(key_tokens), dtype=torch.long)
    if len(keys):
        out[keys] = embeddings[keys] * torch.sqrt(beta * energy[eot] / energy[keys])[:, None]
    adjectives = torch.as_tensor(list(adjective_tokens), dtype=torch.long)
    if len(adjectives):
        top = out[keys].pow(2).sum(-1).max() if len(keys) else energy.max()
        out[adjectives] = embeddings[adjectives] * torch.sqrt(beta_adj * top / energy[adjectives])[:, None]
    return out


def topk_prominence(out: torch.Tensor, values: torch.Tensor, key_tokens: Sequence[int], region: torch.Tensor, *,
                    k: int = 2, alpha: float = 2.0, exclude_first: bool = True,
                    legacy_zero_others: bool = False) -> torch.Tensor:
    """T3-S2S characteristics prominence inside cross-attention (Sun et al., arXiv 2412.13486).

    For each channel c, the top-``k`` prompt tokens by ``|V[token, c]|`` (token 0, SOT, excluded);
    where such a token is a key noun and the pixel lies in that noun's region, ``O[pixel, c] *= alpha``.

    Args:
        out: cross-attention output ``[P, C]`` (pixels x channels), ``O = A V``.
        values: ``V`` of the prompt tokens, ``[T, C]``.
        key_tokens: key-noun token indices, each with a region mask row.
        region: boolean ``[len(key_tokens), P]``: pixel p lies in noun i's region.
        legacy_zero_others: reproduce the code's ``O <- (mask > 0) alpha O``, which zeroes every
            other (pixel, channel); the default (inferred intent) multiplies only selected entries.
    """
    start = 1 if exclude_first else 0
    top = torch.topk(values[start:].abs(), k, dim=0).indices + start  # (k, C)
    select = torch.zeros_like(out, dtype=torch.bool)  # (P, C)
    for i, token in enumerate(key_tokens):
        channel_hit = (top == token).any(0)  # (C,)
        select |= region[i][:, None] & channel_hit[None, :]
    if legacy_zero_others:
        return select * alpha * out
    return torch.where(select, alpha * out, out)


def dense_tuning(scores: torch.Tensor, mask: torch.Tensor, *, weight: float = 0.1, timestep: float = 1000.0,
                 area_factor: float = 1.0, cross: bool = True) -> torch.Tensor:
    """DenseDiffusion-style score edit used by T3-S2S (arXiv 2412.13486): with ``r = w (t/1000)^5 s_reg``,
    ``S + r (max_k S - S)`` inside ``mask`` and, for cross-attention, ``S - r (S - min_k S)`` outside.
    ``weight = 0`` is the identity."""
    r = weight * (timestep / 1000.0) ** 5 * area_factor
    high = scores.amax(-1, keepdim=True)
    low = scores.amin(-1, keepdim=True)
    inside = scores + r * (high - scores)
    if not cross:
        return torch.where(mask, inside, scores)
    return torch.where(mask, inside, scores - r * (scores - low))

"""Context divergence of heads (VHD) and the head selection of VHR.

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence"
(ACL 2025, arXiv 2412.13949):

- VHD (eq. 4): ``VHD_{l,i} = || O_{l,i}(with context) - O_{l,i}(without context) ||_2`` on the
  last query position, with ``O`` the per-head output before the output projection. Here the
  "context" is any removable segment (the paper's image tokens; a text passage for LMs);
- T-VHD (eq. 5): the sum over layers of each layer's top-k head scores (k inferred, default 4);
- outlier zeroing (eq. 6) with the population std (inferred), and the selection of heads strictly
  above the layer median (Alg. 1); ties at the median select nobody;
- VHR: the selected heads' outputs are scaled by alpha (default 2), layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnlab.analysis.capture import capture
from attnlab.analysis.interventions import scale_heads

__all__ = ["head_divergence", "head_output_norms", "zero_outliers", "select_above_median", "t_vhd",
           "vhr_select", "VHRSelection"]


def head_divergence(model: nn.Module, with_context: Any, without_context: Any, *, position: int = -1,
                    squared: bool = False, layers: Sequence[int] | None = None) -> torch.Tensor:
    """``[L, H]``: distance between each head's output with and without the context segment, at
    query ``position`` (default the last), batch element 0 (eq. 4; ``squared=True`` gives the
    squared norm of the third-party port)."""
    full = capture(model, with_context, what=("head_outputs",), layers=layers)
    reduced = capture(model, without_context, what=("head_outputs",), layers=layers)
    L = full.num_layers
    heads = next(iter(full.head_outputs.values())).shape[1]
    out = torch.zeros(L, heads, dtype=torch.float64)
    for layer in full.head_outputs:
        diff = full.head_outputs[layer][0, :, position].double() - reduced.head_outputs[layer][0, :, position].double()
        norm = diff.pow(2).sum(-1)
        out[layer] = norm if squared else norm.sqrt()
    return out


def head_output_norms(model: nn.Module, inputs: Any, *, position: int = -1) -> torch.Tensor:
    """``TA_{l,i} = ||O_{l,i}||^2`` at ``position`` (eq. 6's text-only attention norm), ``[L, H]``."""
    record = capture(model, inputs, what=("head_outputs",))
    return torch.stack([record.head_outputs[layer][0, :, position].double().pow(2).sum(-1)
                        for layer in sorted(record.head_outputs)])


def zero_outliers(vhd: torch.Tensor, ta: torch.Tensor) -> torch.Tensor:
    """Eq. 6, per layer (last axis = heads): ``VHD = 0`` where ``VHD > mu + sigma`` and
    ``TA > mu + sigma`` (mean and population std over the heads of the layer; ddof = 0 inferred)."""
    v, t = vhd.double(), ta.double()
    high_v = v > v.mean(-1, keepdim=True) + v.std(-1, correction=0, keepdim=True)
    high_t = t > t.mean(-1, keepdim=True) + t.std(-1, correction=0, keepdim=True)
    return torch.where(high_v & high_t, torch.zeros_like(v), v)


def select_above_median(vhd: torch.Tensor) -> torch.Tensor:
    """Boolean mask of heads strictly above their layer's median (Alg. 1 step 3). Heads tied at the
    median are not selected, so a layer such as ``[1, 1, 1, 0]`` selects nobody."""
    median = vhd.double().median(-1, keepdim=True).values
    return vhd.double() > median


def t_vhd(vhd: torch.Tensor, *, k: int = 4) -> float:
    """Eq. 5: ``sum_l sum_{top-k heads of l} VHD_{l,i}`` (k inferred: the paper gives no value)."""
    return float(torch.topk(vhd.double(), min(k, vhd.shape[-1]), dim=-1).values.sum())


@dataclass
class VHRSelection:
    """The reinforced heads per layer, the VHD matrix at step 0 (after outlier zeroing) and alpha."""

    heads: dict[int, list[int]]
    vhd: torch.Tensor
    alpha: float

    @property
    def scales(self) -> dict[tuple[int, int], float]:
        return {(layer, head): self.alpha for layer, heads in self.heads.items() for head in heads}


def vhr_select(model: nn.Module, with_context: Any, without_context: Any, *, layers: Sequence[int],
               alpha: float = 2.0, position: int = -1) -> VHRSelection:
    """VHR head selection (Alg. 1), layer by layer in increasing order: VHD of layer ``l`` is measured
    with the already-selected heads of earlier layers scaled by ``alpha`` in both branches, outliers
    are zeroed, and heads above the median are selected. Use the result with
    ``attnlab.analysis.scale_heads(model, selection.scales)``."""
    if not len(layers):
        raise ValueError("layers is empty: give the layers to reinforce (the paper: {1} and the last 14)")
    chosen: dict[int, list[int]] = {}
    L = None
    vhd_all = None
    for layer in sorted(layers):
        scales = {(a, h): alpha for a, heads in chosen.items() for h in heads}
        with scale_heads(model, scales):
            full = capture(model, with_context, what=("head_outputs",), layers=[layer])
            reduced = capture(model, without_context, what=("head_outputs",), layers=[layer])
        if L is None:
            L = full.num_layers
            vhd_all = torch.zeros(L, full.head_outputs[layer].shape[1], dtype=torch.float64)
        a = full.head_outputs[layer][0, :, position].double()
        b = reduced.head_outputs[layer][0, :, position].double()
        vhd = (a - b).pow(2).sum(-1).sqrt()
        vhd = zero_outliers(vhd, b.pow(2).sum(-1))
        vhd_all[layer] = vhd
        chosen[layer] = torch.nonzero(select_above_median(vhd)).flatten().tolist()
    assert vhd_all is not None
    return VHRSelection(heads=chosen, vhd=vhd_all, alpha=alpha)

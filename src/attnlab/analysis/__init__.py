"""attnlab.analysis: capture attention inside real models, head-level metrics and interventions.

>>> from attnlab.analysis import load_model, capture, intervene, mask_heads
>>> m = load_model("minilm")                                        # doctest: +SKIP
>>> record = capture(m.model, m.tokenizer("a sentence", return_tensors="pt"))  # doctest: +SKIP
>>> record.probs[0].shape                                           # doctest: +SKIP
torch.Size([1, 12, 4, 4])

Modules: ``capture`` (AttentionRecord, capture), ``hooks`` (intervene), ``interventions`` (mask,
scale, VAR, PAINT, T3-S2S edits), ``retrieval``, ``sinks``, ``importance``, ``distance`` (with
WAAD / FAI), ``divergence``, ``saliency``, ``regression_patterns``, ``models`` (offline loading),
``report`` and ``cli`` (``attnlab analyze``). ``docs/analysis.md`` lists each module's paper and the
method notes (procedures, and which definitions are ours where a paper leaves them open).
"""

from attnlab.analysis.capture import AttentionRecord, capture
from attnlab.analysis.hooks import attention_layers, intervene
from attnlab.analysis.interventions import (
    boost_scores,
    dense_tuning,
    headfork_select,
    mask_heads,
    paint_modulate,
    paint_select_tokens,
    prompt_balance,
    redistribute_sinks,
    scale_heads,
    topk_prominence,
    var_redistribute,
)
from attnlab.analysis.models import load_model, save_tiny_model

__all__ = [
    "AttentionRecord", "attention_layers", "boost_scores", "capture", "dense_tuning", "headfork_select",
    "intervene", "load_model", "mask_heads", "paint_modulate", "paint_select_tokens", "prompt_balance",
    "redistribute_sinks", "save_tiny_model", "scale_heads", "topk_prominence", "var_redistribute",
]

"""Hook points inside attention layers (analysis spec section 0.2)."""

from attnlab.analysis.hooks.intervene import HookFn, attention_layers, intervene, is_hf_model

__all__ = ["HookFn", "attention_layers", "intervene", "is_hf_model"]

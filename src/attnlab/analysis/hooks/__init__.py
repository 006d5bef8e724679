"""Hook points inside attention layers (``docs/analysis.md``, "Capture and hook points")."""

from attnlab.analysis.hooks.intervene import HookFn, attention_layers, intervene, is_hf_model

__all__ = ["HookFn", "attention_layers", "intervene", "is_hf_model"]

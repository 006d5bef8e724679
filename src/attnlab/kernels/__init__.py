"""Triton kernels behind the ops (one module per mechanism).

The kernels are selected by the ops on devices where they run (:func:`triton_runs_on`) and are
checked against the ops' float64 references under ``TRITON_INTERPRET=1`` on CPU.
"""

from attnlab.kernels.lightning import (
    lightning_attention_triton,
    linear_attention_triton,
    triton_available,
    triton_runs_on,
)

__all__ = ["lightning_attention_triton", "linear_attention_triton", "triton_available", "triton_runs_on"]

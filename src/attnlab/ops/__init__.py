"""Pure functions on ``[B, H, N, D]`` tensors: one module per mechanism (or tight family).

Importing a module registers its mechanism (see :mod:`attnlab.registry`).
"""

from types import ModuleType as _ModuleType

from attnlab.ops.softmax import attention_mask, softmax_attention, softmax_attention_reference
from attnlab.ops.softmax_backends import clear_softmax_backend_cache, softmax_backend_report

# One block of imports per mechanism family below (separate blocks keep edits to different families apart).
# --- Mechanisms I: linear and recurrent family ---
# isort: split
from attnlab.ops.agent import adaptive_pool_matrix, agent_attention, agent_attention_reference, agent_tokens
from attnlab.ops.flow import flow_attention, flow_attention_reference
from attnlab.ops.lightnet import (
    lightnet_attention,
    lightnet_attention_chunked,
    lightnet_attention_recurrent,
    lightnet_attention_reference,
    lightnet_attention_step,
)
from attnlab.ops.lightning import (
    lightning_attention,
    lightning_attention_chunked,
    lightning_attention_recurrent,
    lightning_attention_reference,
    lightning_attention_step,
    lightning_decay_slopes,
)
from attnlab.ops.linear import (
    FEATURE_MAPS,
    linear_attention,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_reference,
    linear_attention_step,
)

# isort: split
# --- Mechanisms II: local, sparse and biased ---
from attnlab.ops.dynamic_mask import dynamic_mask_attention, dynamic_mask_attention_reference, dynamic_mask_select
from attnlab.ops.flashbias import (
    alibi_bias,
    alibi_bias_factors,
    alibi_slopes,
    flashbias_attention,
    flashbias_attention_reference,
    spatial_distance_bias_factors,
    svd_bias_factors,
)
from attnlab.ops.hip import hip_attention, hip_attention_reference, hip_mask, hip_select_blocks
from attnlab.ops.neighborhood import neighborhood_attention, neighborhood_attention_reference, neighborhood_mask
from attnlab.ops.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_reference,
    sliding_window_mask,
)

# isort: split
# --- Mechanisms III: head routing, similarity forms, tensor attention ---
from attnlab.ops.rcmha import relative_attention, relative_scores, relative_scores_reference
from attnlab.ops.tensor import (
    column_kronecker,
    tensor_attention,
    tensor_attention_chunked,
    tensor_attention_reference,
    tensor_attention_taylor,
)

__all__ = [name for name, value in dict(globals()).items()
           if not name.startswith("_") and not isinstance(value, _ModuleType)]

"""attnlab: the attention mechanisms of recent research behind one interface.

>>> import torch, attnlab
>>> q = k = v = torch.randn(2, 4, 128, 64)          # [B, H, N, D]
>>> attnlab.attention(q, k, v, mechanism="softmax", causal=True).shape
torch.Size([2, 4, 128, 64])
"""

import attnlab.nn  # noqa: E402

# the ops and layers register their mechanisms when imported (after the registry, which they import)
import attnlab.ops  # noqa: E402, I001
from attnlab.registry import CheckConfig, Mechanism, attention, get, mechanisms, register

__version__ = "0.1.0"

__all__ = ["CheckConfig", "Mechanism", "attention", "get", "mechanisms", "register", "__version__"]

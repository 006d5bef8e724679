"""attnlab: the attention mechanisms of recent research behind one interface.

>>> import torch, attnlab
>>> q = k = v = torch.randn(2, 4, 128, 64)          # [B, H, N, D]
>>> attnlab.attention(q, k, v, mechanism="softmax", causal=True).shape
torch.Size([2, 4, 128, 64])

The package imports lazily (PEP 562 ``__getattr__``): ``import attnlab`` loads neither torch nor the
ops; ``attnlab.get``, ``attnlab.mechanisms()``, ``attnlab.ops``, ``attnlab.nn``, ... import what
they need on first use, and the first registry lookup imports the modules that register the
mechanisms (so ``attnlab --help`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["CheckConfig", "Mechanism", "attention", "get", "mechanisms", "register", "__version__"]

_REGISTRY_NAMES = frozenset({"CheckConfig", "Mechanism", "attention", "get", "mechanisms", "register"})
_SUBPACKAGES = frozenset({"adversarial", "analysis", "bench", "cli", "cli_errors", "console", "distributed", "files",
                          "hf", "kernels", "models", "nn", "ops", "registry", "tasks", "testing"})


def _register_mechanisms() -> None:
    """Import the layers and ops, whose modules register their mechanisms (after the registry they import)."""
    import attnlab.nn  # noqa: F401
    import attnlab.ops  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _REGISTRY_NAMES:
        from attnlab import registry

        registry._ensure_populated()  # the registry, filled: every mechanism registered
        value = getattr(registry, name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"attnlab.{name}")
    raise AttributeError(f"module 'attnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_REGISTRY_NAMES, *_SUBPACKAGES})


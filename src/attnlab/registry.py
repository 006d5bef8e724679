"""The registry of mechanisms: name -> op, reference, layer and metadata.

Everything that iterates over "all mechanisms" (the conformance suite, the benchmarks, the CLI)
reads it, so adding a mechanism is one module in ``attnlab.ops`` (or ``attnlab.nn``) plus one
``register(Mechanism(...))`` call at its bottom.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["CheckConfig", "Mechanism", "register", "get", "mechanisms", "attention"]


ROLES = ("mixer", "cross", "pooling", "probe")


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class CheckConfig:
    """Input sizes and tolerances the conformance suite uses for one mechanism.

    A mechanism that needs particular inputs (a grid, a minimum length, a kernel size) says so
    here instead of the suite special-casing it.

    Attributes:
        length: query length N of the small float32/float64 checks.
        key_length: key length M for cross-attention checks (``None``: same as ``length``).
        head_dim: D of q and k.
        value_dim: Dv of v (``None``: same as ``head_dim``).
        heads, kv_heads: H of q and H_kv of k, v in the grouped-query checks.
        options: keyword options passed to the op in every check (e.g. ``{"kernel_size": 3}``).
        bf16_length, bf16_head_dim, bf16_options: sizes of the bfloat16 check (realistic lengths).
        bf16_tolerance: max relative error (Frobenius) of bf16 output vs the float64 reference.
        float32_tolerance: max relative error of the float32 fast path vs the float64 reference.
        float64_tolerance: same, float64 fast path.
        gradcheck_length: N of the float64 gradcheck (tiny).
        input_scale: standard deviation of the random q, k, v.

    Layer-level checks (``tests/test_layer_conformance.py``, every record with ``layer`` set):
        layer_configs: option sets for the layer; every layer check runs once per set. A "mixer" is
            built as ``layer(dim, heads, causal=..., **config)`` (``dim = heads * head_dim``,
            ``length`` tokens); e.g. ``({"similarity": "qk"}, {"similarity": "symmetric"})``.
        layer_build: how to build a layer of another role (required for "cross", "pooling" and "probe"
            when ``layer(dim, heads, causal=..., **config)`` does not fit):
            ``layer_build(dim, heads, *, causal, **config) -> nn.Module``. Mixers leave it ``None``.
        layer_inputs: how to make the inputs of a layer that takes more than ``x [B, N, dim]``:
            ``layer_inputs(layer, *, batch, length, dim, dtype, generator) -> (inputs, output_shape)``
            where ``inputs`` is a dict of keyword arguments (``layer(**inputs)``; the first entry is
            the main ``[B, N, dim]`` sequence, batch first; draw every float tensor from
            ``generator``) and ``output_shape`` the expected shape of the layer's (first) output.
            ``None``: ``{"x": randn(batch, length, dim)}`` and ``output_shape = x.shape``.
    """

    length: int = 13
    key_length: int | None = None
    head_dim: int = 8
    value_dim: int | None = None
    heads: int = 4
    kv_heads: int = 2
    options: Mapping[str, Any] = field(default_factory=dict)
    bf16_length: int = 512
    bf16_head_dim: int = 64
    bf16_options: Mapping[str, Any] | None = None
    bf16_tolerance: float = 2e-2
    float32_tolerance: float = 1e-5
    float64_tolerance: float = 1e-10
    gradcheck_length: int = 5
    input_scale: float = 1.0
    layer_configs: tuple[Mapping[str, Any], ...] = ({},)
    layer_build: Callable[..., torch.nn.Module] | None = None
    layer_inputs: Callable[..., tuple[dict[str, torch.Tensor], tuple[int, ...]]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _frozen(self.options))
        object.__setattr__(self, "layer_configs", tuple(_frozen(c) for c in self.layer_configs))
        if self.bf16_options is not None:
            object.__setattr__(self, "bf16_options", _frozen(self.bf16_options))


@dataclass(frozen=True)
class Mechanism:
    """One attention mechanism as the rest of attnlab sees it.

    Attributes:
        name: the short name users pass as ``mechanism=``.
        op: the public functional op ``op(q, k, v, *, ..., impl="auto")`` on ``[B, H, N, D]``
            tensors, or ``None`` for a mechanism that only exists as a layer.
        reference: the plain transcription of the paper's equations (the oracle), same signature
            as ``op`` without ``impl``; ``None`` for layer-only mechanisms.
        layer: the ``nn.Module`` class that carries the mechanism's own parameters, or ``None``
            when :class:`attnlab.nn.Attention` (projections around ``op``) is the layer.
        family: a grouping for tables ("softmax", "linear", "local", ...).
        paper: title of the source paper. arxiv: its arXiv id, or ``None``.
        supports_causal / supports_bidirectional: which masking regimes the math defines.
        supports_cross: keys/values may have a different length than the queries.
        supports_gqa: k, v may have fewer heads ``H_kv`` dividing ``H``.
        supports_value_dim: v may have a head dim different from q, k.
        differentiable: gradients flow to q, k, v.
        complexity: asymptotic cost, e.g. ``"O(N^2 d)"``.
        defaults: the option defaults of ``op`` (documentation and benchmarks read them).
        impls: names of the fast paths the op accepts as ``impl=`` (besides "reference", "auto").
        check: sizes and tolerances for the conformance suite.
        state_size: optional ``f(heads, head_dim, value_dim) -> int``, floats of recurrent state
            per sequence (benchmarks plot accuracy against it).
        role: how the layer fits a model. "mixer": self-attention ``x [B, N, dim] -> [B, N, dim]``,
            built as ``layer(dim, heads, *, causal=..., **options)``, usable in every model;
            "cross": needs a second input; "pooling": ``[B, N, dim] -> [B, n, dim]``;
            "probe": a read-out head. Models only take "mixer" mechanisms.
    """

    name: str
    op: Callable[..., Any] | None
    reference: Callable[..., Any] | None
    layer: type[torch.nn.Module] | None
    family: str
    paper: str
    arxiv: str | None
    supports_causal: bool
    supports_bidirectional: bool
    complexity: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    supports_cross: bool = False
    supports_gqa: bool = False
    supports_value_dim: bool = True
    differentiable: bool = True
    impls: tuple[str, ...] = ()
    check: CheckConfig = field(default_factory=CheckConfig)
    state_size: Callable[[int, int, int], int] | None = None
    role: str = "mixer"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", _frozen(self.defaults))
        if not (self.supports_causal or self.supports_bidirectional):
            raise ValueError(f"mechanism {self.name!r} must support causal or bidirectional attention")
        if self.role not in ROLES:
            raise ValueError(f"mechanism {self.name!r}: role={self.role!r} is not one of {ROLES}")
        if self.op is None and self.layer is None:
            raise ValueError(f"mechanism {self.name!r} needs an op or a layer")

    @property
    def causal_only(self) -> bool:
        return self.supports_causal and not self.supports_bidirectional

    def accepts(self, option: str, *, reference: bool = False) -> bool:
        """Whether the op (or the reference, with ``reference=True``) takes the keyword ``option``."""
        function = self.reference if reference else self.op
        if function is None:
            return False
        parameters = inspect.signature(function).parameters
        return option in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 **options: Any) -> Any:
        """Run the op with the generic ``causal=`` flag, whatever the op's own signature."""
        return self._invoke(self.op, q, k, v, causal=causal, reference=False, **options)

    def run_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      **options: Any) -> Any:
        """Run the reference implementation with the generic ``causal=`` flag."""
        options.pop("impl", None)
        return self._invoke(self.reference, q, k, v, causal=causal, reference=True, **options)

    def _invoke(self, function: Callable[..., Any] | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                *, causal: bool, reference: bool, **options: Any) -> Any:
        if function is None:
            raise TypeError(
                f"mechanism {self.name!r} has no functional op; use the layer "
                f"attnlab.nn.{self.layer.__name__} instead"
            )
        causal = self._check_causal(causal)
        if self.accepts("causal", reference=reference):
            options["causal"] = causal
        return function(q, k, v, **options)

    def _check_causal(self, causal: bool) -> bool:
        if causal and not self.supports_causal:
            raise NotImplementedError(f"mechanism {self.name!r} defines no causal form ({self.paper})")
        if not causal and not self.supports_bidirectional:
            raise NotImplementedError(
                f"mechanism {self.name!r} is causal only ({self.paper}); pass causal=True"
            )
        return causal


_REGISTRY: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to the registry; a name can be registered once."""
    if mechanism.name in _REGISTRY and _REGISTRY[mechanism.name] is not mechanism:
        raise ValueError(f"a mechanism named {mechanism.name!r} is already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def _load_all() -> None:
    # The ops and nn packages register their mechanisms when imported.
    import attnlab.nn  # noqa: F401
    import attnlab.ops  # noqa: F401


def mechanisms() -> list[Mechanism]:
    """All registered mechanisms, sorted by family then name."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda m: (m.family, m.name))


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; an unknown name raises ``KeyError`` with the closest names."""
    _load_all()
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"unknown mechanism {name!r}{hint} (registered: {', '.join(sorted(_REGISTRY))})"
        ) from None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mechanism: str = "softmax",
              causal: bool = False, **options: Any) -> Any:
    """Attention of any registered mechanism on ``[B, H, N, D]`` tensors.

    ``attention(q, k, v, mechanism="lightning", causal=True, decay=0.1)`` is the same as calling the
    mechanism's op with those options.
    """
    return get(mechanism)(q, k, v, causal=causal, **options)

"""The registry of mechanisms: name -> op, reference, layer and metadata.

Everything that iterates over "all mechanisms" (the conformance suite, the benchmarks, the CLI)
reads it, so adding a mechanism is one module in ``attnlab.ops`` (or ``attnlab.nn``) plus one
``register(Mechanism(...))`` call at its bottom.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args, get_origin, get_type_hints

import torch

__all__ = ["BenchShape", "CheckConfig", "DEVICES", "Mechanism", "register", "get", "mechanisms", "attention"]


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


DEVICES = ("cpu", "cuda", "triton-interpreter")
"""Where an impl can run: a device type, or "triton-interpreter" (CPU with ``TRITON_INTERPRET=1`` set before
triton is imported, the way Triton kernels are tested without a GPU)."""


@dataclass(frozen=True)
class BenchShape:
    """The shape of one speed-benchmark cell: ``q [batch, heads, length, head_dim]``, ``k, v [batch, kv_heads,
    length, head_dim]`` on ``device`` in ``dtype``. :attr:`Mechanism.bench_options` receives it."""

    batch: int
    heads: int
    kv_heads: int
    length: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))


def _signature_target(op: Callable[..., Any] | None, layer: type[torch.nn.Module] | None) -> Callable[..., Any]:
    return op if op is not None else layer  # type: ignore[return-value]


def _options(function: Callable[..., Any], *, is_layer: bool) -> list[inspect.Parameter]:
    """The option parameters of an op (keyword-only) or a layer (keyword-only, or positional with a default
    other than its sizes ``dim``/``heads``)."""
    options = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY:
            options.append(parameter)
        elif (is_layer and parameter.kind is parameter.POSITIONAL_OR_KEYWORD
              and parameter.default is not parameter.empty and parameter.name not in ("dim", "heads")):
            options.append(parameter)
    return options


def _impl_names(name: str, function: Callable[..., Any]) -> tuple[str, ...]:
    """The fast paths named by the ``impl`` parameter's ``Literal[...]`` annotation (without "auto", "reference")."""
    parameter = inspect.signature(function).parameters.get("impl")
    if parameter is None:
        return ()
    # modules use ``from __future__ import annotations``: get_type_hints resolves the annotation text
    target = function.__init__ if isinstance(function, type) else function
    annotation = get_type_hints(target).get("impl", parameter.annotation)
    if get_origin(annotation) is not Literal:
        raise TypeError(f"mechanism {name!r}: the impl parameter must be annotated Literal['auto', 'reference', ...] "
                        f"(the registry reads the impl names from it), got {parameter.annotation!r}")
    return tuple(i for i in get_args(annotation) if i not in ("auto", "reference"))


@dataclass(frozen=True)
class Mechanism:
    """One attention mechanism as the rest of attnlab sees it.

    Attributes:
        name: the short name users pass as ``mechanism=``.
        op: the public functional op ``op(q, k, v, *, causal=False, scale=None, ..., impl="auto")`` on
            ``[B, H, N, D]`` tensors, or ``None`` for a mechanism that only exists as a layer.
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
        impl_devices: where each fast path runs, for the impls that do not run everywhere, e.g.
            ``{"triton": ("cuda", "triton-interpreter")}`` (names from :data:`DEVICES`).
        causal_only_impls: fast paths that compute causal self-attention only (the op refuses other calls).
        model_options: ``f(seq_len) -> options`` a model of that sequence length passes when it builds
            the mechanism (a window of a quarter of the length, an odd kernel, a layer's fixed length);
            ``None``: the defaults suffice.
        bench_options: ``f(BenchShape) -> options`` the speed benchmark passes to the op at that shape
            (tensors such as biases in the benchmark's device and dtype); ``None``: the defaults.
        check: sizes and tolerances for the conformance suite (tests only).
        state_size: optional ``f(heads, head_dim, value_dim) -> int``, floats of recurrent state
            per sequence (benchmarks plot accuracy against it).
        role: how the layer fits a model. "mixer": self-attention ``x [B, N, dim] -> [B, N, dim]``,
            built as ``layer(dim, heads, *, causal=..., **options)``, usable in every model;
            "cross": needs a second input; "pooling": ``[B, N, dim] -> [B, n, dim]``;
            "probe": a read-out head. Models only take "mixer" mechanisms.

    Read from the op's signature (the layer's for layer-only records) when the record is made, never
    written by hand:
        defaults: every option with a default, ``{name: default}``.
        required_options: the options without a default (a model or benchmark must pass them).
        impls: the fast paths the op accepts as ``impl=`` (besides "auto" and "reference"), from the
            ``Literal[...]`` annotation of its ``impl`` parameter.
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
    supports_cross: bool = False
    supports_gqa: bool = False
    supports_value_dim: bool = True
    differentiable: bool = True
    impl_devices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    causal_only_impls: tuple[str, ...] = ()
    model_options: Callable[[int], Mapping[str, Any]] | None = None
    bench_options: Callable[[BenchShape], Mapping[str, Any]] | None = None
    check: CheckConfig = field(default_factory=CheckConfig)
    state_size: Callable[[int, int, int], int] | None = None
    role: str = "mixer"
    defaults: Mapping[str, Any] = field(init=False)
    required_options: tuple[str, ...] = field(init=False)
    impls: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not (self.supports_causal or self.supports_bidirectional):
            raise ValueError(f"mechanism {self.name!r} must support causal or bidirectional attention")
        if self.role not in ROLES:
            raise ValueError(f"mechanism {self.name!r}: role={self.role!r} is not one of {ROLES}")
        if self.op is None and self.layer is None:
            raise ValueError(f"mechanism {self.name!r} needs an op or a layer")
        target = _signature_target(self.op, self.layer)
        options = _options(target, is_layer=self.op is None)
        object.__setattr__(self, "defaults", _frozen({p.name: p.default for p in options if p.default is not p.empty}))
        object.__setattr__(self, "required_options", tuple(p.name for p in options if p.default is p.empty))
        impls = _impl_names(self.name, target)
        object.__setattr__(self, "impls", impls)
        devices = {impl: tuple(d) for impl, d in self.impl_devices.items()}
        for impl, where in devices.items():
            if impl not in impls:
                raise ValueError(f"mechanism {self.name!r}: impl_devices names {impl!r}, which is not one of the "
                                 f"op's impls {impls}")
            unknown = [d for d in where if d not in DEVICES]
            if unknown or not where:
                raise ValueError(f"mechanism {self.name!r}: impl_devices[{impl!r}]={where!r}; devices are "
                                 f"{', '.join(DEVICES)}")
        object.__setattr__(self, "impl_devices", _frozen(devices))
        stray = [impl for impl in self.causal_only_impls if impl not in impls]
        if stray:
            raise ValueError(f"mechanism {self.name!r}: causal_only_impls names {stray}, not among the impls {impls}")

    def impl_runs_on(self, impl: str, device: str) -> bool:
        """Whether ``impl`` runs on ``device`` (one of :data:`DEVICES`); "auto"/"reference" run everywhere."""
        if device not in DEVICES:
            raise ValueError(f"device={device!r} is not one of {', '.join(DEVICES)}")
        where = self.impl_devices.get(impl)
        return where is None or device in where

    def impls_on(self, device: str) -> tuple[str, ...]:
        """The fast paths that run on ``device`` (one of :data:`DEVICES`)."""
        return tuple(impl for impl in self.impls if self.impl_runs_on(impl, device))

    def options_for_model(self, seq_len: int | None) -> dict[str, Any]:
        """The options a model of sequence length ``seq_len`` passes (see ``model_options``)."""
        if self.model_options is None:
            return {}
        if seq_len is None:
            raise ValueError(f"mechanism {self.name!r} needs the model's sequence length to choose its options; "
                             f"pass seq_len=")
        return dict(self.model_options(seq_len))

    def options_for_bench(self, shape: BenchShape) -> dict[str, Any]:
        """The options the speed benchmark passes to the op at ``shape`` (see ``bench_options``)."""
        return dict(self.bench_options(shape)) if self.bench_options is not None else {}

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
        # the type first (as attnlab.ops.validation.check_causal, which the registry cannot import):
        # causal="yes" is a TypeError, not a truthy request for a causal form
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool (True or False), got causal={causal!r} ({type(causal).__name__})")
        if causal and not self.supports_causal:
            raise NotImplementedError(f"mechanism {self.name!r} defines no causal form ({self.paper})")
        if not causal and not self.supports_bidirectional:
            raise NotImplementedError(
                f"mechanism {self.name!r} is causal only ({self.paper}); pass causal=True"
            )
        return causal


_REGISTRY: dict[str, Mechanism] = {}
_populated = False  # whether the modules that register the mechanisms have been imported


def _ensure_populated() -> None:
    """Import the ops and layers (which register the mechanisms) at the first lookup.

    ``import attnlab`` stays light (no ops, no torch) so that the CLI's parser builds fast; the
    package's ``_register_mechanisms`` does the imports. It is reached through ``sys.modules`` (the
    package is always imported before this module) rather than imported here: the ops import this
    module, and the registry must not import them back.
    """
    global _populated
    if _populated:
        return
    _populated = True  # set first: a lookup made while the ops import does not recurse
    try:
        sys.modules["attnlab"]._register_mechanisms()
    except BaseException:
        _populated = False
        raise


def register(mechanism: Mechanism) -> Mechanism:
    """Add ``mechanism`` to the registry; a name can be registered once."""
    if mechanism.name in _REGISTRY and _REGISTRY[mechanism.name] is not mechanism:
        raise ValueError(f"a mechanism named {mechanism.name!r} is already registered")
    _REGISTRY[mechanism.name] = mechanism
    return mechanism


def mechanisms() -> list[Mechanism]:
    """All registered mechanisms, sorted by family then name."""
    _ensure_populated()
    return sorted(_REGISTRY.values(), key=lambda m: (m.family, m.name))


def get(name: str) -> Mechanism:
    """The mechanism called ``name``; an unknown name raises ``KeyError`` with the closest names."""
    if not isinstance(name, str):
        raise TypeError(f"mechanism name must be a str, got {type(name).__name__}")
    _ensure_populated()
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

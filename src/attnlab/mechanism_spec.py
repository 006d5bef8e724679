"""A mechanism with options, as the command line names it: ``linear:feature_map=taylor:feature_dim=16``.

The name before the first colon is a registered mechanism; each ``:key=value`` after it is an option.
Values are read as ``true``/``false`` (bool), ``none``, an integer, a float, else a string.
:func:`parse_spec` reads the syntax alone (``attnlab eval`` then checks the options against what its
Hugging Face attention function takes); :func:`model_spec` also checks that a model can pass the options
to every mixer it builds (an option of the op, of :class:`attnlab.nn.Attention` around a functional op,
or of the mechanism's own layer) and sorts them by key, so that the quality benchmark has one name
and one result key per configuration however it was typed.

Based's linear part (Arora et al., "Simple linear attention language models balance the
recall-throughput tradeoff", arXiv 2402.18668) is ``linear:feature_map=taylor:feature_dim=16``; a
32-token window is ``sliding_window:window=32``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["MechanismSpec", "parse_spec", "model_spec", "canonical"]

# what the model sets itself, and the ops' recurrent-state interface, which a trained model does not use
_NOT_MODEL_OPTIONS = frozenset({"self", "dim", "heads", "mechanism", "causal", "context_parallel_group",
                                "context_parallel_layout", "initial_state", "return_state"})


@dataclass(frozen=True)
class MechanismSpec:
    """A registered mechanism ``name`` and its ``options`` (kept in the order given)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def label(self) -> str:
        """``name:key=value:...`` in the options' order (what tables and records show)."""
        return self.name + "".join(f":{key}={_format(value)}" for key, value in self.options.items())

    def __str__(self) -> str:
        return self.label


def _format(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> MechanismSpec:
    """``"hip:k_budget=256:window=64"`` -> ``MechanismSpec("hip", {"k_budget": 256, "window": 64})``, the
    syntax alone (the name is not looked up). ``ValueError`` naming the spec and the fix for an empty
    name, an option without ``=`` or a repeated option."""
    name, *parts = [p.strip() for p in text.strip().split(":")]
    if not name:
        raise ValueError(f"{text!r} names no mechanism: write NAME or NAME:key=value, e.g. sliding_window:window=32")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"{text!r}: option {part!r} is not key=value; write it as "
                             f"{name}:{key or 'key'}={value or 'VALUE'}")
        if key in options:
            raise ValueError(f"{text!r} gives option {key!r} twice; give each option once")
        options[key] = _value(value)
    return MechanismSpec(name, options)


def _model_options(name: str) -> set[str]:
    """The options a model may pass when it builds ``name``'s mixer: the op's and those of
    :class:`attnlab.nn.Attention` around it, or the mechanism's own layer's; empty when the op or
    layer takes any keyword (the model build then checks)."""
    import attnlab
    from attnlab.nn.attention import Attention

    record = attnlab.get(name)
    accepted = set(record.defaults) | set(record.required_options)
    if record.layer is None:
        accepted |= {p.name for p in inspect.signature(Attention.__init__).parameters.values()
                     if p.kind is p.KEYWORD_ONLY}
    parameters = inspect.signature(record.layer or record.op).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return set()
    return accepted - _NOT_MODEL_OPTIONS


def model_spec(text: str) -> MechanismSpec:
    """:func:`parse_spec`, then checked for a model: ``KeyError`` (with the closest names) for an unknown
    mechanism, ``ValueError`` listing the options it takes for one it does not. Options sorted by key."""
    import attnlab

    spec = parse_spec(text)
    attnlab.get(spec.name)
    accepted = _model_options(spec.name)
    unknown = sorted(k for k in spec.options if accepted and k not in accepted)
    if unknown:
        raise ValueError(f"{text!r}: mechanism {spec.name!r} takes no option {', '.join(map(repr, unknown))} "
                         f"(its options: {', '.join(sorted(accepted))})")
    return MechanismSpec(spec.name, dict(sorted(spec.options.items())))


def canonical(text: str) -> str:
    """The one name of a model spec: its mechanism and its options sorted by key (:func:`model_spec`'s errors)."""
    return model_spec(text).label

"""One spec syntax for every pattern: ``"name:p1:p2..."``, parsed from one registry.

A pattern file registers its class under a spec name with the parameters the
spec gives, in order::

    @register("strided", "stride")
    @dataclass(frozen=True)
    class Strided(Pattern): ...

Then ``parse("strided:128")`` is ``Strided(128)`` everywhere: the model config
(``model.pattern = "fixed:128:16"``), the command line, the benchmarks and the
pictures. Trailing parameters with a default in the class may be left out;
``true``/``false`` are booleans. An unknown name or a bad parameter is one
ValueError that lists what exists.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from .base import Pattern

_REGISTRY: dict[str, tuple[type, tuple[str, ...]]] = {}
_INSTANCES: dict[str, Pattern] = {}  # named patterns that are objects, not parameters (Custom)


def register(name: str, *params: str) -> Callable[[type], type]:
    """Class decorator: ``parse("name:v1:v2")`` builds ``cls(v1, v2)`` (``params`` name the values)."""

    def add(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"pattern name {name!r} is already registered by {_REGISTRY[name][0].__name__}")
        _REGISTRY[name] = (cls, params)
        cls.spec_name = name
        return cls

    return add


def register_instance(name: str, pattern: Pattern) -> None:
    """``parse(name)`` returns ``pattern`` (a Custom pattern registers itself so); a later pattern of
    the same name replaces it."""
    if not isinstance(name, str) or not name or ":" in name or name in _REGISTRY:
        raise ValueError(f"a pattern name is a non-empty string without ':' that is not a built-in spec, got {name!r}")
    _INSTANCES[name] = pattern


def names() -> list[str]:
    return sorted([*_REGISTRY, *_INSTANCES])


def usage() -> str:
    """Every registered spec, e.g. ``fixed:stride:c[:distinct_heads]``."""
    out = []
    for name in sorted(_REGISTRY):
        cls, params = _REGISTRY[name]
        defaults = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        out.append(":".join([name, *(f"[{p}]" if p in defaults else p for p in params)]))
    return ", ".join(out + sorted(_INSTANCES))


def _value(text: str) -> int | bool:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        raise ValueError(f"pattern parameters are integers or true/false, got {text!r}") from None


def parse(spec: str) -> Pattern:
    """``"fixed:128:16"`` -> ``Fixed(128, 16)``; a ValueError listing the registered specs otherwise."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a pattern spec is a string such as 'strided:128', got {spec!r}; known: {usage()}")
    if spec.strip() in _INSTANCES:
        return _INSTANCES[spec.strip()]
    name, *args = spec.strip().split(":")
    if name not in _REGISTRY:
        raise ValueError(f"unknown pattern {name!r} in {spec!r}; known: {usage()} (a pattern of your own registers "
                         "when its module is imported: sparse-transformer --import FILE on the command line)")
    cls, params = _REGISTRY[name]
    required = [p for p in params if next(f for f in dataclasses.fields(cls) if f.name == p).default
                is dataclasses.MISSING]
    if not len(required) <= len(args) <= len(params):
        raise ValueError(f"{spec!r}: {name} takes {':'.join(params) or 'no parameters'} "
                         f"({len(required)} to {len(params)} values), got {len(args)}")
    try:
        return cls(**{p: _value(a) for p, a in zip(params, args)})
    except ValueError as e:
        raise ValueError(f"{spec!r}: {e}") from None


def has_spec(pattern: Pattern) -> bool:
    """Whether ``parse(spec(pattern)) == pattern``: a named instance, or a registered class whose spec
    parameters are integers and booleans."""
    if any(p is pattern for p in _INSTANCES.values()):
        return True
    for cls, params in _REGISTRY.values():
        if type(pattern) is cls:
            return all(isinstance(getattr(pattern, p), int) for p in params)
    return False


def spec(pattern: Pattern) -> str:
    """The spec that ``parse`` turns back into ``pattern`` (registered classes and named instances)."""
    for name, p in _INSTANCES.items():
        if p is pattern:
            return name
    cls = type(pattern)
    if cls not in {c for c, _ in _REGISTRY.values()}:
        raise ValueError(f"{cls.__name__} is not registered")
    name, (_, params) = next((n, v) for n, v in _REGISTRY.items() if v[0] is cls)
    values = [getattr(pattern, p) for p in params]
    return ":".join([name, *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)])

"""One registry of quantization mode names: the single source of truth for every plugin family.

A scheme is added by one module that calls :func:`register_mode` at import time; nothing else in the
package needs to know about it (the pattern of torchao's ``quantize_(model, config)`` registry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from lightning.fabric.plugins import Precision


@dataclass(frozen=True)
class ModeSpec:
    """What a mode name stands for."""

    name: str
    family: str
    """Which plugin family owns the mode, e.g. ``"bitsandbytes"``."""
    factory: Callable[..., Precision]
    """Called as ``factory(name, **kwargs)`` to build the Fabric plugin."""
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    """Scheme parameters the family's layers read (quant type, double quantization, ...)."""


_REGISTRY: dict[str, ModeSpec] = {}


def register_mode(
    name: str,
    factory: Callable[..., Precision],
    *,
    family: str,
    description: str,
    options: Mapping[str, Any] | None = None,
) -> ModeSpec:
    if name in _REGISTRY:
        raise ValueError(f"Quantization mode {name!r} is already registered by family {_REGISTRY[name].family!r}")
    spec = ModeSpec(name, family, factory, description, MappingProxyType(dict(options or {})))
    _REGISTRY[name] = spec
    return spec


def available_modes(family: str | None = None) -> list[str]:
    """Names of the registered modes, optionally only those of one family, in registration order."""
    return [name for name, spec in _REGISTRY.items() if family is None or spec.family == family]


def mode_spec(name: str, family: str | None = None) -> ModeSpec:
    """Look a mode up; an unknown name raises ``ValueError`` listing the valid ones."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None or (family is not None and spec.family != family):
        what = f"{family} mode" if family else "quantization mode"
        raise ValueError(f"Unknown {what} {name!r}. Valid choices: {', '.join(available_modes(family))}")
    return spec


def precision_plugin(name: str, **kwargs: Any) -> Precision:
    """Build the Fabric precision plugin registered under ``name``, e.g. ``precision_plugin("nf4-dq")``."""
    return mode_spec(name).factory(name, **kwargs)

"""One registry of quantization mode names: the single source of truth for every family.

A mode maps to its family's library function (``quantize(model, mode, **options)``, what
:func:`fabric_quant.quantize_` calls), to its scheme parameters, and to the precision plugin that applies the same
function inside Lightning (named as ``"module:name"`` and imported only when a plugin is asked for, so the library
never imports the plugin layer). A scheme is added by one module that calls :func:`register_mode` at import time
(the pattern of torchao's ``quantize_(model, config)`` registry).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch


@dataclass(frozen=True)
class ModeSpec:
    """What a mode name stands for."""

    name: str
    family: str
    """Which family owns the mode, e.g. ``"bitsandbytes"``."""
    quantize: Callable[..., torch.nn.Module]
    """The library function: ``quantize(model, name, **options)`` transforms ``model`` in place and returns it."""
    plugin: str
    """The Lightning precision plugin's class or factory, as ``"module:name"``; called as ``f(mode, **options)``."""
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    """Scheme parameters the family reads (quant type, double quantization, bits, ...)."""

    def plugin_factory(self) -> Callable[..., Any]:
        module, _, attr = self.plugin.partition(":")
        return getattr(importlib.import_module(module), attr)


_REGISTRY: dict[str, ModeSpec] = {}


def register_mode(
    name: str,
    *,
    family: str,
    quantize: Callable[..., torch.nn.Module],
    plugin: str,
    description: str,
    options: Mapping[str, Any] | None = None,
) -> ModeSpec:
    if name in _REGISTRY:
        raise ValueError(f"Quantization mode {name!r} is already registered by family {_REGISTRY[name].family!r}")
    if ":" not in plugin:
        raise ValueError(f"plugin={plugin!r} must name the plugin class or factory as 'module:name'")
    spec = ModeSpec(name, family, quantize, plugin, description, MappingProxyType(dict(options or {})))
    _REGISTRY[name] = spec
    return spec


def unregister_mode(name: str) -> None:
    """Remove a mode (e.g. one a test or an experiment registered)."""
    mode_spec(name)
    del _REGISTRY[name]


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


def precision_plugin(name: str, **kwargs: Any):
    """The precision plugin registered under ``name``, e.g. ``precision_plugin("nf4-dq")``: one object that
    ``lightning.fabric.Fabric(plugins=...)`` and ``lightning.pytorch.Trainer(plugins=...)`` both accept."""
    spec = mode_spec(name)
    return spec.plugin_factory()(name, **kwargs)

"""Module surgery shared by the families: find, validate and replace layers by name; unwrap Fabric's wrapper."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch


def check_finite(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Refuse to quantize a layer whose weight holds NaN or inf: one such value spoils its whole block (NF4/FP4:
    64 weights; nf4-dq: the whole layer through the shared double-quantized scales) or row (int8)."""
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta" and weight.is_floating_point():
            bad = int((~torch.isfinite(weight)).sum())
            if bad:
                raise ValueError(f"{name}.weight holds {bad} non-finite values (NaN/inf): refusing to quantize it")


def ignore_set(ignore_modules: Iterable[str] | None) -> frozenset[str]:
    """``ignore_modules`` as a set of module names or dotted prefixes (``"encoder.layer.0"``); a bare string (a
    common slip for ``{"lm_head"}``) and an empty name (it would match nothing, or everything) are refused."""
    if isinstance(ignore_modules, str):
        raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore_modules!r}")
    ignore = frozenset(ignore_modules or ())
    bad = sorted(repr(p) for p in ignore if not isinstance(p, str) or not p.strip())
    if bad:
        raise ValueError(f"ignore_modules entries must be module names such as 'lm_head' or 'encoder.0', got {bad}")
    return ignore


def check_ignore_modules(module: torch.nn.Module, ignore_modules: Iterable[str] | None) -> frozenset[str]:
    """Validate ``ignore_modules`` against the module's names: each entry matches a module's whole dotted name or a
    dotted prefix of it (``"encoder"`` covers ``encoder.layer.0.dense``); an entry matching nothing is an error."""
    ignore = ignore_set(ignore_modules)
    # every name, a shared submodule's second name included (named_modules() would list it under its first only)
    names = [name for name, _ in module.named_modules(remove_duplicate=False) if name]
    unmatched = sorted(p for p in ignore if not any(_matches(name, p) for name in names))
    if unmatched:
        top = sorted({name.split(".")[0] for name in names})
        raise ValueError(
            f"ignore_modules={unmatched} match no submodule of {type(module).__name__}."
            f" Prefixes are matched against module names such as {top[:10]}"
        )
    return ignore


def _matches(name: str, prefix: str) -> bool:
    # on a dotted-name boundary: "1" keeps layer 1 of a Sequential in float, not layers 10 and 11 too
    return name == prefix or name.startswith(prefix + ".")


def is_ignored(name: str, ignore_modules: Iterable[str]) -> bool:
    return any(_matches(name, prefix) for prefix in ignore_modules)


def replace_modules(
    module: torch.nn.Module,
    select: Callable[[str, torch.nn.Module], bool],
    build: Callable[[str, torch.nn.Module], torch.nn.Module],
) -> list[str]:
    """Replace every submodule ``select`` picks by ``build(name, child)``; returns the replaced names.

    A submodule registered under several names (one Linear in two ``ModuleDict`` entries, or kept as an attribute
    too) is one layer: it is built once and the same replacement is set under every name, so it stays shared and
    is quantized once. ``named_modules()`` lists such a module under its first name only, which left the other
    names holding the float original (a second, unquantized copy used by part of the forward). It is replaced
    only when ``select`` picks it under every name (an ignored name keeps it float everywhere).

    Selection runs over the whole tree first, and every target's weight must be finite, so a failure leaves the
    module untouched.
    """
    names: dict[int, list[str]] = {}
    children: dict[int, torch.nn.Module] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(child), []).append(name)
            children[id(child)] = child
    targets = [(names[key], child) for key, child in children.items()
               if all(select(name, child) for name in names[key])]  # fmt: skip
    check_finite(module, [aliases[0] for aliases, _ in targets])
    for aliases, child in targets:
        new = build(aliases[0], child)
        for name in aliases:
            set_module(module, name, new)
    return [name for aliases, _ in targets for name in aliases]


def set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` under ``root`` at the dotted ``name`` (an attribute, a ``ModuleDict`` key, a ``Sequential``
    index): the one place layers are swapped by name, whichever walk chose them."""
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, module)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside Fabric's wrapper (``fabric.setup(model)`` returns one, compiled or not): its ``.module``,
    whose parameter and state-dict names are the model's own. Anything else is returned as it is: a peft or a
    compiled model keeps its names (``base_model.model.``, ``_orig_mod.``), which its checkpoints record."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile around the wrapper
    return inner.module if _fabric_wrapped(inner) else model


def _fabric_wrapped(model: torch.nn.Module) -> bool:
    # A wrapper exists only once Lightning is imported: looked up, never imported (the library needs no Lightning).
    for name in ("lightning.fabric.wrappers", "lightning_fabric.wrappers"):
        wrappers = sys.modules.get(name)
        if wrappers is not None and wrappers.is_wrapped(model):
            return True
    return False


def cast_float_rest(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer to ``dtype``, except the tensors a quantized layer stores its weight
    in (``storage_keys``: packed data must not be cast, and int8 scales stay fp32: a bf16 scale would shift each
    output channel by up to 0.4 %). Layers with an ``out_dtype`` (int8 Embedding lookups) emit ``dtype``."""
    for module in model.modules():
        if hasattr(module, "out_dtype"):
            module.out_dtype = dtype
        # non-persistent buffers are tables a model computes for itself (rotary frequencies, in fp32 on purpose)
        keep = set(getattr(module, "storage_keys", ())) | module._non_persistent_buffers_set
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype and name not in keep:
                tensor.data = tensor.data.to(dtype)


def quantized_modes(model: torch.nn.Module) -> set[str]:
    """The ``fq_mode`` of every quantized layer in ``model`` (empty for a float model)."""
    from fabric_quant.nn.base import quantized_layers

    return {layer.fq_mode for _, layer in quantized_layers(model)}


def refuse_requantization(model: torch.nn.Module, mode: str, allowed: Iterable[str] = ()) -> bool:
    """True when ``model`` already holds layers of ``allowed`` modes only (the caller then leaves it as it is, e.g.
    QLoRA's quantize-then-wrap-then-setup); a model quantized in any other mode is an error: quantizing quantized
    weights again would compound the error or silently keep the old mode."""
    found = quantized_modes(model)
    if not found:
        return False
    if found <= set(allowed):
        return True
    raise ValueError(
        f"{type(model).__name__} is already quantized ({', '.join(sorted(found))}); mode {mode!r} cannot quantize"
        " it again. Start from the float model (or its dequantized weights: fabric_quant.dequantized_state_dict)."
    )

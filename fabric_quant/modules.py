"""Module surgery shared by the plugin families: find, validate and replace layers by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def ignore_set(ignore_modules: Iterable[str] | None) -> frozenset[str]:
    """``ignore_modules`` as a set of name prefixes; a bare string (a common slip for ``{"lm_head"}``) is refused."""
    if isinstance(ignore_modules, str):
        raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore_modules!r}")
    return frozenset(ignore_modules or ())


def check_ignore_modules(module: torch.nn.Module, ignore_modules: Iterable[str] | None) -> frozenset[str]:
    """Validate ``ignore_modules`` prefixes against the module's names; a prefix matching nothing is an error."""
    ignore = ignore_set(ignore_modules)
    names = [name for name, _ in module.named_modules() if name]
    unmatched = sorted(p for p in ignore if not any(_matches(name, p) for name in names))
    if unmatched:
        top = sorted({name.split(".")[0] for name in names})
        raise ValueError(
            f"ignore_modules={unmatched} match no submodule of {type(module).__name__}."
            f" Prefixes are matched against module names such as {top[:10]}"
        )
    return ignore


def _matches(name: str, prefix: str) -> bool:
    return name.startswith(prefix)


def is_ignored(name: str, ignore_modules: Iterable[str]) -> bool:
    return any(_matches(name, prefix) for prefix in ignore_modules)


def replace_modules(
    module: torch.nn.Module,
    select: Callable[[str, torch.nn.Module], bool],
    build: Callable[[str, torch.nn.Module], torch.nn.Module],
) -> list[str]:
    """Replace every submodule ``select`` picks by ``build(name, child)``; returns the replaced names.

    Selection runs over the whole tree first, so a failure in ``select`` leaves the module untouched.
    """
    targets = [(name, child) for name, child in module.named_modules() if name and select(name, child)]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, build(name, child))
    return [name for name, _ in targets]


def cast_float_rest(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every float parameter and buffer to ``dtype``, except the tensors a quantized layer stores its weight
    in (``storage_keys``: packed data must not be cast, and int8 scales stay fp32: a bf16 scale would shift each
    output channel by up to 0.4 %). Layers with an ``out_dtype`` (int8 Embedding lookups) emit ``dtype``."""
    for module in model.modules():
        if hasattr(module, "out_dtype"):
            module.out_dtype = dtype
        keep = set(getattr(module, "storage_keys", ()))
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype and name not in keep:
                tensor.data = tensor.data.to(dtype)

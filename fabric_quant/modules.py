"""Module surgery shared by the plugin families: find, validate and replace layers by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def check_ignore_modules(module: torch.nn.Module, ignore_modules: Iterable[str]) -> set[str]:
    """Validate ``ignore_modules`` prefixes against the module's names; a prefix matching nothing is an error."""
    ignore = set(ignore_modules)
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

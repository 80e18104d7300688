"""litgpt's own scripts with the package's bitsandbytes plugin: every bnb mode, on CPU and CUDA.

litgpt builds Lightning's ``BitsandbytesPrecision(quantize[4:], dtype)`` in each script that takes ``--quantize``,
and Lightning refuses that plugin off CUDA ("Bitsandbytes is only supported on CUDA GPUs"). :func:`enable`:

- binds the name ``BitsandbytesPrecision`` in litgpt's script modules to :class:`fabric_quant.BnbPrecision` (a
  class: litgpt's later ``isinstance(fabric.strategy.precision, BitsandbytesPrecision)`` checks, which pick the
  bitsandbytes optimizer and embedding, then match it; Lightning's connector does not refuse it on CPU);
- widens the ``quantize`` choices of the scripts that take an int8 flavour to every bitsandbytes mode (litgpt's
  finetune scripts list only ``bnb.int8-training``, its generate/chat scripts only ``bnb.int8``); the sharded
  generate scripts (``generate_sequentially``, ``generate_tp``: CUDA, several GPUs) keep their 4-bit choices;
- turns off litgpt's "LitGPT only supports bitsandbytes v0.42.0" warning, which is about Lightning's plugin.

``disable()`` (or leaving :func:`enabled`) puts litgpt's own values back. ``python -m fabric_quant.litgpt ...``
runs litgpt's CLI with :func:`enable` applied. litgpt is an optional dependency (its pins are older than this
project's: install it with ``pip install --no-deps litgpt==0.5.13``; docs/lightning.md).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

# (module, entry function whose `quantize` choices are widened, or None to keep litgpt's)
_SCRIPTS = (
    ("litgpt.finetune.lora", "setup"),
    ("litgpt.finetune.lora_legacy", "setup"),
    ("litgpt.finetune.adapter", "setup"),
    ("litgpt.finetune.adapter_v2", "setup"),
    ("litgpt.generate.base", "main"),
    ("litgpt.generate.full", "main"),
    ("litgpt.generate.adapter", "main"),
    ("litgpt.generate.adapter_v2", "main"),
    ("litgpt.generate.speculative_decoding", "main"),
    ("litgpt.chat.base", "main"),
    ("litgpt.generate.sequentially", None),
    ("litgpt.generate.tp", None),
    ("litgpt.api", None),
)
_VERSION_WARNING = "_BITANDBYTES_AVAILABLE_NOT_EQUAL_0_42_0"
_MISSING = object()
_saved: list[tuple[Any, str, Any]] = []  # (owner, attribute or annotation key, litgpt's value) while enabled


def quantize_choices() -> tuple[str, ...]:
    """litgpt's spelling of every bitsandbytes mode: ``("bnb.int8", "bnb.int8-training", "bnb.nf4", ...)``."""
    import fabric_quant as fq

    return tuple(f"bnb.{mode}" for mode in fq.available_modes("bitsandbytes"))


def is_enabled() -> bool:
    return bool(_saved)


def enable() -> None:
    """Make litgpt's scripts build :class:`fabric_quant.BnbPrecision` and accept every bitsandbytes mode.
    Idempotent; raises ``ModuleNotFoundError`` (with the install command) when litgpt is not installed."""
    if _saved:
        return
    try:
        import litgpt  # noqa: F401
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "fabric_quant.integrations.litgpt needs litgpt: pip install --no-deps litgpt==0.5.13 requests"
            " (its pins are older than this project's; docs/lightning.md)"
        ) from error
    from fabric_quant.plugins.bnb import BnbPrecision

    choices = Literal[quantize_choices()] | None
    try:
        for module_name, entry in _SCRIPTS:
            module = importlib.import_module(module_name)
            _set(module, "BitsandbytesPrecision", BnbPrecision)
            if hasattr(module, _VERSION_WARNING):
                _set(module, _VERSION_WARNING, False)
            if entry is not None:
                annotations = getattr(module, entry).__annotations__
                _saved.append((annotations, "quantize", annotations.get("quantize", _MISSING)))
                annotations["quantize"] = choices
    except BaseException:
        disable()
        raise


def disable() -> None:
    """Put litgpt's own plugin class, choices and warning back (a no-op when not enabled)."""
    while _saved:
        owner, key, value = _saved.pop()
        if isinstance(owner, dict):
            if value is _MISSING:
                owner.pop(key, None)
            else:
                owner[key] = value
        else:
            setattr(owner, key, value)


@contextmanager
def enabled() -> Iterator[None]:
    """:func:`enable` for the duration of a ``with`` block; litgpt's own values are back afterwards, unless the
    integration was already enabled before the block (then it stays enabled)."""
    already = is_enabled()
    enable()
    try:
        yield
    finally:
        if not already:
            disable()


def _set(owner: Any, name: str, value: Any) -> None:
    _saved.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)

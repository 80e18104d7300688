"""Dynamic post-training quantization: int8 weights now, int8 activations computed per call.

Linear -> the converted int8 Linear of the QAT package with dynamic activations (int8 per-channel weights,
symmetric per-token int8 activations, ``torch._int_mm``; oneDNN's AMX/VNNI GEMM under
:func:`fabric_quant.kernels.compile_model`). LSTM / GRU -> :class:`DynamicInt8RNN`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from fabric_quant.modules import check_ignore_modules, is_ignored, replace_modules
from fabric_quant.ptq.rnn import RNN_TYPES, DynamicInt8RNN
from fabric_quant.qat.convert import Int8Linear
from fabric_quant.qat.layers import QATConfig, QATLinear

LAYERS = ("linear", "lstm", "gru")
_TYPES = {"linear": (torch.nn.Linear,), "lstm": (torch.nn.LSTM,), "gru": (torch.nn.GRU,)}


def _dynamic_linear(linear: torch.nn.Linear, per_channel: bool) -> Int8Linear:
    return Int8Linear(QATLinear.from_float(linear, QATConfig(activations="dynamic", per_channel=per_channel)))


def quantize_dynamic(
    model: torch.nn.Module,
    layers: Iterable[str] = LAYERS,
    *,
    per_channel: bool = True,
    ignore_modules: Iterable[str] | None = None,
    inplace: bool = False,
) -> torch.nn.Module:
    """Dynamically quantize ``model``'s Linear (and LSTM / GRU) layers to int8; returns the model in eval mode.

    Args:
        layers: which layer kinds to quantize, from ``("linear", "lstm", "gru")``.
        per_channel: one weight scale per output row (default) or one per tensor.
        ignore_modules: module-name prefixes to keep in float (e.g. a classifier head).
        inplace: modify ``model`` instead of a deep copy.
    """
    layers = tuple(layers)
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
        raise ValueError(f"layers={list(layers)!r}: valid choices are any of {LAYERS}")
    if isinstance(ignore_modules, str):
        raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore_modules!r}")
    ignore = check_ignore_modules(model, ignore_modules or ())
    types = tuple(t for name in layers for t in _TYPES[name])
    if isinstance(model, types):  # a bare layer: nothing to replace it in
        raise TypeError(f"quantize_dynamic takes a model containing layers, got a bare {type(model).__name__}")

    def select(name: str, child: torch.nn.Module) -> bool:
        return type(child) in types and not is_ignored(name, ignore)

    targets = [name for name, child in model.named_modules() if name and select(name, child)]
    if not targets:
        raise TypeError(
            f"quantize_dynamic found no {'/'.join(layers)} layer to quantize in {type(model).__name__}"
            + (f" outside ignore_modules={sorted(ignore)}" if ignore else "")
        )
    model = model if inplace else copy.deepcopy(model)

    def build(name: str, child: torch.nn.Module) -> torch.nn.Module:
        return DynamicInt8RNN(child) if isinstance(child, RNN_TYPES) else _dynamic_linear(child, per_channel)

    replace_modules(model, select, build)
    return model.eval()

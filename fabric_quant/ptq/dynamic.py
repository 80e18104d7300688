"""Dynamic post-training quantization: int8 weights now, int8 activations computed per call.

Linear -> :class:`~fabric_quant.nn.Int8Linear` with dynamic activations (int8 per-channel weights, symmetric
per-token int8 activations; eager on x86 oneDNN's int8 GEMM on a weight packed once, else ``torch._int_mm``;
oneDNN's AMX/VNNI GEMM with the quantization fused under :func:`fabric_quant.kernels.compile_model`).
LSTM / GRU -> :class:`~fabric_quant.nn.DynamicInt8RNN`.
Embedding -> :class:`~fabric_quant.nn.Int8Embedding` (weight-only).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from fabric_quant.modules import cast_float_rest, check_ignore_modules, is_ignored, replace_modules
from fabric_quant.nn import RNN_TYPES, DynamicInt8RNN, Int8Config, Int8Embedding, Int8Linear
from fabric_quant.nn.int8_siblings import group_int8_siblings
from fabric_quant.options import parse_dtype

LAYERS = ("linear", "lstm", "gru", "embedding")
DTYPES = (torch.float32, torch.bfloat16)
_TYPES = {
    "linear": (torch.nn.Linear,),
    "lstm": (torch.nn.LSTM,),
    "gru": (torch.nn.GRU,),
    "embedding": (torch.nn.Embedding,),
}


def quantize_dynamic(
    model: torch.nn.Module,
    layers: Iterable[str] = LAYERS,
    *,
    per_channel: bool = True,
    ignore_modules: Iterable[str] | None = None,
    dtype: torch.dtype | str = torch.float32,
    inplace: bool = False,
) -> torch.nn.Module:
    """Dynamically quantize ``model``'s Linear (and LSTM / GRU) layers to int8; returns the model in eval mode.

    Args:
        layers: which layer kinds to quantize, from ``("linear", "lstm", "gru", "embedding")`` (all by default).
            Embedding tables become int8 rows with a scale each (weight-only: most of a small transformer's
            parameters sit in its word embedding).
        per_channel: one weight scale per output row (default) or one per tensor.
        ignore_modules: module-name prefixes to keep in float (e.g. a classifier head).
        dtype: float dtype of everything that stays float: the int8 GEMMs' outputs, norms, attention, biases and
            ignored layers. ``torch.bfloat16`` (or ``"bf16"``) halves that traffic and uses AMX-BF16 / AVX512-BF16
            where the CPU has them; weights are quantized from the fp32 originals and their scales stay fp32.
            Float inputs must then be bf16 (``PTQPrecision("ptq-dynamic-int8-bf16")`` casts them).
        inplace: modify ``model`` instead of a deep copy.
    """
    dtype = parse_dtype(dtype, what="dtype")
    if dtype not in DTYPES:
        raise ValueError(f"quantize_dynamic(dtype={dtype}): valid choices are {', '.join(map(str, DTYPES))}")
    layers = tuple(layers)
    unknown = [name for name in layers if name not in LAYERS]
    if unknown or not layers:
        raise ValueError(f"layers={list(layers)!r}: valid choices are any of {LAYERS}")
    ignore = check_ignore_modules(model, ignore_modules)
    types = tuple(t for name in layers for t in _TYPES[name])
    if isinstance(model, types):  # a bare layer: nothing to replace it in
        raise TypeError(f"quantize_dynamic takes a model containing layers, got a bare {type(model).__name__}")

    def select(name: str, child: torch.nn.Module) -> bool:
        if isinstance(child, torch.nn.Embedding) and (child.max_norm is not None or child.sparse):
            return False  # renormalising / sparse-gradient tables stay float
        return type(child) in types and not is_ignored(name, ignore)

    targets = [name for name, child in model.named_modules() if name and select(name, child)]
    if not targets:
        raise TypeError(
            f"quantize_dynamic found no {'/'.join(layers)} layer to quantize in {type(model).__name__}"
            + (f" outside ignore_modules={sorted(ignore)}" if ignore else "")
        )
    model = model if inplace else copy.deepcopy(model)

    def build(name: str, child: torch.nn.Module) -> torch.nn.Module:
        if isinstance(child, RNN_TYPES):
            return DynamicInt8RNN.from_float(child)
        if isinstance(child, torch.nn.Embedding):  # weight-only: a lookup gathers int8 rows and rescales just those
            return Int8Embedding.from_float(child, Int8Config(activations="none", per_channel=per_channel))
        return Int8Linear.from_float(child, Int8Config(activations="dynamic", per_channel=per_channel))

    replace_modules(model, select, build)
    group_int8_siblings(model)
    if dtype != torch.float32:
        cast_float_rest(model, dtype)
    return model.eval()


"""QAT -> real layers: every fake-quantized layer becomes its :mod:`fabric_quant.nn` int8 / packed int4 version,
built from its float tensors, its config, its learned (LSQ) scales and its calibrated activation range."""

from __future__ import annotations

import copy

import torch

from fabric_quant.kernels import select_backend
from fabric_quant.modules import replace_modules
from fabric_quant.nn.int8 import Int8Conv, Int8Embedding, Int8Linear, chain_int8_convs
from fabric_quant.nn.int8_siblings import group_int8_siblings
from fabric_quant.qat.layers import FakeQuantLayer, QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear


def _act_qparams(qat: FakeQuantLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Calibrated (static) activation scale and zero point of a QAT layer; an LSQ-learned scale wins."""
    if qat.qat.activations != "static":
        return None
    scale, zero_point = qat.act_observer.qparams()
    if getattr(qat, "act_scale", None) is not None:
        scale = qat.act_scale.detach()
    return scale, zero_point


def _learned(qat: FakeQuantLayer) -> dict:
    return {"weight_scale": getattr(qat, "weight_scale", None), "act_qparams": _act_qparams(qat)}


def convert_layer(qat: torch.nn.Module, backend: str = "reference") -> torch.nn.Module:
    """One QAT layer as its real int8 / int4 layer (``backend`` picks a Conv2d's kernel)."""
    config = qat.qat.int8_config()
    if isinstance(qat, QATLinear):
        return Int8Linear.from_float(qat, config, relu=bool(getattr(qat, "relu", False)), **_learned(qat))
    if isinstance(qat, QATEmbedding):
        return Int8Embedding.from_float(qat, config)
    weight, bias = qat.folded() if isinstance(qat, QATConvBn2d) else (qat.weight, qat.bias)
    relu = bool(getattr(qat, "relu", False))
    return Int8Conv.from_float(qat, config, weight=weight, bias=bias, relu=relu, backend=backend, **_learned(qat))


_QAT_TYPES = (QATLinear, QATConv1d, QATConv2d, QATEmbedding)


def convert(model: torch.nn.Module, inplace: bool = False, backend: str = "auto") -> torch.nn.Module:
    """The deployable model: every QAT layer replaced by its int8 (or packed int4) version, in eval mode; a copy
    unless ``inplace`` (as torch.ao's ``convert``: the fake-quant model stays usable).

    ``backend``: ``auto`` / ``x86`` / ``reference`` (see :mod:`fabric_quant.kernels`); it picks the convolution
    kernel. Linear layers run oneDNN's int8 GEMM in eager CPU mode (``nn/onednn_linear.py``) and ``torch._int_mm``
    elsewhere (the form inductor traces)."""
    backend = select_backend(backend)
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    replace_modules(model, lambda name, m: isinstance(m, _QAT_TYPES), lambda name, m: convert_layer(m, backend))
    chain_int8_convs(model)
    group_int8_siblings(model)
    return model

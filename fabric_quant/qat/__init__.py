"""Quantization-aware training: fake-quantized layers (what), the schedule and model preparation (how, where),
and the conversion to the real layers of :mod:`fabric_quant.nn`. Importing it registers the ``qat`` modes."""

from fabric_quant.qat.convert import convert, convert_layer
from fabric_quant.qat.layers import QATConfig, QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear
from fabric_quant.qat.prepare import (
    QATSchedule,
    apply_schedule,
    enable_fake_quant,
    freeze_bn,
    freeze_observers,
    prepare_qat,
    qat_config,
)

__all__ = [
    "QATConfig",
    "QATConv1d",
    "QATConv2d",
    "QATConvBn2d",
    "QATEmbedding",
    "QATLinear",
    "QATSchedule",
    "apply_schedule",
    "convert",
    "convert_layer",
    "enable_fake_quant",
    "freeze_bn",
    "freeze_observers",
    "prepare_qat",
    "qat_config",
]

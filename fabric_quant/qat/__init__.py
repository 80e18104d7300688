"""Quantization-aware training: fake-quantized layers and their Fabric plugin."""

from fabric_quant.qat.convert import Int8Conv, Int8Linear, convert
from fabric_quant.qat.layers import QATConfig, QATConv1d, QATConv2d, QATConvBn2d, QATLinear

__all__ = ["Int8Conv", "Int8Linear", "QATConfig", "QATConv1d", "QATConv2d", "QATConvBn2d", "QATLinear", "convert"]

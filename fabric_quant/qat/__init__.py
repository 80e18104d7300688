"""Quantization-aware training: fake-quantized layers and their Fabric plugin."""

from fabric_quant.qat.layers import QATConfig, QATConv1d, QATConv2d, QATConvBn2d, QATLinear

__all__ = ["QATConfig", "QATConv1d", "QATConv2d", "QATConvBn2d", "QATLinear"]

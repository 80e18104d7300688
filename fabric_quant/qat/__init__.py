"""Quantization-aware training: fake-quantized layers and their conversion to real low-bit layers."""

from fabric_quant.qat.convert import Int8Conv, Int8Embedding, Int8Linear, convert
from fabric_quant.qat.layers import QATConfig, QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear

__all__ = [
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "QATConfig",
    "QATConv1d",
    "QATConv2d",
    "QATConvBn2d",
    "QATEmbedding",
    "QATLinear",
    "convert",
]

"""Quantized layer implementations (numerics), kept apart from the Fabric plugin layer."""

from fabric_quant.layers.base import QuantizedLinear, quantized_layers

__all__ = ["QuantizedLinear", "quantized_layers"]

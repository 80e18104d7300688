"""Real quantized modules, one home for every family: bitsandbytes Linear (``fabric_quant.nn.bnb``, imports
bitsandbytes), int8 / packed int4 Linear, Conv and Embedding, and the dynamically quantized LSTM / GRU. Each is
built from float tensors plus a config (``from_float``) and implements :class:`QuantizedLinear`, the interface
footprint accounting, checkpoints and dequantized export talk to."""

from fabric_quant.nn.base import QuantizedLinear, Storage, quantized_layers
from fabric_quant.nn.int8 import Int8Config, Int8Conv, Int8Embedding, Int8Linear, pack_int4, unpack_int4
from fabric_quant.nn.rnn import RNN_TYPES, DynamicInt8RNN

__all__ = [
    "RNN_TYPES",
    "DynamicInt8RNN",
    "Int8Config",
    "Int8Conv",
    "Int8Embedding",
    "Int8Linear",
    "QuantizedLinear",
    "Storage",
    "pack_int4",
    "quantized_layers",
    "unpack_int4",
]

"""fabric-quant: quantization for Lightning Fabric that runs on CPU and CUDA."""

from fabric_quant._bnb import quiet_bitsandbytes_logs
from fabric_quant.checkpoint import dequantized_state_dict, load_quantized, save_dequantized, save_quantized
from fabric_quant.footprint import Footprint, footprint
from fabric_quant.plugins import BnbPrecision, PTQPrecision, QATPrecision
from fabric_quant.ptq import quantize_dynamic, quantize_static, recommend
from fabric_quant.registry import available_modes, mode_spec, precision_plugin, register_mode

__all__ = [
    "BnbPrecision",
    "Footprint",
    "PTQPrecision",
    "QATPrecision",
    "available_modes",
    "dequantized_state_dict",
    "footprint",
    "load_quantized",
    "mode_spec",
    "precision_plugin",
    "quantize_dynamic",
    "quantize_static",
    "recommend",
    "register_mode",
    "save_dequantized",
    "save_quantized",
]
__version__ = "0.1.0"

quiet_bitsandbytes_logs()

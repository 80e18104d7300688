"""fabric-quant: quantization for PyTorch and Lightning (Fabric and the Trainer) that runs on CPU and CUDA.

Layers, bottom up (docs/architecture.md): ``options`` / ``registry`` -> ``numerics`` (integer grids, fake
quantization, observers) -> ``nn`` (real quantized modules) -> model tools (``modules``, ``hf``, ``checkpoint``...)
-> the families' library functions (``bnb``, ``qat``, ``ptq``, ``woq``), which register their modes ->
``quantize_`` / ``convert`` / ``from_pretrained`` -> ``distributed``, ``demo``, ``finetune`` -> ``plugins`` (thin
Lightning adapters, imported only when a plugin is asked for) -> ``integrations`` (the plugins inside Lightning
clients such as litgpt).
"""

# first: _bnb installs its log filters on import, before anything below imports bitsandbytes (it logs then)
from fabric_quant import _bnb  # noqa: F401  # isort: skip
from fabric_quant import bnb as _bnb_family  # noqa: F401  (registers the bitsandbytes modes)
from fabric_quant import woq as _woq_family  # noqa: F401  (registers woq-int8 / woq-int4)
from fabric_quant.api import convert, quantize_
from fabric_quant.checkpoint import dequantized_state_dict, load_quantized, save_dequantized, save_quantized
from fabric_quant.finetune.export import export_woq
from fabric_quant.footprint import Footprint, footprint
from fabric_quant.loading import from_pretrained
from fabric_quant.ptq import quantize_dynamic, quantize_static, recommend
from fabric_quant.qat import apply_schedule
from fabric_quant.registry import available_modes, mode_spec, precision_plugin, register_mode, unregister_mode
from fabric_quant.woq.folder import load_woq

_PLUGINS = {
    "BnbPrecision": "fabric_quant.plugins.bnb",
    "QATPrecision": "fabric_quant.plugins.qat",
    "PTQPrecision": "fabric_quant.plugins.ptq",
    "WOQPrecision": "fabric_quant.plugins.woq",
}


def __getattr__(name: str):
    # The plugin classes load Lightning's plugin layer: imported on first use, never by the library itself.
    if name in _PLUGINS:
        import importlib

        return getattr(importlib.import_module(_PLUGINS[name]), name)
    raise AttributeError(f"module 'fabric_quant' has no attribute {name!r}")


__all__ = [
    "BnbPrecision",
    "Footprint",
    "PTQPrecision",
    "QATPrecision",
    "WOQPrecision",
    "apply_schedule",
    "available_modes",
    "convert",
    "dequantized_state_dict",
    "export_woq",
    "footprint",
    "from_pretrained",
    "load_quantized",
    "load_woq",
    "mode_spec",
    "precision_plugin",
    "quantize_",
    "quantize_dynamic",
    "quantize_static",
    "recommend",
    "register_mode",
    "save_dequantized",
    "save_quantized",
    "unregister_mode",
]
__version__ = "0.1.0"

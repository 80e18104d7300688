"""Post-training quantization on maintained kernels (no torch.ao.quantization): dynamic, static, and a measured
advisor that picks between them. Importing it registers the ``ptq`` modes."""

from fabric_quant.kernels import BACKENDS, compile_model, select_backend
from fabric_quant.ptq.dynamic import quantize_dynamic
from fabric_quant.ptq.modes import ptq_options, quantize_ptq
from fabric_quant.ptq.recommend import Candidate, Recommendation, recommend
from fabric_quant.ptq.static import quantize_static

__all__ = [
    "BACKENDS",
    "Candidate",
    "Recommendation",
    "compile_model",
    "ptq_options",
    "quantize_dynamic",
    "quantize_ptq",
    "quantize_static",
    "recommend",
    "select_backend",
]

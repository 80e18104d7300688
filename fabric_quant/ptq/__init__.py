"""Post-training quantization on maintained kernels (no torch.ao.quantization): dynamic, static, and a measured
advisor that picks between them."""

from fabric_quant.kernels import BACKENDS, compile_model, select_backend
from fabric_quant.ptq.dynamic import quantize_dynamic
from fabric_quant.ptq.recommend import Candidate, Recommendation, recommend
from fabric_quant.ptq.rnn import DynamicInt8RNN
from fabric_quant.ptq.static import call_model, quantize_static

__all__ = [
    "BACKENDS",
    "Candidate",
    "DynamicInt8RNN",
    "Recommendation",
    "call_model",
    "compile_model",
    "quantize_dynamic",
    "quantize_static",
    "recommend",
    "select_backend",
]

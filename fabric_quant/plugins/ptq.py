"""``PTQPrecision``: post-training int8 quantization applied by ``fabric.setup_module`` (inference)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.plugins import Precision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

from fabric_quant.dtypes import parse_dtype
from fabric_quant.kernels import select_backend
from fabric_quant.layers.base import QuantizedLinear
from fabric_quant.qat.layers import QATConfig
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "ptq"


class PTQPrecision(Precision):
    """Quantize a trained model when Fabric sets it up: ``ptq-dynamic-int8`` (no data needed; ``-bf16``: the float
    rest in bf16, float inputs cast to bf16 and outputs back to fp32) or ``ptq-static-int8`` (``calibration_data``
    required). See :func:`fabric_quant.ptq.quantize_dynamic` / ``quantize_static``."""

    def __init__(
        self,
        mode: str = "ptq-dynamic-int8",
        *,
        calibration_data: Iterable | None = None,
        observer: str = "minmax",
        per_channel: bool = True,
        backend: str = "auto",
        ignore_modules: Iterable[str] | None = None,
    ) -> None:
        self.mode = mode_spec(mode, family=FAMILY).name
        self.static = mode_spec(mode).options["static"]
        self.dtype = parse_dtype(mode_spec(mode).options.get("dtype", "float32"))
        if self.static and calibration_data is None:
            raise ValueError(f"PTQPrecision({mode!r}) needs calibration_data (batches of model inputs)")
        if not self.static and calibration_data is not None:
            raise ValueError(f"PTQPrecision({mode!r}) quantizes activations on the fly: calibration_data is unused")
        QATConfig(activations="static", observer=observer, per_channel=per_channel)  # the options' one check
        self.backend = select_backend(backend)
        self.calibration_data, self.observer, self.per_channel = calibration_data, observer, per_channel
        self.ignore_modules = ignore_modules

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from fabric_quant.ptq import quantize_dynamic, quantize_static

        if any(isinstance(m, QuantizedLinear) for m in module.modules()):
            return module  # already quantized (idempotent, like the other plugins)
        if self.static:
            return quantize_static(
                module, self.calibration_data, observer=self.observer, per_channel=self.per_channel,
                backend=self.backend, ignore_modules=self.ignore_modules, inplace=True,
            )  # fmt: skip
        # in place: Fabric's wrapper keeps a reference to the module it was given (``.module``)
        return quantize_dynamic(
            module, per_channel=self.per_channel, ignore_modules=self.ignore_modules, dtype=self.dtype, inplace=True
        )

    @override
    def convert_input(self, data: Any) -> Any:
        if self.dtype == torch.float32:
            return data
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=torch.Tensor, dst_type=self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        if self.dtype == torch.float32:
            return data
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=torch.Tensor, dst_type=torch.float32)

    def __repr__(self) -> str:
        return f"PTQPrecision(mode={self.mode!r}, backend={self.backend!r})"


register_mode("ptq-dynamic-int8", PTQPrecision, family=FAMILY, options={"static": False},
              description="PTQ: int8 weights, int8 activations per token on the fly (Linear, LSTM, GRU)")  # fmt: skip
register_mode("ptq-dynamic-int8-bf16", PTQPrecision, family=FAMILY, options={"static": False, "dtype": "bfloat16"},
              description="PTQ: as ptq-dynamic-int8, with what stays float (activations, norms) in bf16")  # fmt: skip
register_mode("ptq-static-int8", PTQPrecision, family=FAMILY, options={"static": True},
              description="PTQ: int8 weights and calibrated int8 activations (Linear, Conv; BN folded)")  # fmt: skip

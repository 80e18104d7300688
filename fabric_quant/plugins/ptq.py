"""``PTQPrecision``: post-training int8 quantization (:mod:`fabric_quant.ptq`) applied when Lightning sets the
model up (inference: ``fabric.setup_module``, ``trainer.validate/test/predict``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from typing_extensions import override

from fabric_quant.plugins.base import LightningPrecision, cast_floats
from fabric_quant.ptq.modes import ptq_options, quantize_ptq


class PTQPrecision(LightningPrecision):
    """``ptq-dynamic-int8`` (no data needed; ``-bf16``: float inputs cast to bf16 and outputs back to fp32) or
    ``ptq-static-int8`` (``calibration_data`` required). Options: see :func:`fabric_quant.ptq.modes.ptq_options`."""

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
        self.mode = mode
        self.kwargs = {"calibration_data": calibration_data, "observer": observer, "per_channel": per_channel,
                       "backend": backend, "ignore_modules": ignore_modules}  # fmt: skip
        resolved = ptq_options(mode, **self.kwargs)  # validated before Lightning sets anything up
        self.dtype, self.backend = resolved["dtype"], resolved["backend"]

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        # in place: Lightning keeps a reference to the module it was given
        return quantize_ptq(module, self.mode, **self.kwargs)

    @override
    def convert_input(self, data: Any) -> Any:
        return data if self.dtype == torch.float32 else cast_floats(data, self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return data if self.dtype == torch.float32 else cast_floats(data, torch.float32)

    def __repr__(self) -> str:
        return f"PTQPrecision(mode={self.mode!r}, backend={self.backend!r})"

"""``WOQPrecision``: the weight-only modes (:mod:`fabric_quant.woq`) applied when Lightning sets the model up
(inference: ``fabric.setup_module``, ``trainer.validate/test/predict``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from typing_extensions import override

from fabric_quant.plugins.base import LightningPrecision, cast_floats
from fabric_quant.woq import WOQConfig, quantize_woq, refuse_gptq


class WOQPrecision(LightningPrecision):
    """``woq-int8`` or ``woq-int4`` (options: see :class:`fabric_quant.woq.WOQConfig`). With ``dtype`` set, what
    stays float is cast to it and float inputs with it, and outputs come back in fp32."""

    def __init__(
        self,
        mode: str = "woq-int4",
        *,
        group_size: int | None = None,
        scale_search: str = "none",
        include_embeddings: bool = False,
        include_lm_head: bool = False,
        ignore_modules: Iterable[str] | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.mode = mode
        self.kwargs = {"group_size": group_size, "scale_search": scale_search,
                       "include_embeddings": include_embeddings, "include_lm_head": include_lm_head,
                       "ignore_modules": ignore_modules, "dtype": dtype}  # fmt: skip
        self.config = WOQConfig.create(mode, **self.kwargs)  # validated before Lightning sets anything up
        refuse_gptq(self.config, "WOQPrecision")
        self.dtype = self.config.dtype

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        # in place: Lightning keeps a reference to the module it was given
        return quantize_woq(module, self.mode, **self.kwargs)

    @override
    def convert_input(self, data: Any) -> Any:
        return data if self.dtype is None else cast_floats(data, self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return data if self.dtype is None else cast_floats(data, torch.float32)

    def __repr__(self) -> str:
        return f"WOQPrecision(mode={self.mode!r}, group_size={self.config.group_size}, dtype={self.dtype})"

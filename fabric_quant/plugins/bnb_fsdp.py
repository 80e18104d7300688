"""``BnbFSDPPrecision``: the bitsandbytes modes under Fabric's FSDP strategy (CUDA only: Fabric refuses FSDP on
CPU). FSDP accepts only `FSDPPrecision` plugins and flattens parameters of one dtype together, so the packed
4-bit weights are stored in the compute dtype (bitsandbytes' `quant_storage`) and FSDP shards them with the rest.
``fabric_quant.precision_plugin(mode, fsdp=True)`` builds it.
"""

from __future__ import annotations

import torch
from lightning.fabric.plugins.precision.fsdp import FSDPPrecision
from typing_extensions import override

from fabric_quant.bnb import BnbConfig, replace_linear_layers

_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "32-true": torch.float32}


class BnbFSDPPrecision(FSDPPrecision):
    def __init__(self, mode: str, precision: str = "bf16-true", ignore_modules=None) -> None:
        if precision not in _DTYPES:
            raise ValueError(
                f"Unsupported precision {precision!r} for FSDP + bitsandbytes. Valid choices: {list(_DTYPES)}"
            )
        super().__init__(precision=precision)
        dtype = _DTYPES[precision]
        self.mode = mode
        self.config = BnbConfig.create(mode, dtype=dtype, ignore_modules=ignore_modules, quant_storage=dtype)

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        # Not FSDPPrecision's `module.to(dtype)`: a dtype cast must not touch packed weights.
        return replace_linear_layers(module, self.config)

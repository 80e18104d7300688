"""``BnbPrecision``: the bitsandbytes modes (:mod:`fabric_quant.bnb`) as a Lightning precision plugin, on CPU and CUDA.

Same semantics as Lightning's ``BitsandbytesPrecision`` (compute dtype, ``ignore_modules`` prefixes, quantized
layers under ``fabric.init_module()``, quantize-on-load of float checkpoints) without its limits: it is not refused
on CPU, int8 does not demand fp16, quantized checkpoints reload bit-exactly, and the Trainer takes it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from lightning.fabric.plugins.precision.utils import _ClassReplacementContextManager, _DtypeContextManager
from typing_extensions import override

from fabric_quant.bnb import BnbConfig, replace_linear_layers
from fabric_quant.plugins.base import LightningPrecision, cast_floats


class BnbPrecision(LightningPrecision):
    """Quantize every ``torch.nn.Linear`` with bitsandbytes when Lightning sets the model up.

    Args: see :class:`fabric_quant.bnb.BnbConfig` (``mode``, ``dtype``, ``ignore_modules``, ``quant_storage``).
    """

    def __init__(
        self,
        mode: str,
        dtype: torch.dtype | str | None = None,
        ignore_modules: Iterable[str] | None = None,
        quant_storage: torch.dtype | str | None = None,
    ) -> None:
        self.config = BnbConfig.create(mode, dtype, ignore_modules, quant_storage)
        self.mode, self.dtype = self.config.mode, self.config.dtype
        self.ignore_modules, self.quant_storage = set(self.config.ignore_modules), self.config.quant_storage

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        # quantized when the strategy moves the module to its device (on CUDA: on the GPU, layer by layer)
        return replace_linear_layers(module, self.config)

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    @override
    def module_init_context(self) -> AbstractContextManager:
        if self.ignore_modules:
            # Layer names are unknown while constructors run, so an ignored layer could not be told apart.
            raise RuntimeError(
                f"BnbPrecision({self.mode!r}, ignore_modules={sorted(self.ignore_modules)}) cannot create quantized"
                " layers under `fabric.init_module()`: layer names are unknown while the model is constructed."
                " Build the model first (on the meta device to save memory) and call `fabric.setup_module`,"
                " or drop `ignore_modules`."
            )
        stack = ExitStack()
        stack.enter_context(self.tensor_init_context())
        stack.enter_context(_ClassReplacementContextManager({"torch.nn.Linear": self.config.layer_class()}))
        return stack

    @override
    def forward_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_floats(data, self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return cast_floats(data, torch.get_default_dtype())

    def __repr__(self) -> str:
        return (
            f"BnbPrecision(mode={self.mode!r}, dtype={self.dtype}, ignore_modules={sorted(self.ignore_modules)},"
            f" quant_storage={self.quant_storage})"
        )


def bnb_plugin(mode: str, *, fsdp: bool = False, **kwargs: Any):
    """The registry's plugin factory for the bitsandbytes modes: :class:`BnbPrecision`, or with ``fsdp=True`` the
    plugin Fabric's FSDP strategy accepts (:class:`~fabric_quant.plugins.bnb_fsdp.BnbFSDPPrecision`)."""
    if fsdp:
        from fabric_quant.plugins.bnb_fsdp import BnbFSDPPrecision

        return BnbFSDPPrecision(mode, **kwargs)
    return BnbPrecision(mode, **kwargs)

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

    The four attributes of those names are the plugin's state, as on Lightning's plugin: assigning
    ``precision.ignore_modules = {"head"}`` or ``precision.dtype = torch.bfloat16`` on a built plugin applies to
    the next conversion. They are validated here and again at each use (:attr:`config`).
    """

    def __init__(
        self,
        mode: str,
        dtype: torch.dtype | str | None = None,
        ignore_modules: Iterable[str] | None = None,
        quant_storage: torch.dtype | str | None = None,
    ) -> None:
        config = BnbConfig.create(mode, dtype, ignore_modules, quant_storage)
        self.mode, self.dtype = config.mode, config.dtype
        self.ignore_modules, self.quant_storage = set(config.ignore_modules), config.quant_storage

    @property
    def config(self) -> BnbConfig:
        """The options as the attributes hold them now, validated (an assigned bad value raises here, naming it)."""
        return BnbConfig.create(self.mode, self.dtype, self.ignore_modules, self.quant_storage)

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        # quantized when the strategy moves the module to its device (on CUDA: on the GPU, layer by layer)
        return replace_linear_layers(module, self.config)

    def _compute_dtype(self) -> torch.dtype:
        # per forward: parse only when the attribute was assigned something other than a torch.dtype ("bf16", None)
        return self.dtype if isinstance(self.dtype, torch.dtype) else self.config.dtype

    @override
    def tensor_init_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.config.dtype)

    @override
    def module_init_context(self) -> AbstractContextManager:
        config = self.config
        if config.ignore_modules:
            # Layer names are unknown while constructors run, so an ignored layer could not be told apart.
            raise RuntimeError(
                f"BnbPrecision({config.mode!r}, ignore_modules={sorted(config.ignore_modules)}): creating quantized"
                " layers under `fabric.init_module()` is not supported with ignore_modules: layer names are unknown"
                " while the model is constructed. Build the model first (on the meta device to save memory) and call"
                " `fabric.setup_module`, or drop `ignore_modules`."
            )
        stack = ExitStack()
        stack.enter_context(_DtypeContextManager(config.dtype))
        stack.enter_context(_ClassReplacementContextManager({"torch.nn.Linear": config.layer_class()}))
        return stack

    @override
    def forward_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self._compute_dtype())

    @override
    def convert_input(self, data: Any) -> Any:
        return cast_floats(data, self._compute_dtype())

    @override
    def convert_output(self, data: Any) -> Any:
        return cast_floats(data, torch.get_default_dtype())

    def __repr__(self) -> str:
        return (
            f"BnbPrecision(mode={self.mode!r}, dtype={self.dtype}, ignore_modules={sorted(self.ignore_modules)},"
            f" quant_storage={self.quant_storage})"
        )


def bnb_plugin(mode: str, *, fsdp: bool = False, **kwargs: Any) -> BnbPrecision:
    """The registry's plugin factory for the bitsandbytes modes: :class:`BnbPrecision`.

    ``fsdp=True`` (a plugin for Fabric's FSDP strategy, FSDP1) is refused: FSDP1 flattens a unit's parameters into
    one dtype, so packed 4-bit bytes would have to be stored as bf16 (``quant_storage``), where NaN bit patterns are
    rewritten and packed NF4 codes silently change (bitsandbytes #1945). ``fabric_quant.distributed.fsdp`` shards
    with FSDP2 and uint8 storage instead, and checks it."""
    if fsdp:
        raise ValueError(
            f"precision_plugin({mode!r}, fsdp=True): Fabric's FSDP strategy (FSDP1) needs the packed 4-bit weights"
            " stored as bf16, where NaN bit patterns are rewritten and packed codes corrupted (bitsandbytes #1945)."
            " Valid choices: fsdp=False (one device or DDP), or shard with FSDP2 and uint8 storage:"
            " fabric_quant.distributed.fsdp.shard_model / `recipes/qlora.py --strategy fsdp` (docs/fsdp.md)."
        )
    return BnbPrecision(mode, **kwargs)

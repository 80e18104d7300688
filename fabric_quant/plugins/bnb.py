"""``BnbPrecision``: bitsandbytes int8 / NF4 / FP4 quantization for Lightning Fabric on CPU and CUDA.

Same semantics as Lightning's ``BitsandbytesPrecision`` (compute dtype, ``ignore_modules`` prefixes,
quantized layers under ``fabric.init_module()``, quantize-on-load of float checkpoints) without its limits:
it is not refused on CPU, int8 does not demand fp16, and quantized checkpoints reload bit-exactly.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch
from lightning.fabric.plugins import Precision
from lightning.fabric.plugins.precision.utils import (
    _ClassReplacementContextManager,
    _convert_fp_tensor,
    _DtypeContextManager,
)
from lightning_utilities import apply_to_collection
from typing_extensions import override

from fabric_quant.dtypes import default_compute_dtype, parse_dtype
from fabric_quant.modules import check_ignore_modules, is_ignored, replace_modules
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "bitsandbytes"


class BnbPrecision(Precision):
    """Quantize every ``torch.nn.Linear`` with bitsandbytes.

    Args:
        mode: one of ``fabric_quant.available_modes("bitsandbytes")``: ``int8``, ``int8-training``, ``nf4``,
            ``nf4-dq``, ``fp4``, ``fp4-dq``.
        dtype: compute dtype for activations and non-quantized parameters (``torch.float32``, ``torch.bfloat16``,
            ``torch.float16`` or a name like ``"bf16"``). Default: bf16 where the hardware has it natively,
            else fp16 on CUDA and fp32 on CPU.
        ignore_modules: name prefixes of submodules whose Linear layers stay in float (e.g. ``{"classifier"}``).
        quant_storage: 4-bit modes: the dtype the packed 4-bit data is stored as (default ``torch.uint8``). FSDP
            needs it equal to the dtype of the other parameters so that it can flatten and shard them together.
    """

    def __init__(
        self,
        mode: str,
        dtype: torch.dtype | str | None = None,
        ignore_modules: set[str] | list[str] | tuple[str, ...] | None = None,
        quant_storage: torch.dtype | str | None = None,
    ) -> None:
        self.mode = mode_spec(mode, family=FAMILY).name
        self.dtype = default_compute_dtype() if dtype is None else parse_dtype(dtype, what=f"dtype for mode {mode!r}")
        if isinstance(ignore_modules, str):
            raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore_modules!r}")
        self.ignore_modules = set(ignore_modules or ())
        self.quant_storage = _parse_quant_storage(quant_storage, self.mode)

    def layer_class(self) -> type[torch.nn.Linear]:
        from fabric_quant.layers.bnb_linear import layer_class

        options = dict(mode_spec(self.mode).options)
        if options["kind"] == "4bit":
            options["compute_dtype"] = self.dtype
            options["quant_storage"] = self.quant_storage
        return layer_class(self.mode, **options)

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from fabric_quant.layers import quantized_layers

        # Idempotent: a model quantized before adapters were added (QLoRA: quantize, then wrap with peft, then
        # `fabric.setup_module`) is not converted again, which would quantize the adapters' own Linear layers.
        if next(quantized_layers(module), None) is None:
            self._replace_linear_layers(module)
        self._cast_float_params(module)
        return module

    def _replace_linear_layers(self, module: torch.nn.Module) -> None:
        if not any(isinstance(m, torch.nn.Linear) for m in module.modules()):
            raise TypeError(
                f"BnbPrecision({self.mode!r}) quantizes torch.nn.Linear layers, but {type(module).__name__} has none."
            )
        ignore = check_ignore_modules(module, self.ignore_modules)
        cls = self.layer_class()

        def select(name: str, child: torch.nn.Module) -> bool:
            return type(child) is torch.nn.Linear and not is_ignored(name, ignore)

        def build(name: str, child: torch.nn.Linear) -> torch.nn.Module:
            # Built on meta so no second float copy is allocated; the child's weight is adopted as is and
            # quantized when Fabric moves the module to its device (on CUDA: on the GPU, layer by layer).
            new = cls(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            trainable = getattr(new.weight, "has_fp16_weights", False)  # int8-training keeps float, trainable weights
            new.weight = type(new.weight)(child.weight.data, requires_grad=trainable, **_param_kwargs(new.weight))
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=child.bias.requires_grad)
            new.train(child.training)
            return new

        replace_modules(module, select, build)

    def _cast_float_params(self, module: torch.nn.Module) -> None:
        from fabric_quant.layers import QuantizedLinear

        # Everything that stays in float runs in the compute dtype, as in Lightning's "-true" precisions;
        # quantized weights are left alone (casting packed data would corrupt it).
        for sub in module.modules():
            skip = sub.storage_keys if isinstance(sub, QuantizedLinear) else ()
            for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
                if name in skip:
                    continue
                if torch.is_floating_point(tensor) and tensor.dtype != self.dtype:
                    tensor.data = tensor.data.to(self.dtype)

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
        stack.enter_context(_ClassReplacementContextManager({"torch.nn.Linear": self.layer_class()}))
        return stack

    @override
    def forward_context(self) -> AbstractContextManager:
        return _DtypeContextManager(self.dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=torch.Tensor, dst_type=self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return apply_to_collection(
            data, function=_convert_fp_tensor, dtype=torch.Tensor, dst_type=torch.get_default_dtype()
        )

    def __repr__(self) -> str:
        return (
            f"BnbPrecision(mode={self.mode!r}, dtype={self.dtype}, ignore_modules={sorted(self.ignore_modules)},"
            f" quant_storage={self.quant_storage})"
        )


QUANT_STORAGE = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _parse_quant_storage(value: torch.dtype | str | None, mode: str) -> torch.dtype:
    if value is None:
        return torch.uint8
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in QUANT_STORAGE:
        raise ValueError(f"Unsupported quant_storage {value!r}. Valid choices: {', '.join(map(str, QUANT_STORAGE))}")
    if mode.startswith("int8") and dtype is not torch.uint8:
        raise ValueError(f"quant_storage applies to the 4-bit modes; mode {mode!r} stores int8 weights")
    return dtype


def _param_kwargs(param: torch.nn.Parameter) -> dict[str, Any]:
    """Constructor options of a bitsandbytes parameter, to re-create it around another tensor."""
    keys = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module", "has_fp16_weights")
    return {k: getattr(param, k) for k in keys if hasattr(param, k)}


_MODES = {
    "int8": (
        {"kind": "int8", "has_fp16_weights": False},
        "LLM.int8(): int8 weights, row scales, fp outliers",
    ),
    "int8-training": ({"kind": "int8", "has_fp16_weights": True}, "LLM.int8() matmul with trainable float weights"),
    "nf4": ({"kind": "4bit", "quant_type": "nf4", "compress_statistics": False}, "4-bit NormalFloat, blocks of 64"),
    "nf4-dq": ({"kind": "4bit", "quant_type": "nf4", "compress_statistics": True}, "NF4 + double-quantized constants"),
    "fp4": ({"kind": "4bit", "quant_type": "fp4", "compress_statistics": False}, "4-bit float, blocks of 64"),
    "fp4-dq": ({"kind": "4bit", "quant_type": "fp4", "compress_statistics": True}, "FP4 + double-quantized constants"),
}
for _name, (_options, _description) in _MODES.items():
    register_mode(_name, BnbPrecision, family=FAMILY, description=_description, options=_options)

"""The bitsandbytes family: int8 / NF4 / FP4 (with or without double quantization) Linear layers on CPU and CUDA.

:func:`quantize_bnb` is the library function (``fabric_quant.quantize_(model, "nf4-dq")`` calls it);
``fabric_quant.plugins.bnb.BnbPrecision`` applies the same transformation inside Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fabric_quant.modules import (
    cast_float_rest,
    check_ignore_modules,
    ignore_set,
    is_ignored,
    refuse_requantization,
    replace_modules,
)
from fabric_quant.nn.base import quantized_layers
from fabric_quant.options import default_compute_dtype, parse_dtype
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "bitsandbytes"
QUANT_STORAGE = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class BnbConfig:
    """A bitsandbytes mode with its run options, validated.

    Args:
        mode: one of ``fabric_quant.available_modes("bitsandbytes")``.
        dtype: compute dtype for activations and non-quantized parameters.
        ignore_modules: name prefixes of submodules whose Linear layers stay in float.
        quant_storage: 4-bit modes: the dtype the packed data is stored as (default uint8; a float dtype keeps the
            same bytes in a float container).
        options: the mode's scheme parameters from the registry (``kind``: ``"int8"`` or ``"4bit"``, quant type,
            double quantization, ...), looked up once by :meth:`create`.
    """

    mode: str
    dtype: torch.dtype
    ignore_modules: frozenset[str]
    quant_storage: torch.dtype
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)  # a function of `mode`

    @property
    def kind(self) -> str:
        """``"int8"`` or ``"4bit"``: the layer family of the mode."""
        return self.options["kind"]

    @classmethod
    def create(
        cls,
        mode: str,
        dtype: torch.dtype | str | None = None,
        ignore_modules: Iterable[str] | None = None,
        quant_storage: torch.dtype | str | None = None,
    ) -> BnbConfig:
        """Validate the options (defaults: the hardware's native compute dtype, uint8 storage)."""
        spec = mode_spec(mode, family=FAMILY)
        dtype = default_compute_dtype() if dtype is None else parse_dtype(dtype, what=f"dtype for mode {spec.name!r}")
        storage = _parse_quant_storage(quant_storage, spec.name, spec.options["kind"])
        return cls(spec.name, dtype, ignore_set(ignore_modules), storage, spec.options)

    def layer_class(self) -> type[torch.nn.Linear]:
        from fabric_quant.nn.bnb import layer_class

        options = dict(self.options)
        if self.kind == "4bit":
            options["compute_dtype"] = self.dtype
            options["quant_storage"] = self.quant_storage
        return layer_class(self.mode, **options)


def mode_kind(mode: str) -> str:
    """``"int8"`` or ``"4bit"`` for a bitsandbytes mode name (the registry's ``kind``); an unknown name raises
    ``ValueError`` listing the valid ones."""
    return mode_spec(mode, family=FAMILY).options["kind"]


def replace_linear_layers(model: torch.nn.Module, config: BnbConfig) -> torch.nn.Module:
    """Swap every ``torch.nn.Linear`` (outside ``ignore_modules``) for the mode's bitsandbytes layer and cast the
    float rest to the compute dtype. Each new layer adopts the float weight as it is; it is quantized when the
    module moves to a device (``.to()``: on CUDA, on the GPU layer by layer), at its first forward, or by
    :func:`quantize_bnb`. A model that already has quantized layers is not converted again (QLoRA: quantize, wrap
    with peft, then ``fabric.setup_module`` must not quantize the adapters' own Linear layers); one quantized in
    another mode is an error. A Linear whose weight another module also holds (an output head tied to the input
    embedding) stays float, as :func:`fabric_quant.from_pretrained` keeps it: quantizing it would untie the two."""
    if not refuse_requantization(model, config.mode, allowed={config.mode}):
        if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
            name = type(model).__name__
            # "your model has no Linear": the phrase Lightning's plugin raises (and its tests match)
            raise TypeError(
                f"mode {config.mode!r} quantizes torch.nn.Linear layers, but your model has no Linear layers ({name})"
            )
        ignore = check_ignore_modules(model, config.ignore_modules)
        tied = _tied_linears(model, ignore)
        cls = config.layer_class()

        def select(name: str, child: torch.nn.Module) -> bool:
            return type(child) is torch.nn.Linear and id(child) not in tied and not is_ignored(name, ignore)

        replace_modules(model, select, lambda name, child: _adopt(cls, child))
    _set_compute_dtype(model, config.dtype)
    cast_float_rest(model, config.dtype)
    if not getattr(model, "_fq_cast_on_load", False):  # an assign=True load puts the checkpoint's dtype back
        model.register_load_state_dict_post_hook(lambda module, keys: cast_float_rest(module, config.dtype))
        model._fq_cast_on_load = True
    return model


def _set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """The compute dtype of 4-bit layers built earlier (under ``fabric.init_module()``, or by a plugin whose
    ``dtype`` was changed since): as Lightning's plugin does, the dtype of this conversion wins, and bitsandbytes
    re-reads the input dtype at the next forward."""
    from fabric_quant.nn.bnb import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = False


def _tied_linears(model: torch.nn.Module, ignore: frozenset[str]) -> set[int]:
    """``id`` of every Linear whose weight is also held by a module that stays float (a tied output head: the
    embedding; or an ignored Linear). Quantizing it would leave that module a float copy and the head a 4-bit one:
    the tie broken, both copies kept, and results unlike the loader's, which keeps a tied head float."""
    holders: dict[int, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            holders.setdefault(id(weight), []).append((name, module))
    tied = set()
    for owners in holders.values():
        if len({id(m) for _, m in owners}) < 2:
            continue  # one module (under one or more names): nothing shares its weight
        if any(type(m) is not torch.nn.Linear or is_ignored(name, ignore) for name, m in owners):
            tied |= {id(m) for _, m in owners if type(m) is torch.nn.Linear}
    return tied


def _adopt(cls: type[torch.nn.Linear], child: torch.nn.Linear) -> torch.nn.Module:
    # Built on meta so no second float copy is allocated; the child's weight is adopted as is.
    new = cls(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
    trainable = getattr(new.weight, "has_fp16_weights", False)  # int8-training keeps float, trainable weights
    new.weight = type(new.weight)(child.weight.data, requires_grad=trainable, **_param_kwargs(new.weight))
    if child.bias is not None:
        new.bias = torch.nn.Parameter(child.bias.data, requires_grad=child.bias.requires_grad)
    new.train(child.training)
    return new


def quantize_bnb(
    model: torch.nn.Module,
    mode: str = "nf4-dq",
    *,
    dtype: torch.dtype | str | None = None,
    ignore_modules: Iterable[str] | None = None,
    quant_storage: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Quantize ``model``'s Linear layers in place with a bitsandbytes mode, now: each layer on ``device`` (default:
    the device its weight is on), the float rest cast to ``dtype`` (and moved to ``device`` when given). Layers
    still on the meta device are quantized when their float checkpoint is loaded."""
    config = BnbConfig.create(mode, dtype, ignore_modules, quant_storage)
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={str(device)!r}: CUDA is not available here; valid choices: 'cpu' or None")
    replace_linear_layers(model, config)
    for _, layer in quantized_layers(model):
        if layer.weight.device.type != "meta":
            layer.quantize_(device=device)
    return model if device is None else model.to(device)


def _parse_quant_storage(value: torch.dtype | str | None, mode: str, kind: str) -> torch.dtype:
    if value is None:
        return torch.uint8
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in QUANT_STORAGE:
        raise ValueError(f"Unsupported quant_storage {value!r}. Valid choices: {', '.join(map(str, QUANT_STORAGE))}")
    if kind == "int8" and dtype is not torch.uint8:
        raise ValueError(f"quant_storage applies to the 4-bit modes; mode {mode!r} stores int8 weights")
    return dtype


def _param_kwargs(param: torch.nn.Parameter) -> dict[str, Any]:
    """Constructor options of a bitsandbytes parameter, to re-create it around another tensor."""
    keys = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module", "has_fp16_weights")
    return {k: getattr(param, k) for k in keys if hasattr(param, k)}


_MODES = {
    "int8": ({"kind": "int8", "has_fp16_weights": False}, "LLM.int8(): int8 weights, row scales, fp outliers"),
    "int8-training": ({"kind": "int8", "has_fp16_weights": True}, "LLM.int8() matmul with trainable float weights"),
    "nf4": ({"kind": "4bit", "quant_type": "nf4", "compress_statistics": False}, "4-bit NormalFloat, blocks of 64"),
    "nf4-dq": ({"kind": "4bit", "quant_type": "nf4", "compress_statistics": True}, "NF4 + double-quantized constants"),
    "fp4": ({"kind": "4bit", "quant_type": "fp4", "compress_statistics": False}, "4-bit float, blocks of 64"),
    "fp4-dq": ({"kind": "4bit", "quant_type": "fp4", "compress_statistics": True}, "FP4 + double-quantized constants"),
}
for _name, (_options, _description) in _MODES.items():
    register_mode(
        _name, family=FAMILY, quantize=quantize_bnb, plugin="fabric_quant.plugins.bnb:bnb_plugin",
        description=_description, options=_options,
    )  # fmt: skip

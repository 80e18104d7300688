"""The interface every quantized layer of the package implements.

Footprint accounting, dequantized export and checkpoint code talk to layers only through this
interface, so a new scheme adds a layer class and never touches those modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


def keep_derived() -> bool:
    """Whether a layer may store what it derived from its weights (a kernel layout, a dequantized copy): always,
    except while dynamo traces for inductor with freezing on (``fabric_quant.kernels.compile_model``). There the
    value is computed in the graph from frozen weights and constant-folded once; storing it as well would edit the
    layer state the graph is guarded on, so dynamo would compile the whole model a second time on the next call
    (measured: the 1B Llama's decode step, 13.5 s more compilation) and keep the first graph, with its own copy of
    every layout, alive. Without freezing the value is stored (the graph then reads it after one recompile instead
    of rebuilding it on every call)."""
    if not torch.compiler.is_compiling():
        return True
    import torch._inductor.config as inductor_config

    return not inductor_config.freezing


def derived(store: dict, key, build):
    """``store[key]``, built by ``build()`` on first use and kept there where :func:`keep_derived` allows."""
    if key in store:
        return store[key]
    value = build()
    if keep_derived():
        store[key] = value
    return value


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (FSDP2 DTensor) tensor, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (FSDP2 DTensor) one, gathered (collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def set_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into ``target``; a sharded one keeps its own shard (every rank holds ``value``: cut
    locally, no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(device=local(target).device, dtype=target.dtype)
    if isinstance(target, DTensor):
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    local(target).copy_(local(value))


@dataclass(frozen=True)
class Storage:
    """How many bytes a quantized weight takes, split the way QLoRA accounts for it."""

    numel: int
    """Logical number of weight elements (out_features * in_features)."""
    per_weight_bytes: int
    """Packed codes plus the per-block / per-row constants that scale with the weight's size."""
    table_bytes: int
    """Fixed-size lookup tables (the NF4/FP4 code book, the double-quant code book): a constant per layer."""


class QuantizedLinear:
    """Mixin for Linear layers whose weight is stored quantized."""

    fq_mode: str = ""
    storage_keys: tuple[str, ...] = ("weight",)
    """Names of the parameters/buffers that :meth:`weight_storage` accounts for."""

    def is_quantized(self) -> bool:
        raise NotImplementedError

    def quantize_(self, weight: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        """Quantize ``weight`` (default: the layer's current float weight) in place on ``device``."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as a float32 tensor of shape (out_features, in_features)."""
        raise NotImplementedError

    def weight_storage(self) -> Storage | None:
        """Storage of the quantized weight, or None when the weight is kept in float (e.g. int8-training)."""
        raise NotImplementedError


def quantized_layers(module: torch.nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    for name, child in module.named_modules():
        if isinstance(child, QuantizedLinear):
            yield name, child

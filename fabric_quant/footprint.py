"""Memory footprint of a (quantized) model: bytes of every parameter and buffer, split quantized / not."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from fabric_quant.modules import unwrap
from fabric_quant.nn.base import QuantizedLinear, Storage, local


@dataclass(frozen=True)
class LayerFootprint:
    name: str
    kind: str
    numel: int
    """Logical number of elements of the layer's own parameters and buffers (unpacked)."""
    bytes: int
    quantized_numel: int = 0
    quantized_bytes: int = 0
    """Packed codes and per-block/per-row constants of the quantized weight."""
    table_bytes: int = 0
    """Constant-size code books stored with the quantized weight."""

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_numel if self.quantized_numel else float("nan")


@dataclass(frozen=True)
class Footprint:
    layers: list[LayerFootprint] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def quantized_bytes(self) -> int:
        return sum(layer.quantized_bytes for layer in self.layers)

    @property
    def quantized_numel(self) -> int:
        return sum(layer.quantized_numel for layer in self.layers)

    @property
    def table_bytes(self) -> int:
        return sum(layer.table_bytes for layer in self.layers)

    @property
    def float_bytes(self) -> int:
        return self.total_bytes - self.quantized_bytes - self.table_bytes

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def bits_per_quantized_param(self) -> float:
        """QLoRA's accounting: packed codes + per-block constants, per quantized weight (code books excluded)."""
        return 8 * self.quantized_bytes / self.quantized_numel if self.quantized_numel else float("nan")

    @property
    def bits_per_param(self) -> float:
        """Every byte of the model (code books and float layers included) over every logical parameter."""
        return 8 * self.total_bytes / self.numel if self.numel else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "total_mb": self.total_bytes / 1e6,
            "quantized_mb": self.quantized_bytes / 1e6,
            "float_mb": self.float_bytes / 1e6,
            "table_mb": self.table_bytes / 1e6,
            "bits_per_param": self.bits_per_param,
            "bits_per_quantized_param": self.bits_per_quantized_param,
        }

    def table(self) -> str:
        """Per-layer Markdown table (layers owning no tensors are left out)."""
        rows = ["| layer | type | params | bytes | quantized | bits/quantized param |", "|---|---|---:|---:|---|---:|"]
        for layer in self.layers:
            q = layer.quantized_numel > 0
            bits = f"{layer.bits_per_quantized_param:.3f}" if q else ""
            rows.append(f"| {layer.name or '(root)'} | {layer.kind} | {layer.numel} | {layer.bytes} | {q} | {bits} |")
        rows.append(f"| **total** | | {self.numel} | {self.total_bytes} | | {self.bits_per_quantized_param:.3f} |")
        return "\n".join(rows)


def _nbytes(tensor: torch.Tensor) -> int:
    tensor = local(tensor)
    return tensor.numel() * tensor.element_size()


def _foreign_storage(module: torch.nn.Module) -> Storage | None:
    # bitsandbytes layers built elsewhere (Lightning's, transformers') exist only once bitsandbytes is imported:
    # asked for then, so that counting never imports it (importing fabric_quant must not need it)
    if sys.modules.get("bitsandbytes") is None:
        return None
    from fabric_quant.nn.bnb import foreign_storage

    return foreign_storage(module)


def footprint(model: torch.nn.Module) -> Footprint:
    """Count the bytes of every parameter and buffer (shared tensors once), per layer. On a sharded (FSDP) model:
    the bytes this rank holds, over the logical (whole) number of parameters."""
    model = unwrap(model)
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        tensors = []
        for key, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or (t.device.type != "meta" and local(t).data_ptr() in seen):
                continue  # a view of memory already counted (e.g. the int8 Linear's transposed weight), or tied
            tensors.append((key, t))
            if t.device.type != "meta":
                seen.add(local(t).data_ptr())
        ours = isinstance(module, QuantizedLinear)
        storage = module.weight_storage() if ours else _foreign_storage(module)
        storage_keys = module.storage_keys if ours else ("weight",)
        if not tensors and storage is None:
            continue
        plain = [t for key, t in tensors if not (storage is not None and key in storage_keys)]
        numel = sum(t.numel() for t in plain) + (storage.numel if storage else 0)
        nbytes = sum(_nbytes(t) for t in plain)
        if storage is None:
            layers.append(LayerFootprint(name, type(module).__name__, numel, nbytes))
            continue
        total = nbytes + storage.per_weight_bytes + storage.table_bytes
        layers.append(
            LayerFootprint(
                name, type(module).__name__, numel, total, storage.numel, storage.per_weight_bytes, storage.table_bytes
            )
        )
    return Footprint(layers)

"""The peer libraries' quantization arms, used side by side with the package's in the benchmarks (reference arms
only: the package never imports them). torchao 0.18's documented CPU recipes: ``quantize_(model, config)``, then
plain ``torch.compile``; int4 on CPU through its tinygemm layout (``PrototypeInt4WeightOnlyConfig``, bf16)."""

from __future__ import annotations

import logging
import warnings

import torch

TORCHAO = ("torchao-int8wo", "torchao-int8dyn", "torchao-int4wo-g128")


def torchao_available() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def torchao_quantize(model: torch.nn.Module, arm: str, skip: tuple[str, ...] = ("lm_head",)) -> torch.nn.Module:
    """Quantize ``model``'s Linear layers (not those named in ``skip``: a head tied to the embedding stays float,
    as in the package's arms without ``+head``) with torchao's config for ``arm``."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA extensions fail to load on CPU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    configs = {
        "torchao-int8wo": Int8WeightOnlyConfig,
        "torchao-int8dyn": Int8DynamicActivationInt8WeightConfig,
        "torchao-int4wo-g128": lambda: PrototypeInt4WeightOnlyConfig(group_size=128),
    }
    if arm not in configs:
        raise ValueError(f"arm={arm!r}: valid torchao arms are {', '.join(configs)}")

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and name.split(".")[-1] not in skip

    quantize_(model, configs[arm](), filter_fn=wanted)
    return model


def torchao_compile(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's documented compilation: plain ``torch.compile`` (static shapes, as the package's arms)."""
    return torch.compile(model, dynamic=False)

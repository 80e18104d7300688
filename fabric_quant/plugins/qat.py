"""``QATPrecision``: quantization-aware training for Lightning Fabric (fake-quantized Linear / Conv layers,
Conv-BatchNorm(-ReLU) folding, and a schedule a training loop drives)."""

from __future__ import annotations

import torch
from lightning.fabric.plugins import Precision
from typing_extensions import override

from fabric_quant.modules import check_ignore_modules, is_ignored, replace_modules
from fabric_quant.numerics.quant import group_view
from fabric_quant.qat.layers import (
    FakeQuantLayer,
    QATConfig,
    QATConv1d,
    QATConv2d,
    QATConvBn2d,
    QATEmbedding,
    QATLinear,
)
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "qat"
_SWAPS = {torch.nn.Linear: QATLinear, torch.nn.Conv1d: QATConv1d, torch.nn.Conv2d: QATConv2d}


class QATPrecision(Precision):
    """Swap Linear / Conv1d / Conv2d for fake-quantized versions; fuse Conv2d-BatchNorm2d(-ReLU) runs.

    Args:
        mode: a `qat` mode of the registry (``qat-int8``, ``qat-int8-static``, ``qat-int4``); its options are the
            defaults of the keyword arguments below, which override them.
        weight_bits, group_size, activations, observer, learnable_scales: see :class:`QATConfig`.
        ignore_modules: name prefixes left in float.
        start_step: optimizer step at which fake quantization starts (before: float training, observers warm up).
        freeze_observer_step: step after which static-activation observers stop updating.
        freeze_bn_step: step after which folded BatchNorms use their running statistics.
        embeddings: also fake-quantize Embedding tables (weights only, same bits and grouping).
        fuse: fuse Conv2d-BatchNorm2d(-ReLU) and Linear-ReLU runs inside nn.Sequential containers.
    """

    def __init__(
        self,
        mode: str = "qat-int8",
        *,
        ignore_modules: set[str] | list[str] | tuple[str, ...] | None = None,
        start_step: int = 0,
        freeze_observer_step: int | None = None,
        freeze_bn_step: int | None = None,
        embeddings: bool = False,
        fuse: bool = True,
        **overrides,
    ) -> None:
        self.mode = mode_spec(mode, family=FAMILY).name
        self.config = QATConfig(**{**mode_spec(mode).options, **overrides})
        if isinstance(ignore_modules, str):
            raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore_modules!r}")
        self.ignore_modules = set(ignore_modules or ())
        for name, value in (("embeddings", embeddings), ("fuse", fuse)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}={value!r} must be True or False")
        self.swaps = {**_SWAPS, torch.nn.Embedding: QATEmbedding} if embeddings else dict(_SWAPS)
        self.fuse = fuse
        for name, value in (("start_step", start_step), ("freeze_observer_step", freeze_observer_step),
                            ("freeze_bn_step", freeze_bn_step)):  # fmt: skip
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        self.start_step, self.freeze_observer_step, self.freeze_bn_step = (
            start_step,
            freeze_observer_step,
            freeze_bn_step,
        )

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        if any(isinstance(m, FakeQuantLayer) for m in module.modules()):
            return module  # already converted (idempotent, like BnbPrecision)
        ignore = check_ignore_modules(module, self.ignore_modules)
        if not any(type(m) in self.swaps for _, m in module.named_modules()):
            raise TypeError(
                f"QATPrecision({self.mode!r}) quantizes Linear/Conv1d/Conv2d, but {type(module).__name__} has none"
            )
        for name, m in module.named_modules():  # validate every target before changing anything
            if type(m) in self.swaps and not is_ignored(name, ignore):
                try:
                    group_view(m.weight, self.config.group_size, self.config.per_channel)
                except ValueError as err:
                    raise ValueError(f"{name}: {err}") from None
        if self.fuse:
            self._fuse_sequential(module, ignore)
        replace_modules(
            module,
            lambda name, child: type(child) in self.swaps and not is_ignored(name, ignore),
            lambda name, child: self.swaps[type(child)].from_float(child, self.config),
        )
        self.apply_schedule(module, 0)
        return module

    def _fuse_sequential(self, module: torch.nn.Module, ignore: set[str]) -> None:
        """Inside an nn.Sequential: Conv2d, BatchNorm2d[, ReLU] become one QATConvBn2d and Linear, ReLU one QATLinear
        with the ReLU fused (the freed slots become Identities, so indices stay valid)."""
        for name, seq in list(module.named_modules()):
            if not isinstance(seq, torch.nn.Sequential):
                continue
            children = list(seq.named_children())
            for i, (key, first) in enumerate(children[:-1]):
                if is_ignored(f"{name}.{key}" if name else key, ignore):
                    continue
                second = children[i + 1][1]
                if type(first) is torch.nn.Linear and type(second) is torch.nn.ReLU:
                    setattr(seq, key, QATLinear.from_float(first, self.config, relu=True))
                    setattr(seq, children[i + 1][0], torch.nn.Identity())
                    continue
                if type(first) is not torch.nn.Conv2d or type(second) is not torch.nn.BatchNorm2d:
                    continue
                relu = i + 2 < len(children) and type(children[i + 2][1]) is torch.nn.ReLU
                setattr(seq, key, QATConvBn2d.from_float(first, second, relu, self.config))
                setattr(seq, children[i + 1][0], torch.nn.Identity())
                if relu:
                    setattr(seq, children[i + 2][0], torch.nn.Identity())

    # The schedule, as methods a training loop calls (torchvision's QAT reference: observers frozen after 4
    # epochs, BatchNorm statistics after 3).
    def apply_schedule(self, module: torch.nn.Module, step: int) -> None:
        """Bring every QAT layer to the state the schedule gives for optimizer step ``step``."""
        self.enable_fake_quant(module, step >= self.start_step)
        if self.freeze_observer_step is not None and step >= self.freeze_observer_step:
            self.freeze_observers(module)
        if self.freeze_bn_step is not None and step >= self.freeze_bn_step:
            self.freeze_bn(module)

    @staticmethod
    def enable_fake_quant(module: torch.nn.Module, enabled: bool = True) -> None:
        for m in module.modules():
            if isinstance(m, FakeQuantLayer):
                m.fake_quant_enabled = enabled

    @staticmethod
    def freeze_observers(module: torch.nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, FakeQuantLayer) and m.act_observer is not None:
                m.act_observer.enabled = False

    @staticmethod
    def freeze_bn(module: torch.nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, QATConvBn2d):
                m.freeze_bn()

    @staticmethod
    def convert(module: torch.nn.Module, inplace: bool = False, backend: str = "auto") -> torch.nn.Module:
        """The deployable model with real int8 / packed int4 weights (see :func:`fabric_quant.qat.convert`)."""
        from fabric_quant.qat.convert import convert

        return convert(module, inplace=inplace, backend=backend)

    def __repr__(self) -> str:
        return f"QATPrecision(mode={self.mode!r}, config={self.config})"


_MODES = {
    "qat-int8": ({"weight_bits": 8, "activations": "dynamic"}, "QAT: int8 per-channel weights, int8 per-token acts"),
    "qat-int8-static": ({"weight_bits": 8, "activations": "static"}, "QAT: int8 weights, observer-calibrated acts"),
    "qat-int4": (
        {"weight_bits": 4, "group_size": 32, "activations": "dynamic"},
        "QAT: int4 weights (groups of 32), int8 acts",
    ),
}
for _name, (_options, _description) in _MODES.items():
    register_mode(_name, QATPrecision, family=FAMILY, description=_description, options=_options)

"""Where and when QAT happens: insert fake-quantized layers into a model (fusing Conv-BatchNorm(-ReLU) and
Linear-ReLU runs) and drive the schedule from any training loop. ``QATPrecision`` delegates to these."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fabric_quant.modules import (
    check_finite,
    check_ignore_modules,
    is_ignored,
    refuse_requantization,
    replace_modules,
)
from fabric_quant.numerics.quant import group_view
from fabric_quant.options import check_flags
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


def qat_config(mode: str, **overrides) -> QATConfig:
    """The :class:`QATConfig` of a ``qat`` mode, with fields overridden (validated)."""
    return QATConfig(**{**mode_spec(mode, family=FAMILY).options, **overrides})


def prepare_qat(
    model: torch.nn.Module,
    mode: str = "qat-int8",
    *,
    ignore_modules: Iterable[str] | None = None,
    embeddings: bool = False,
    fuse: bool = True,
    **overrides,
) -> torch.nn.Module:
    """Swap Linear / Conv1d / Conv2d (and with ``embeddings``, Embedding) for fake-quantized versions in place.

    Args:
        mode: a ``qat`` mode (``qat-int8``, ``qat-int8-static``, ``qat-int4``); ``overrides`` replace fields of its
            :class:`QATConfig` (``weight_bits``, ``group_size``, ``activations``, ``observer``, ...).
        ignore_modules: name prefixes left in float.
        embeddings: also fake-quantize Embedding tables (weights only, same bits and grouping).
        fuse: fuse Conv2d-BatchNorm2d(-ReLU) and Linear-ReLU runs inside nn.Sequential containers.
    Every target is validated before anything changes; a model that is already prepared is returned as it is.
    """
    config = qat_config(mode, **overrides)
    check_flags(embeddings=embeddings, fuse=fuse)
    refuse_requantization(model, mode)  # real quantized layers cannot be fake-quantized again
    if any(isinstance(m, FakeQuantLayer) for m in model.modules()):
        return model
    swaps = {**_SWAPS, torch.nn.Embedding: QATEmbedding} if embeddings else _SWAPS
    ignore = check_ignore_modules(model, ignore_modules)
    if not any(type(m) in swaps for m in model.modules()):
        raise TypeError(f"mode {mode!r} quantizes Linear/Conv1d/Conv2d, but {type(model).__name__} has none")
    targets = [name for name, m in model.named_modules() if type(m) in swaps and not is_ignored(name, ignore)]
    for name in targets:  # every target is checked before fusion changes anything
        try:
            group_view(model.get_submodule(name).weight, config.group_size, config.per_channel)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    check_finite(model, targets)
    if fuse:
        _fuse_sequential(model, ignore, config)
    replace_modules(
        model,
        lambda name, child: type(child) in swaps and not is_ignored(name, ignore),
        lambda name, child: swaps[type(child)].from_float(child, config),
    )
    return model


def _fuse_sequential(model: torch.nn.Module, ignore: Iterable[str], config: QATConfig) -> None:
    """Inside an nn.Sequential: Conv2d, BatchNorm2d[, ReLU] become one QATConvBn2d and Linear, ReLU one QATLinear
    with the ReLU fused (the freed slots become Identities, so indices stay valid)."""
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, torch.nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (key, first) in enumerate(children[:-1]):
            if is_ignored(f"{name}.{key}" if name else key, ignore):
                continue
            second = children[i + 1][1]
            if type(first) is torch.nn.Linear and type(second) is torch.nn.ReLU:
                setattr(seq, key, QATLinear.from_float(first, config, relu=True))
                setattr(seq, children[i + 1][0], torch.nn.Identity())
                continue
            if type(first) is not torch.nn.Conv2d or type(second) is not torch.nn.BatchNorm2d:
                continue
            relu = i + 2 < len(children) and type(children[i + 2][1]) is torch.nn.ReLU
            setattr(seq, key, QATConvBn2d.from_float(first, second, relu, config))
            setattr(seq, children[i + 1][0], torch.nn.Identity())
            if relu:
                setattr(seq, children[i + 2][0], torch.nn.Identity())


@dataclass(frozen=True)
class QATSchedule:
    """When fake quantization starts and when observers and BatchNorm statistics freeze, in optimizer steps
    (torchvision's QAT reference: observers frozen after 4 epochs, BatchNorm statistics after 3)."""

    start_step: int = 0
    """Step at which fake quantization starts (before: float training, observers warm up)."""
    freeze_observer_step: int | None = None
    """Step after which static-activation observers stop updating."""
    freeze_bn_step: int | None = None
    """Step after which folded BatchNorms use their running statistics."""

    def __post_init__(self) -> None:
        for name in ("start_step", "freeze_observer_step", "freeze_bn_step"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be >= 0 (an integer) or None, got {value!r}")


def apply_schedule(model: torch.nn.Module, step: int, schedule: QATSchedule | None = None) -> None:
    """Bring every QAT layer of ``model`` to the state ``schedule`` gives for optimizer step ``step``; call it
    before each step's forward, from any loop."""
    schedule = schedule or QATSchedule()
    enable_fake_quant(model, step >= schedule.start_step)
    if schedule.freeze_observer_step is not None and step >= schedule.freeze_observer_step:
        freeze_observers(model)
    if schedule.freeze_bn_step is not None and step >= schedule.freeze_bn_step:
        freeze_bn(model)


def enable_fake_quant(model: torch.nn.Module, enabled: bool = True) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantLayer):
            m.fake_quant_enabled = enabled


def freeze_observers(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantLayer) and m.act_observer is not None:
            m.act_observer.enabled = False


def freeze_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.freeze_bn()


_MODES = {
    "qat-int8": ({"weight_bits": 8, "activations": "dynamic"}, "QAT: int8 per-channel weights, int8 per-token acts"),
    "qat-int8-static": ({"weight_bits": 8, "activations": "static"}, "QAT: int8 weights, observer-calibrated acts"),
    "qat-int4": (
        {"weight_bits": 4, "group_size": 32, "activations": "dynamic"},
        "QAT: int4 weights (groups of 32), int8 acts",
    ),
}
for _name, (_options, _description) in _MODES.items():
    register_mode(
        _name, family=FAMILY, quantize=prepare_qat, plugin="fabric_quant.plugins.qat:QATPrecision",
        description=_description, options=_options,
    )  # fmt: skip

"""One plugin object for both of Lightning's front ends.

Lightning's Trainer precision plugins subclass Fabric's (its own bitsandbytes plugin is just
``class BitsandbytesPrecision(Precision, FabricBNBPrecision)``), so a Trainer plugin passes Fabric's type check.
Four hooks differ between the two: the Trainer passes its LightningModule (and a closure to ``optimizer_step``) and
runs its callbacks around them. The class keeps Fabric's versions, so that under Fabric it behaves like Fabric's
own plugins (which also lets users call ``loss.backward()``: Fabric insists on ``fabric.backward`` only for plugins
that override these hooks); the Trainer calls ``connect`` when it sets the plugin up, and that switches the object
to the Trainer's versions.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from lightning.fabric.plugins import Precision as FabricPrecision
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor
from lightning.pytorch.plugins.precision import Precision as TrainerPrecision
from lightning_utilities import apply_to_collection
from typing_extensions import override

_HOOKS = ("pre_backward", "backward", "post_backward", "optimizer_step")


class LightningPrecision(TrainerPrecision):
    """Base of the package's plugins: accepted by ``Fabric(plugins=...)`` and ``Trainer(plugins=...)``."""

    pre_backward = FabricPrecision.pre_backward
    backward = FabricPrecision.backward
    post_backward = FabricPrecision.post_backward
    optimizer_step = FabricPrecision.optimizer_step

    @override
    def connect(self, model: Any, optimizers: list, lr_schedulers: list) -> tuple[Any, list, list]:
        for name in _HOOKS:  # only the Trainer calls connect
            setattr(self, name, types.MethodType(getattr(TrainerPrecision, name), self))
        return super().connect(model, optimizers, lr_schedulers)


def cast_floats(data: Any, dtype: torch.dtype) -> Any:
    """Every floating-point tensor in a (nested) collection cast to ``dtype``."""
    return apply_to_collection(data, function=_convert_fp_tensor, dtype=torch.Tensor, dst_type=dtype)

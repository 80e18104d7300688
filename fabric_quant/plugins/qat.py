"""``QATPrecision``: quantization-aware training (:mod:`fabric_quant.qat`) as a Lightning precision plugin.

With Fabric, call ``plugin.apply_schedule(model, step)`` in the loop; under the Trainer the plugin applies the
schedule itself after every optimizer step (its step count is saved in the Trainer's checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from typing_extensions import override

from fabric_quant.modules import ignore_set
from fabric_quant.options import check_flags
from fabric_quant.plugins.base import LightningPrecision
from fabric_quant.qat import QATSchedule, apply_schedule, convert, prepare_qat, qat_config


class QATPrecision(LightningPrecision):
    """Fake-quantize Linear / Conv1d / Conv2d (and optionally Embedding) layers; fuse Conv-BN(-ReLU) runs.

    Args:
        mode: a ``qat`` mode; ``overrides`` replace fields of its :class:`~fabric_quant.qat.QATConfig`.
        ignore_modules, embeddings, fuse: see :func:`fabric_quant.qat.prepare_qat`.
        start_step, freeze_observer_step, freeze_bn_step: see :class:`fabric_quant.qat.QATSchedule`.
    """

    def __init__(
        self,
        mode: str = "qat-int8",
        *,
        ignore_modules: Iterable[str] | None = None,
        start_step: int = 0,
        freeze_observer_step: int | None = None,
        freeze_bn_step: int | None = None,
        embeddings: bool = False,
        fuse: bool = True,
        **overrides: Any,
    ) -> None:
        self.config = qat_config(mode, **overrides)
        self.mode, self.overrides = mode, overrides
        self.ignore_modules, self.embeddings, self.fuse = ignore_set(ignore_modules), embeddings, fuse
        check_flags(embeddings=embeddings, fuse=fuse)
        self.schedule = QATSchedule(start_step, freeze_observer_step, freeze_bn_step)
        self._module: torch.nn.Module | None = None
        self._trainer_steps = 0

    @override
    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        prepare_qat(module, self.mode, ignore_modules=self.ignore_modules, embeddings=self.embeddings, fuse=self.fuse,
                    **self.overrides)  # fmt: skip
        self.apply_schedule(module, 0)
        self._module = module
        return module

    def apply_schedule(self, module: torch.nn.Module, step: int) -> None:
        """Bring every QAT layer to the state the schedule gives for optimizer step ``step``."""
        apply_schedule(module, step, self.schedule)

    @override
    def connect(self, model: Any, optimizers: list, lr_schedulers: list) -> tuple[Any, list, list]:
        out = super().connect(model, optimizers, lr_schedulers)  # the Trainer's hooks from here on
        trainer_step = self.optimizer_step

        def optimizer_step(optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
            result = trainer_step(optimizer, model, closure, **kwargs)
            self._trainer_steps += 1
            self.apply_schedule(self._module, self._trainer_steps)  # the state for the next step
            return result

        self.optimizer_step = optimizer_step
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"qat_steps": self._trainer_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._trainer_steps = int(state_dict.get("qat_steps", 0))
        if self._module is not None:
            self.apply_schedule(self._module, self._trainer_steps)

    @staticmethod
    def convert(module: torch.nn.Module, inplace: bool = False, backend: str = "auto") -> torch.nn.Module:
        """The deployable model with real int8 / packed int4 weights (see :func:`fabric_quant.qat.convert`)."""
        return convert(module, inplace=inplace, backend=backend)

    def __repr__(self) -> str:
        return f"QATPrecision(mode={self.mode!r}, config={self.config}, schedule={self.schedule})"

"""The one entry point, without Lightning: ``quantize_(model, mode, **options)`` for every registered mode, and
``convert(model)`` from a QAT-trained model to the real int8 / int4 one."""

from __future__ import annotations

from typing import Any

import torch

from fabric_quant.qat.convert import convert as _convert_qat
from fabric_quant.registry import mode_spec


def quantize_(model: torch.nn.Module, mode: str, **options: Any) -> torch.nn.Module:
    """Quantize ``model`` in place with a registered mode and return it (torchao's ``quantize_``).

    - bitsandbytes (``"nf4-dq"``, ``"int8"``, ...): Linear layers replaced and quantized on the device their
      weights are on, or on ``device=``; options ``dtype``, ``ignore_modules``, ``quant_storage``
      (:func:`~fabric_quant.bnb.quantize_bnb`).
    - QAT (``"qat-int8"``, ...): fake-quantized layers inserted, Conv-BN(-ReLU) fused; train, then :func:`convert`
      (:func:`~fabric_quant.qat.prepare_qat`; drive the schedule with :func:`~fabric_quant.qat.apply_schedule`).
    - PTQ (``"ptq-dynamic-int8"``; ``"ptq-static-int8"`` with ``calibration_data=``): the real int8 model
      (:func:`~fabric_quant.ptq.quantize_ptq`).

    The Lightning plugin of the same mode (:func:`~fabric_quant.precision_plugin`) applies the same function.
    """
    return mode_spec(mode).quantize(model, mode, **options)


def convert(model: torch.nn.Module, *, inplace: bool = False, backend: str = "auto") -> torch.nn.Module:
    """A QAT-prepared (and trained) model into the real int8 / packed int4 model, in eval mode. A copy by default,
    as torch.ao's ``convert``: the fake-quant model stays usable (to compare, or to train further);
    ``inplace=True`` replaces its layers instead, without the copy's memory. ``backend``: ``auto``, ``x86`` (oneDNN
    int8 convolutions) or ``reference``."""
    return _convert_qat(model, inplace=inplace, backend=backend)

"""The ``ptq`` modes of the registry: one library function that dispatches to dynamic or static quantization."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fabric_quant.kernels import select_backend
from fabric_quant.modules import refuse_requantization
from fabric_quant.options import parse_dtype
from fabric_quant.ptq.dynamic import quantize_dynamic
from fabric_quant.ptq.static import quantize_static
from fabric_quant.qat.layers import QATConfig
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "ptq"
_INT8_MODES = ("int8-converted", "int4-converted", "ptq-dynamic-int8")  # the fq_mode of fabric_quant.nn's int8 layers


def ptq_options(
    mode: str,
    *,
    calibration_data: Iterable | None = None,
    observer: str = "minmax",
    per_channel: bool = True,
    backend: str = "auto",
    ignore_modules: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Validate a ``ptq`` mode's options before any work; returns them resolved (backend, float dtype)."""
    options = mode_spec(mode, family=FAMILY).options
    if options["static"] and calibration_data is None:
        raise ValueError(f"mode {mode!r} needs calibration_data (batches of model inputs)")
    if not options["static"] and calibration_data is not None:
        raise ValueError(f"mode {mode!r} quantizes activations on the fly: calibration_data is unused")
    QATConfig(activations="static", observer=observer, per_channel=per_channel)  # the options' one check
    return {
        "calibration_data": calibration_data, "observer": observer, "per_channel": per_channel,
        "backend": select_backend(backend), "ignore_modules": ignore_modules,
        "dtype": parse_dtype(options.get("dtype", "float32")),
    }  # fmt: skip


def quantize_ptq(model: torch.nn.Module, mode: str = "ptq-dynamic-int8", **options: Any) -> torch.nn.Module:
    """Quantize ``model`` in place with a ``ptq`` mode: ``ptq-dynamic-int8`` (no data needed; ``-bf16``: the float
    rest in bf16) or ``ptq-static-int8`` (``calibration_data=`` required). Options: see :func:`ptq_options`, plus
    ``progress`` (static: a progress bar over the calibration batches). A model already quantized is returned."""
    progress = options.pop("progress", True)
    opts = ptq_options(mode, **options)
    if refuse_requantization(model, mode, allowed=_INT8_MODES):
        return model  # already int8 (a PTQ or converted QAT model): nothing to do
    if mode_spec(mode).options["static"]:
        return quantize_static(
            model, opts["calibration_data"], observer=opts["observer"], per_channel=opts["per_channel"],
            backend=opts["backend"], ignore_modules=opts["ignore_modules"], progress=progress, inplace=True,
        )  # fmt: skip
    return quantize_dynamic(
        model, per_channel=opts["per_channel"], ignore_modules=opts["ignore_modules"], dtype=opts["dtype"], inplace=True
    )


_PLUGIN = "fabric_quant.plugins.ptq:PTQPrecision"
register_mode("ptq-dynamic-int8", family=FAMILY, quantize=quantize_ptq, plugin=_PLUGIN, options={"static": False},
              description="PTQ: int8 weights, int8 activations per token on the fly (Linear, LSTM, GRU)")  # fmt: skip
register_mode("ptq-dynamic-int8-bf16", family=FAMILY, quantize=quantize_ptq, plugin=_PLUGIN,
              options={"static": False, "dtype": "bfloat16"},
              description="PTQ: as ptq-dynamic-int8, with what stays float (activations, norms) in bf16")  # fmt: skip
register_mode("ptq-static-int8", family=FAMILY, quantize=quantize_ptq, plugin=_PLUGIN, options={"static": True},
              description="PTQ: int8 weights and calibrated int8 activations (Linear, Conv; BN folded)")  # fmt: skip

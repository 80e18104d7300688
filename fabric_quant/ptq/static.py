"""Static post-training quantization: calibrate activation ranges with observers, then convert to int8.

Built from the QAT library with training left out: :func:`~fabric_quant.qat.prepare_qat` inserts the observers
and fuses Conv-BN(-ReLU) / Linear-ReLU, calibration batches run with fake quantization off (observers only), and
:func:`fabric_quant.qat.convert` produces the int8 model (oneDNN int8 convolutions on the ``x86`` backend, with
uint8 activations passed between consecutive convolutions).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sized

import torch
from tqdm.auto import tqdm

from fabric_quant.calibration import call_model, check_finite_batch
from fabric_quant.kernels import select_backend
from fabric_quant.qat.convert import convert
from fabric_quant.qat.layers import FakeQuantLayer
from fabric_quant.qat.prepare import enable_fake_quant, prepare_qat

_EMPTY = "calibration_data is empty: static quantization needs at least one batch of inputs"


def quantize_static(
    model: torch.nn.Module,
    calibration_data: Iterable,
    *,
    mode: str = "qat-int8-static",
    observer: str = "minmax",
    fuse: bool = True,
    embeddings: bool = True,
    backend: str = "auto",
    ignore_modules: Iterable[str] | None = None,
    progress: bool = True,
    inplace: bool = False,
    **overrides,
) -> torch.nn.Module:
    """Return an int8 copy of ``model`` (Linear, Conv1d/2d; BatchNorm folded) with calibrated activation scales.

    Args:
        calibration_data: batches of model inputs (see :func:`fabric_quant.calibration.call_model`); a few
            hundred samples usually do.
        mode: the ``qat`` scheme whose observers are calibrated (default ``qat-int8-static``; a dynamic-activation
            mode calibrates nothing and quantizes its weights only: the PTQ control of a QAT run).
        observer: ``minmax``, ``moving_average``, ``percentile`` (99.99 %) or ``mse`` (error-minimising clip).
        fuse: fold Conv-BN(-ReLU) and fuse Linear-ReLU inside nn.Sequential containers.
        embeddings: also store Embedding tables as int8 rows with a scale each (weight-only).
        backend: ``auto``, ``x86`` (oneDNN int8) or ``reference`` (portable); see :mod:`fabric_quant.kernels`.
        ignore_modules: module-name prefixes kept in float.
        progress: show a progress bar over the calibration batches.
        inplace: quantize ``model`` itself (the options are validated first; calibration data that turns out
            to be empty or to miss layers then leaves it prepared but unconverted) instead of a deep copy.
        overrides: fields of the mode's :class:`~fabric_quant.qat.QATConfig`, e.g. ``per_channel=False`` (one
            weight scale per tensor) or ``weight_bits=4`` (int4 values on the same int8 kernels, packed on disk).
    """
    backend = select_backend(backend)
    if isinstance(calibration_data, Sized) and len(calibration_data) == 0:
        raise ValueError(_EMPTY)
    work = prepare_qat(
        model if inplace else copy.deepcopy(model), mode, observer=observer, fuse=fuse, embeddings=embeddings,
        ignore_modules=ignore_modules, **overrides,
    )  # fmt: skip  (validates before changing anything)
    enable_fake_quant(work, False)  # observers record float activations
    work.eval()
    batches = 0
    with torch.no_grad():
        for batch in tqdm(calibration_data, desc="calibrating", unit="batch", disable=not progress, leave=False):
            check_finite_batch(batch, batches)
            call_model(work, batch)
            batches += 1
    if batches == 0:
        raise ValueError(_EMPTY)
    missed = [
        name for name, m in work.named_modules()
        if isinstance(m, FakeQuantLayer) and m.act_observer is not None and not m.act_observer.calibrated
    ]  # fmt: skip
    if missed:
        raise ValueError(
            f"calibration never reached {missed}: their activation ranges are unknown. Feed inputs that run every"
            " layer, or keep those layers in float with ignore_modules"
        )
    return convert(work, inplace=True, backend=backend)

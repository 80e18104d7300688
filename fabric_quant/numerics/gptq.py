"""GPTQ for ``woq-int4`` (``scale_search="gptq"``): codes chosen against the layer's inputs, not only its weights.

Rounding each weight to its nearest code (``none`` / ``mse``) minimises the weight error; what matters is the
output error ``||X W^T - X Q^T||`` on the inputs ``X`` the layer sees. GPTQ (Frantar et al., 2022, as in the
reference implementation's ``fasterquant``) quantizes the input columns in order and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse of the inputs' second moment ``H = X^T X``, so
the later codes compensate the earlier errors. Groups follow the library's int4 format exactly (asymmetric,
``w = (q - 8) * s + z``, bf16 scale and zero per group, codes rounded against the stored bf16 values): a group's
scale and zero are taken from its columns as updated when its first column comes up, so kernels, checkpoints and
the reference path are unchanged. Needs calibration batches run through the model (:func:`collect_hessians`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from tqdm.auto import tqdm

DAMP = 0.01
"""Added to the diagonal of ``H``, times its mean: keeps the Cholesky factorisation stable (the reference's
default)."""
HESSIAN_BYTES = 1 << 30
"""The calibration batches are run once per set of layers whose fp32 ``H`` matrices fit in this many bytes: a 1B
Llama's 112 matrices take 5.9 GB, so they are collected in several passes, layers in model order (later passes see
the earlier layers already quantized, as sequential GPTQ does)."""


def collect_hessians(
    model: torch.nn.Module, names: Sequence[str], batches: Sequence, call: Callable, progress: bool = False
) -> dict[str, torch.Tensor]:
    """``H = X^T X / rows`` (fp32) of the inputs each named Linear receives over ``batches`` (``call(model, batch)``
    runs one)."""
    sums = {n: None for n in names}
    rows = dict.fromkeys(names, 0)

    def hook(module, args, name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        sums[name] = x.t() @ x if sums[name] is None else sums[name].addmm_(x.t(), x)
        rows[name] += x.shape[0]

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="GPTQ calibration", disable=not progress, leave=False):
                call(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    missed = [n for n in names if sums[n] is None]
    if missed:
        raise ValueError(f"the calibration batches never reached {missed[:3]}{'...' if len(missed) > 3 else ''}:"
                         " GPTQ needs every quantized layer's inputs")  # fmt: skip
    narrow = [n for n in names if rows[n] < model.get_submodule(n).in_features]
    if narrow:
        fewest = min(rows[n] for n in narrow)
        warnings.warn(f"GPTQ calibration: {narrow[:3]}{'...' if len(narrow) > 3 else ''} saw fewer input rows"
                      f" ({fewest}) than input features: their H is rank-deficient, so the codes may fit the"
                      " calibration batches rather than the layer; give more tokens", stacklevel=3)  # fmt: skip
    return {n: sums[n] / rows[n] for n in names}


def hessian_passes(shapes: dict[str, int], budget: int | None = None) -> list[list[str]]:
    """The layers (name -> in_features, in model order) split into consecutive runs whose ``H`` fit ``budget``
    (default: :data:`HESSIAN_BYTES`, read at the call)."""
    budget = HESSIAN_BYTES if budget is None else budget
    passes, current, used = [], [], 0
    for name, width in shapes.items():
        size = 4 * width * width
        if current and used + size > budget:
            passes.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return passes + ([current] if current else [])


def gptq_int4(
    weight: torch.Tensor, hessian: torch.Tensor, group_size: int, qparams: Callable, codes: Callable
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 codes ``(out, in_padded)`` (uint8 0..15), bf16 scales and zeros ``(out, groups)`` of ``weight`` for
    inputs of second moment ``hessian``. ``qparams(lo, hi) -> (scale, zero)`` and ``codes(groups, scale, zero)``
    are the library's own (``fabric_quant.nn.woq``), so the format is the plain path's."""
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    pad = -in_f % group_size
    h = hessian.detach().float().clone()
    if pad:  # padded columns repeat the last one (as the plain path) and take no error from the real ones
        w = F.pad(w[None], (0, pad), mode="replicate")[0]
        h = torch.block_diag(h, torch.eye(pad))
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0  # an input never active: nothing to compensate against, quantized as is
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMP * torch.diagonal(h).mean())
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads over the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(out_f, cols, dtype=torch.uint8)
    scales, zeros = [], []
    for start in range(0, cols, group_size):  # one group per block: its range is read from the updated columns
        stop = start + group_size
        block = w[:, start:stop].clone()
        scale, zero = qparams(block.amin(1), block.amax(1))
        s, z = scale.float(), zero.float()
        errors = torch.empty_like(block)
        block_inv = hinv[start:stop, start:stop]
        for i in range(group_size):
            col = block[:, i]
            code = codes(col[:, None], scale, zero)[:, 0]
            err = (col - ((code - 8) * s + z)) / block_inv[i, i]
            block[:, i:] -= err[:, None] * block_inv[i, i:][None, :]
            errors[:, i] = err
            q[:, start + i] = code.to(torch.uint8)
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
        scales.append(scale)
        zeros.append(zero)
    return q, torch.stack(scales, 1), torch.stack(zeros, 1)

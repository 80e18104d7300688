"""The CPU kernel of ``woq-int8`` layers: oneDNN's int8 GEMM, the float activations split into two int8 terms.

Why: decoding at batch 1 streams every weight from memory once per token, so a layer's time is its weight bytes
over the memory bandwidth the kernel sustains. ``python benchmarks/int8_stream.py`` (2 threads, 16 distinct
2048 x 8192 layers in turn, so a call rarely finds its weight in cache; one run): bf16 ``F.linear`` 20.6 GB/s,
ATen's ``torch._weight_int8pack_mm`` 13.1 GB/s (it converts every int8 weight to float, compute-bound at 2 cores),
oneDNN's int8 x int8 GEMM (``torch.ops.onednn.qlinear_pointwise`` on a prepacked weight, AMX / VNNI) 21.2-21.3 GB/s,
at 1, 2 or 4 rows alike.

Weight-only numbers from an int8 x int8 GEMM: each activation row ``x`` is written as ``s1 * q1 + s2 * q2`` with
``q1 = round(x / s1)``, ``s1 = absmax(x) / 127`` and ``q2`` the rounded remainder on the grid ``s2 = s1 / 254``, so
``|x - s1 q1 - s2 q2| <= s2 / 2 = absmax(x) / 64516``: about 16 bits, finer than bf16 activations (8 significant
bits) for every element above 1/128 of the row's largest. Both terms go through one GEMM as rows ``[q1; q2]`` (one
pass over the weight); the int32 sums are exact, and ``y = s1 * (q1 W^T) * w_scale + s2 * (q2 W^T) * w_scale``.
A non-finite activation makes its row's output non-finite, as a float product would.

Eager, the weight is prepacked once per layer (oneDNN's blocked layout: a second copy of the codes, 1 byte per
weight, never saved; ``to_dense()`` recovers the canonical codes exactly). Under ``fabric_quant.kernels.
compile_model`` the product is written as ``torch._int_mm -> float -> * row scales -> * weight scales``, the
pattern inductor's freezing passes lower to the same oneDNN op with the prepacking done at compile time (and that
``autotune=True`` benchmarks against inductor's own int8 GEMM template).

Small layers keep ``torch._weight_int8pack_mm`` (:func:`suits`). ``python benchmarks/int8_stream.py --copies 1
--repeats 51`` with one layer in cache, one run each: 384 -> 1536 takes 28-29 us in oneDNN's op against 16 us in
ATen's; below 256 output features oneDNN's op is pathologically slow in torch 2.13 (2048 -> 128: 3.3 ms at 1 row,
6.7 ms at the split path's 2 rows, against 8 us).
"""

from __future__ import annotations

import numpy
import torch

from fabric_quant.nn.onednn_linear import (
    compiled_uint8_kernel,
    int_mm_rescaled,
    non_finite_ok,
    numpy_row,
    onednn_linear_available,
    packed_on,
    qlinear,
)

MIN_OUT_FEATURES = 256
"""Below this many outputs oneDNN's int8 GEMM is slower than ATen's kernel by orders of magnitude (torch 2.13)."""
MIN_WEIGHTS = 1 << 20
"""Smaller weights stay in cache between calls; there the op's fixed cost outweighs its bandwidth (2048 x 512 and
up take it: the K/V projections of a 1B Llama)."""
_EPS = torch.finfo(torch.float32).eps
_AVAILABLE = onednn_linear_available()  # read once: dynamo cannot trace torch.backends' probes (graph break)


def suits(in_features: int, out_features: int) -> bool:
    """Whether a CPU ``woq-int8`` layer of this shape runs the split int8 GEMM. Under ``torch.compile`` it is
    :func:`linear_op` where activations go in as uint8 (no AMX); with AMX only with inductor's freezing on
    (``compile_model``): without it ``torch._int_mm`` would run as it is, slower than ATen's weight-only kernel."""
    if out_features < MIN_OUT_FEATURES or in_features * out_features < MIN_WEIGHTS or not _AVAILABLE:
        return False
    if torch.compiler.is_compiling() and not compiled_uint8_kernel():
        import torch._inductor.config as inductor_config

        return bool(inductor_config.freezing)
    return True


def split_codes(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` (m, k) float -> int8 codes (2m, k) ``[q1; q2]`` and their fp32 scales (2m, 1) ``[s1; s2]``."""
    x = rows.float()
    s1 = x.abs().amax(1, keepdim=True).clamp(min=_EPS) / 127
    q1 = torch.round(x / s1)  # within [-127, 127]: |x| <= absmax
    s2 = s1 / 254
    q2 = torch.clamp(torch.round((x - q1 * s1) / s2), -127, 127)  # |remainder| <= s1 / 2, up to float rounding
    return torch.cat([q1, q2]).to(torch.int8), torch.cat([s1, s2])


def linear(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, packed: torch.Tensor | None
           ) -> torch.Tensor:
    """``rows @ (qweight * scales[:, None])^T`` in fp32. ``packed``: ``qlinear_prepack(qweight)`` (eager), or
    None while compiling (inductor packs the constant weight itself where it lowers the product)."""
    if packed is not None and rows.shape[0] == 1:
        return _one_row(rows, packed, scales)
    q, s = split_codes(rows)
    if packed is None:
        out = int_mm_rescaled(q, qweight.t(), s, scales)
    else:
        out = qlinear(q, 1.0, packed, scales, None, torch.float32).mul_(s)
    m = rows.shape[0]
    return out[:m] + out[m:]


def _one_row(rows: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # Decoding at batch 1, eager: the same fp32 operations as split_codes and the rescale, in numpy. Between two
    # GEMMs that streamed their weights through the caches every call runs cold, and numpy's calls are shorter
    # than ATen's dispatch (onednn_linear._one_token, benchmarks/cold_ops.py); this path made about 20 ATen calls.
    x, s1 = numpy_row(rows)
    s2 = s1 / numpy.float32(254)
    with non_finite_ok(s1):
        q1 = numpy.rint(x / s1)
        q2 = numpy.clip(numpy.rint((x - q1 * s1) / s2), -127, 127)
        q = torch.from_numpy(numpy.concatenate([q1, q2]).astype(numpy.int8))
        out = qlinear(q, 1.0, packed, scales, None, torch.float32).numpy()
        return torch.from_numpy(out[:1] * s1 + out[1:] * s2)



@torch.library.custom_op("fabric_quant::split_int8_linear", mutates_args=())
def linear_op(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`linear` with the weight packed on first use, as one op: what compiled graphs call without AMX
    (``onednn_linear.compiled_uint8_kernel``)."""
    return linear(rows.contiguous(), qweight, scales, packed_on(qweight))


@linear_op.register_fake
def _(rows, qweight, scales):
    return rows.new_empty(rows.shape[0], qweight.shape[0], dtype=torch.float32)

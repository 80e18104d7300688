"""The eager CPU kernel of dynamic int8 Linear layers: oneDNN's int8 GEMM on a weight packed once.

Same numerics as :meth:`fabric_quant.nn.Int8Linear._dynamic_int8` (the ``torch._int_mm`` reference, which
``compile_model`` lowers): the same symmetric per-token activation codes, int8 x int8 -> int32 products, scaled by
the weight scales and the token scales. Only the float rounding order of the rescale differs (oneDNN multiplies
the int32 sum by the weight scale in fp32 before the token scale is applied), a few ulps.

Where eager time went (torch.profiler, all-MiniLM-L6-v2, 2 threads): not the GEMM but the elementwise ops around
it (per-token quantization: abs, amax, clamp, mul, round, clamp, cast; the rescale: int32 -> float, two muls,
a bias add), each a pass over the activations plus a fresh allocation. Here: the activations are quantized in
fewer passes (no redundant clamp: ``round(x * 127 / absmax)`` is within [-127, 127] by construction), and
``torch.ops.onednn.qlinear_pointwise`` (a maintained ATen op, the one inductor's freezing pass emits for this same
pattern) applies the weight scales inside the GEMM and writes float directly, so the rescale is one
``addcmul`` (token scale and bias).

The packed weight is derived state: built on the first call, never saved (checkpoints keep the plain int8 codes
and stay bit-exact), dropped when the layer's buffers change or the module is copied.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy
import torch

from fabric_quant.nn.cpu_isa import int8_gemm, is_x86, kernel_codes, signed_activations

_EPS = torch.finfo(torch.float32).eps
# Past this many elements, two reductions (amax, amin) beat abs-then-amax (one pass that writes a temporary);
# below it the extra op's dispatch costs more than the pass it saves (timed ad hoc, 2 threads).
_MINMAX_FROM = 1 << 16


@functools.cache
def onednn_linear_available() -> bool:
    """True when oneDNN's int8 Linear ops exist and this is an x86 CPU with exact fast kernels for them (AMX, or
    VNNI with uint8 activations: :func:`fabric_quant.nn.cpu_isa.int8_gemm`)."""
    has_ops = hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack")
    return is_x86() and has_ops and torch.backends.mkldnn.is_available() and int8_gemm() != "float"


def qlinear(q: torch.Tensor, x_scale: float, packed: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype, post_op: str = "none") -> torch.Tensor:
    """oneDNN's int8 GEMM of the fresh signed codes ``q`` (shifted in place to uint8 where the CPU has no fast
    signed kernel: :func:`fabric_quant.nn.cpu_isa.kernel_codes`) with the packed weight: ``(q @ W^T) * x_scale *
    w_scale (+ bias, post_op)`` in ``dtype``. The one call site of the op, so every path picks its encoding here."""
    q, zero_point = kernel_codes(q)
    return torch.ops.onednn.qlinear_pointwise(
        q, x_scale, zero_point, packed, w_scale, None, bias, 1.0, 0, dtype, post_op, [], ""
    )


def quantize_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes and scales (shape (rows, 1), fp32) of a 2-D float tensor: the same codes and
    scales as :func:`fabric_quant.numerics.quant.fake_quant_per_token` (absmax / 127, multiply by the reciprocal,
    round half to even), in fewer passes."""
    if rows.numel() >= _MINMAX_FROM:
        absmax = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
    else:
        absmax = rows.abs().amax(1, keepdim=True)
    scale = absmax.float().clamp_(min=_EPS).div_(127)
    scaled = torch.mul(rows, scale.reciprocal())  # fp32 (a bf16 input is promoted exactly, as .float() does)
    return scaled.round_().to(torch.int8), scale


class KernelCache(dict):
    """Derived kernel state (the packed weight): never deep-copied or pickled, rebuilt on first use."""

    def __deepcopy__(self, memo) -> KernelCache:
        return KernelCache()

    def __reduce__(self):
        return (KernelCache, ())


def packed_weight(cache: KernelCache, layers) -> tuple[torch.Tensor, torch.Tensor]:
    """oneDNN's packed copy of the int8 weights of ``layers`` (``Int8Linear``s reading one input; one layer, or
    siblings stacked by output rows) and their fp32 per-output-channel scales, built once and rebuilt when the
    buffers are replaced or edited in place (their data pointers and version counters are the key; a
    ``load_state_dict`` copies into them in place, which bumps the version)."""
    key = tuple((t.data_ptr(), _version(t)) for m in layers for t in (m.qweight, m.weight_scale))
    if cache.get("key") != key:
        weight = torch.cat([m.int8_weight() for m in layers]) if len(layers) > 1 else layers[0].int8_weight()
        # no input shape: one packing serves every batch size (timed: packing for the exact shape was no faster)
        cache["packed"] = torch.ops.onednn.qlinear_prepack(weight, None)
        cache["scale"] = torch.cat([m.weight_scale.detach().float().expand(m.out_features) for m in layers])
        cache["key"] = key
    return cache["packed"], cache["scale"]


def _version(t: torch.Tensor) -> int:
    # tensors made under inference_mode (a model copied or loaded there) have no version counter; they can only be
    # edited in place under inference_mode too, which this key then cannot see (their data pointer still counts)
    return -1 if t.is_inference() else t._version


def dynamic_int8_linear(
    rows: torch.Tensor,
    packed: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    relu: bool = False,
) -> torch.Tensor:
    """``rows`` (2-D float) @ the packed int8 weight^T with per-token int8 activations, in ``dtype`` (+ ReLU)."""
    if rows.shape[0] == 1:
        return _one_token(rows, packed, w_scale, bias, dtype, relu)
    q, scale = quantize_per_token(rows)
    out = qlinear(q, 1.0, packed, w_scale, None, dtype)  # = int32 sum * w_scale, in dtype
    if dtype != torch.float32:
        scale, bias = scale.to(dtype), None if bias is None else bias.to(dtype)
    # in place on the GEMM's fresh output: no second M x N buffer (timed 4-22 % faster on MiniLM's shapes)
    out = out.mul_(scale) if bias is None else torch.addcmul(bias, out, scale, out=out)
    return out.relu_() if relu else out


def numpy_row(rows: torch.Tensor) -> tuple[numpy.ndarray, numpy.float32]:
    """A one-row tensor as an fp32 numpy array (no copy when it already is fp32) and its symmetric int8 scale,
    ``absmax / 127`` clamped as :func:`quantize_per_token` does, in the same fp32 arithmetic."""
    if rows.dtype != torch.float32 or rows.requires_grad:
        rows = rows.detach().float()
    values = rows.numpy()
    return values, numpy.float32(max(float(numpy.abs(values).max()), _EPS)) / numpy.float32(127)


def one_row_codes(rows: torch.Tensor) -> tuple[torch.Tensor, numpy.float32]:
    """The int8 codes and scale of a one-row tensor, those of :func:`quantize_per_token`, computed in numpy (the
    one-row path's quantization; see :func:`_one_token`)."""
    values, scale = numpy_row(rows)
    with non_finite_ok(scale):
        return torch.from_numpy(numpy.rint(values * (numpy.float32(1) / scale)).astype(numpy.int8)), scale


def non_finite_ok(scale: numpy.float32):
    """Silences numpy's invalid-value warnings when a row's ``scale`` is not finite (a NaN or inf in the row: its
    codes are garbage, as ATen's cast gives, and its output non-finite through the scale). A finite scale bounds
    every code, so the hot path skips ``errstate``: it took 3 us, against 8 us for the rest of a warm one-row
    quantization (timed ad hoc)."""
    return contextlib.nullcontext() if math.isfinite(scale) else numpy.errstate(invalid="ignore")


def _one_token(rows, packed, w_scale, bias, dtype, relu) -> torch.Tensor:
    # One row (decoding, batch 1): its per-token scale is a per-tensor scale, which oneDNN takes by value, so
    # the token scale, bias and ReLU all run inside the GEMM. The scale is computed in fp32 arithmetic exactly as
    # the tensor path does it (clamp, / 127, reciprocal: IEEE-rounded in numpy.float32), so the codes are the same.
    # The codes are computed in numpy, and no ATen call is made that does not compute: between two GEMMs that
    # streamed their weights through the caches every call here runs cold (its code and data come from L3), and
    # numpy's calls are shorter than ATen's dispatch (`python benchmarks/cold_ops.py`, 4096 wide, 2 threads:
    # 80-83 against 105-109 us after the GEMM, 12-15 against 26-28 us warm; two runs).
    q, scale = one_row_codes(rows)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return qlinear(q, float(scale), packed, w_scale, bias, dtype, "relu" if relu else "none")


def int_mm_rescaled(q: torch.Tensor, weight_t: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q @ weight_t) * x_scale * w_scale`` in ``dtype``, the form a compiled graph traces. With AMX it is exactly
    inductor's ``_int_mm -> convert -> mul -> mul`` pattern (fx_passes/quantization.py), which freezing lowers to
    oneDNN's signed int8 GEMM. Without AMX that GEMM runs oneDNN's reference loop (``cpu_isa``), so the two scales
    are multiplied first: the pattern no longer matches and ATen's ``_int_mm`` runs, the rescale fused after it."""
    acc = torch._int_mm(q, weight_t).to(dtype)
    if signed_activations():
        return acc * x_scale.to(dtype) * w_scale.to(dtype)
    return acc * (x_scale.to(dtype) * w_scale.to(dtype))


# -- compiled graphs without AMX -----------------------------------------------------------------------------------
# Inductor lowers the ``_int_mm`` pattern to oneDNN's *signed* int8 GEMM, a reference loop without AMX; with the
# scales pre-multiplied (int_mm_rescaled) ATen's ``_int_mm`` runs instead, slower than the eager uint8 kernel
# (compiled ptq-dynamic-int8 MiniLM measured 0.87x eager fp32 against eager's 1.89x, AMD EPYC Zen 4). So where
# activations go in as uint8, compiled graphs call the eager kernel itself as one opaque op: inductor fuses what is
# around it and the GEMM is the one eager runs. The op packs the weight on its first call and keeps the packed copy
# on the weight tensor it was given (a frozen constant under compile_model: the same object every call).


@torch.compiler.assume_constant_result  # fixed per process (the ISA caps are read when torch loads)
def compiled_uint8_kernel() -> bool:
    """Whether compiled graphs call the eager uint8 kernel as an op (VNNI without AMX) instead of the traced
    ``_int_mm`` form."""
    return onednn_linear_available() and not signed_activations()


def packed_on(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of an int8 weight, kept on the tensor itself and rebuilt when its data changes."""
    key = (weight.data_ptr(), _version(weight))
    held = getattr(weight, "_fq_onednn_packed", None)
    if held is None or held[0] != key:
        held = (key, torch.ops.onednn.qlinear_prepack(weight, None))
        weight._fq_onednn_packed = held
    return held[1]


@torch.library.custom_op("fabric_quant::dynamic_int8_linear", mutates_args=())
def dynamic_int8_op(rows: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    dtype: torch.dtype, relu: bool) -> torch.Tensor:  # fmt: skip
    """:func:`dynamic_int8_linear` on an int8 weight ``(out, in)`` and fp32 scales ``(out,)``, as one op."""
    return dynamic_int8_linear(rows.contiguous(), packed_on(weight), w_scale, bias, dtype, relu)


@dynamic_int8_op.register_fake
def _(rows, weight, w_scale, bias, dtype, relu):
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=dtype)

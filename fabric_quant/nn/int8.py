"""Real int8 (and packed int4) layers: Linear, Conv1d/2d, Embedding, each built from float tensors plus an
:class:`Int8Config` by ``from_float(...)``.

Linear: int8 weights (4-bit ones packed two per byte) with per-channel (or per-tensor) scales; int8 activations
quantized per token (dynamic, symmetric) or with a calibrated scale (static); the product runs as an int8 x int8
-> int32 matmul (`torch._int_mm`, a maintained core op) rescaled in float, which inductor lowers to oneDNN's int8
GEMM under `fabric_quant.kernels.compile_model`. Shapes that op cannot take (on CUDA), and per-group weights, run
the float reference path (dequantized weight, same activation rounding): same numbers, no integer speed-up.
Eager on an x86 CPU, dynamic layers run oneDNN's int8 GEMM on a weight packed once instead
(:mod:`fabric_quant.nn.onednn_linear`: same codes, the rescale fused; several times fewer elementwise passes).
Conv: int8 weights (BatchNorm folded in by the caller); static-activation Conv2d on the ``x86`` backend runs
oneDNN's int8 convolution, everything else computes in float from the dequantized weight (storage saving only).
Embedding: int8 rows with a scale each; a lookup gathers and rescales only the rows it reads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from fabric_quant.nn.base import QuantizedLinear, Storage, derived
from fabric_quant.nn.cpu_isa import int8_gemm
from fabric_quant.nn.onednn_linear import (
    KernelCache,
    compiled_uint8_kernel,
    dynamic_int8_linear,
    dynamic_int8_op,
    int_mm_rescaled,
    onednn_linear_available,
    packed_weight,
)
from fabric_quant.numerics.quant import (
    VALID_BITS,
    absmax_scale,
    fake_quant,
    fake_quant_per_token,
    group_view,
    per_token_scale,
    qrange,
)

ACTIVATIONS = ("dynamic", "static", "none")


@torch.compiler.assume_constant_result  # fixed per process: dynamo need not trace the cached ISA probe
def _no_int8_gemm() -> bool:
    return int8_gemm() == "float"


@dataclass(frozen=True)
class Int8Config:
    """What a converted layer stores and how it treats its input."""

    bits: int = 8
    """4 or 8: symmetric integer weights (4-bit values packed two per byte in the checkpoint)."""
    group_size: int | None = None
    """None: one scale per output channel; else one per group of this many input elements."""
    per_channel: bool = True
    """False: one weight scale for the whole tensor."""
    activations: Literal["dynamic", "static", "none"] = "dynamic"
    """`dynamic` (per-token scale on the fly), `static` (calibrated scale and zero point), `none` (weight-only)."""

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported. Valid choices: {VALID_BITS}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations={self.activations!r} is not supported. Valid choices: {ACTIVATIONS}")


def quantize_rows(weight: torch.Tensor, config: Int8Config, scale: torch.Tensor | None = None):
    """Integer codes and scales of ``weight`` (one scale per row of :func:`group_view`); ``scale`` overrides the
    absmax scale (e.g. one learned by LSQ)."""
    rows = group_view(weight.detach().float(), config.group_size, config.per_channel)
    qmin, qmax = qrange(config.bits, symmetric=True)
    scale = scale.detach().float() if scale is not None else absmax_scale(rows, config.bits)
    return torch.clamp(torch.round(rows / scale[:, None]), qmin, qmax).to(torch.int8), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte (low nibble first)."""
    flat = (q.reshape(-1) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    both = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel].to(torch.int8)
    return torch.where(both > 7, both - 16, both)


class _Int8Weight(QuantizedLinear):
    """Packed weight buffers and their dequantization, shared by the Linear, Conv and Embedding layers."""

    storage_keys = ("qweight", "weight_scale")

    def _set_weight(self, weight: torch.Tensor, config: Int8Config, scale: torch.Tensor | None = None) -> None:
        q, scale = quantize_rows(weight, config, scale)
        self.bits, self.group_size, self.per_channel = config.bits, config.group_size, config.per_channel
        self.fq_mode = f"int{config.bits}-converted"
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("qweight", pack_int4(q) if config.bits == 4 else q.reshape(weight.shape))
        self.register_buffer("weight_scale", scale)
        self._clear_caches()

    def _clear_caches(self) -> None:
        # derived from the weights, built on first use: "int8" (int4 unpacked), "row_sums", ("float", dtype)
        self._cache: dict = {}

    def int8_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight
        # unpacked once; the state dict keeps the packed bytes
        return derived(self._cache, "int8",
                       lambda: unpack_int4(self.qweight, math.prod(self.weight_shape)).reshape(self.weight_shape))

    def row_sums(self) -> torch.Tensor:
        """Sum of each int8 weight row (int32), for the activation zero-point correction; computed once."""
        return derived(self._cache, "row_sums", lambda: self.int8_weight().sum(1, dtype=torch.int32))

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_caches()
        result = super()._load_from_state_dict(*args, **kwargs)
        if "qweight_t" in self._buffers:  # re-point the view at the loaded (possibly replaced) weight
            self._buffers["qweight_t"] = self.int8_weight().t()
        return result

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the float kernels (convolutions, per-group Linear), built once per dtype and
        kept: the checkpoint stays int8/int4, the float copy only lives in memory next to it."""
        return derived(self._cache, ("float", dtype), lambda: self.dequantized_weight().to(dtype))

    def is_quantized(self) -> bool:
        return True

    def dequantized_weight(self) -> torch.Tensor:
        rows = group_view(self.int8_weight().float(), self.group_size, self.per_channel)
        return (rows * self.weight_scale[:, None]).reshape(self.weight_shape)

    def weight_storage(self) -> Storage:
        nbytes = self.qweight.numel() * self.qweight.element_size() + self.weight_scale.numel() * 4
        return Storage(numel=math.prod(self.weight_shape), per_weight_bytes=nbytes, table_bytes=0)

    def _set_activation(self, activations: str, act_qparams: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Static activations need the calibrated scale and zero point of the layer's input."""
        self.activations = activations
        if activations != "static":
            return
        if act_qparams is None:
            raise ValueError("activations='static' needs act_qparams=(scale, zero_point) of the layer's input")
        scale, zero_point = act_qparams
        self.register_buffer("act_scale", scale.detach().reshape(()).float())
        self.register_buffer("act_zero_point", zero_point.detach().reshape(()).to(torch.int32))

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "dynamic":
            return fake_quant_per_token(x)
        if self.activations == "static":
            return fake_quant(x, self.act_scale, self.act_zero_point, 0, 255)
        return x


# Below about a million multiply-adds the integer path's fixed costs (quantize, int32 -> float, rescale) exceed a
# float matmul on the cached dequantized weight (timed ad hoc on the CI machine, 2 threads: a classifier head at
# batch 1 was faster in float, a 384 x 384 layer on 8 rows a tie; the benchmark tables show the whole models).
SMALL_MATMUL = 1 << 20


class Int8Linear(_Int8Weight, torch.nn.Module):
    eager_kernel: bool = True
    """Run dynamic layers on oneDNN's packed int8 GEMM in eager mode on x86 CPUs (False: the ``torch._int_mm``
    reference everywhere; set it on the class or on one layer)."""
    _siblings = None  # a SiblingGroup (nn/int8_siblings.py) when this layer shares its input with others

    @classmethod
    def from_float(
        cls,
        linear: torch.nn.Linear,
        config: Int8Config | None = None,
        *,
        weight_scale: torch.Tensor | None = None,
        act_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        relu: bool = False,
    ) -> Int8Linear:
        """``weight_scale`` overrides the absmax scales; ``act_qparams`` = (scale, zero point) for static
        activations; ``relu`` fuses a following ReLU."""
        config = config or Int8Config()
        new = cls()
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new._set_weight(linear.weight, config, weight_scale)
        new.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(), False)
        new.relu = relu
        new._set_activation(config.activations, act_qparams)
        # the (in, out) layout torch._int_mm takes: a view of the int8 buffer (no copy), not saved
        new.register_buffer("qweight_t", new.int8_weight().t(), persistent=False)
        return new

    def _integer_ok(self, x: torch.Tensor) -> bool:
        if self.activations == "none" or self.group_size is not None:
            return False  # weight-only, or per-group scales (they do not factor out of the matmul)
        rows = x.numel() // self.in_features
        if rows * self.in_features * self.out_features < SMALL_MATMUL:
            return False  # same numbers (up to float rounding) from a float matmul on the dequantized weight
        if x.device.type == "cpu" and _no_int8_gemm():
            return False  # no VNNI: every int8 GEMM torch reaches saturates its int16 sums (nn/cpu_isa.py)
        # CUDA's torch._int_mm takes K and N in multiples of 8 and M > 16 rows; the CPU kernel takes any shape
        return x.device.type == "cpu" or (self.in_features % 8 == 0 and self.out_features % 8 == 0 and rows > 16)

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._kernel = KernelCache()

    def _onednn_ok(self, rows: torch.Tensor) -> bool:
        # not while dynamo traces: compile_model must see the _int_mm pattern its freezing pass lowers (and may
        # autotune against inductor's own GEMM template)
        return (
            not torch.compiler.is_compiling()  # first: dynamo then skips the rest (no graph break on the cache)
            and self.eager_kernel
            and rows.device.type == "cpu"
            and not self._kernel.get("failed")
            and onednn_linear_available()
        )

    def _compiled_op(self, rows: torch.Tensor) -> bool:
        # while dynamo traces, without AMX: the eager uint8 kernel as one op (onednn_linear.compiled_uint8_kernel)
        return (torch.compiler.is_compiling() and self.eager_kernel and rows.device.type == "cpu"
                and compiled_uint8_kernel())  # fmt: skip

    def kernel(self, x: torch.Tensor) -> str:
        """Which kernel an input ``x`` runs (``fabric_quant.kernels.report`` lists them): ``onednn-s8`` /
        ``onednn-u8`` (oneDNN's int8 GEMM, activations signed or shifted to uint8: ``nn/cpu_isa.py``; ``+siblings``
        when one GEMM serves the layers sharing this input), ``int_mm`` (``torch._int_mm`` and a float rescale:
        the reference, and what compiled graphs trace), ``int_mm-static`` or ``float`` (a float matmul on the
        dequantized weight: weight-only, per-group scales, or a product too small to gain)."""
        if not self._integer_ok(x):
            return "float"
        if self.activations != "dynamic":
            return "int_mm-static"
        if not self._onednn_ok(x):
            return "int_mm"
        return int8_gemm() + ("+siblings" if self._siblings is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # no reshapes then: at batch 1 each skipped call saves a cold dispatch (onednn_linear)
        rows = x if flat else x.reshape(-1, self.in_features)
        if not self._integer_ok(x):
            bias = None if self.bias is None else self.bias.to(x.dtype)  # a bf16 rest (ptq-*-bf16) under fp32 input
            out = torch.nn.functional.linear(self._quantize_input(rows), self.compute_weight(x.dtype), bias)
        elif self.activations == "dynamic":  # ReLU applied inside (fused into the kernel where it can be)
            out = self._dynamic_int8(rows)
            return out if flat else out.reshape(*x.shape[:-1], self.out_features)
        else:
            out = self._static_int8(rows.float())
            out = (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.relu:
            out = torch.relu(out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dynamic_int8(self, rows: torch.Tensor) -> torch.Tensor:
        # Symmetric per-token activations: (q_x * s_x) @ (q_w * s_w)^T = (q_x @ q_w^T) * s_x * s_w. Written in
        # exactly this form (int mm -> cast -> mul -> mul -> add bias) because that is the pattern inductor's
        # freezing passes lower to one oneDNN int8 GEMM (AMX / VNNI) under fabric_quant.kernels.compile_model.
        # Eager on x86 the same product runs on oneDNN's GEMM directly (same codes, rescale fused); this form is
        # the reference elsewhere (CUDA, no oneDNN, a refused shape) and what dynamo traces.
        dtype = rows.dtype if rows.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if self._onednn_ok(rows):
            try:
                if self._siblings is not None:  # one GEMM for all the layers reading this input
                    return self._siblings.run(self, rows, dtype)
                packed, w_scale = packed_weight(self._kernel, [self])
                rows = rows if rows.is_contiguous() else rows.contiguous()
                return dynamic_int8_linear(rows, packed, w_scale, self.bias, dtype, self.relu)
            except RuntimeError:  # a shape or build the kernel refuses: the reference below, from now on
                self._kernel["failed"] = True
        elif self._compiled_op(rows):
            w_scale = self.weight_scale.detach().float().expand(self.out_features)
            return dynamic_int8_op(rows, self.int8_weight(), w_scale, self.bias, dtype, self.relu)
        scale = per_token_scale(rows)
        q = torch.clamp(torch.round(rows.float() * (1.0 / scale)), -127, 127).to(torch.int8)  # as fake_quant
        out = int_mm_rescaled(q, self.qweight_t, scale, self.weight_scale, dtype)
        out = out if self.bias is None else out + self.bias.to(dtype)
        return torch.relu(out) if self.relu else out

    def _static_int8(self, rows: torch.Tensor) -> torch.Tensor:
        # x ~ (q - z) * s with q in [0, 255]; shift to int8: q - 128 and z - 128, then
        # (q' - z') @ W^T = q' @ W^T - z' * rowsum(W), computed in int32.
        scale, zero_point = self.act_scale, self.act_zero_point
        q8 = (torch.clamp(torch.round(rows / scale) + zero_point, 0, 255) - 128).to(torch.int8)
        acc = torch._int_mm(q8, self.qweight_t)
        acc = acc - (zero_point - 128).to(torch.int32) * self.row_sums()[None, :]
        return acc.float() * scale * self.weight_scale


class Int8Conv(_Int8Weight, torch.nn.Module):
    """Conv1d/Conv2d with int8 (or int4-valued) weights, ReLU fused.

    With static activations on the ``x86`` backend a Conv2d runs oneDNN's int8 convolution (uint8 activations x
    int8 weights, int32 accumulation, bias/ReLU/requantization fused). When :func:`chain_int8_convs` finds two
    such convs in a row, the first emits uint8 already quantized for the second, so activations stay 8-bit between
    them (static quantization's payoff: no float round trip). Otherwise: float convolution on the dequantized weight.
    """

    @classmethod
    def from_float(
        cls,
        conv: torch.nn.Conv1d | torch.nn.Conv2d,
        config: Int8Config | None = None,
        *,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
        act_qparams: tuple[torch.Tensor, torch.Tensor] | None = None,
        relu: bool = False,
        backend: str = "reference",
    ) -> Int8Conv:
        """``weight`` / ``bias`` replace the conv's own (e.g. with BatchNorm folded in); ``backend`` picks the
        kernel (see :mod:`fabric_quant.kernels`)."""
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode={conv.padding_mode!r} is not supported by int8 convolutions (only 'zeros')")
        config = config or Int8Config(activations="none")
        new = cls()
        new.relu = relu
        new.conv_args = {k: getattr(conv, k) for k in ("stride", "padding", "dilation", "groups")}
        new.dims = 2 if isinstance(conv, torch.nn.Conv2d) else 1
        weight = conv.weight if weight is None else weight
        bias = conv.bias if bias is None and weight is conv.weight else bias
        new._set_weight(weight, config, weight_scale)
        new.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        new._set_activation(config.activations, act_qparams)
        # not without VNNI: oneDNN's int8 convolution halves the weights there to keep its int16 sums from
        # saturating (6 % of the output's range off under ONEDNN_MAX_CPU_ISA=AVX2: tests/test_cpu_dispatch.py)
        new.onednn = (backend == "x86" and new.dims == 2 and new.activations == "static"
                      and not isinstance(conv.padding, str) and int8_gemm() != "float")  # fmt: skip
        new._emit_to: list[Int8Conv] = []  # the next int8 conv, set by chain_int8_convs (a list: no submodule)
        # stride, padding, dilation as the lists oneDNN's ops take, built once rather than on every call
        new._geometry = [list(new.conv_args[k]) for k in ("stride", "padding", "dilation")] if new.onednn else []
        return new

    def _clear_caches(self) -> None:
        super()._clear_caches()
        self._packed: dict[tuple[int, ...], tuple] = {}
        self._act: tuple[float, int] | None = None

    def _act_qparams(self) -> tuple[float, int]:
        """The input's scale and zero point as Python numbers (oneDNN takes them by value; a .item() per call
        costs), read once per load of this layer."""
        if self._act is None:
            self._act = (float(self.act_scale), int(self.act_zero_point))
        return self._act

    def kernel(self, x: torch.Tensor) -> str:
        """``onednn-qconv`` (oneDNN's uint8 x int8 convolution) or ``float`` (on the dequantized weight)."""
        return "onednn-qconv" if self.onednn and x.device.type == "cpu" else "float"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel(x) == "onednn-qconv":
            return self._onednn_forward(x)
        if x.dtype == torch.uint8:  # quantized by the previous conv for this layer's input
            x = (x.float() - self.act_zero_point) * self.act_scale
        conv = torch.nn.functional.conv2d if self.dims == 2 else torch.nn.functional.conv1d
        out = conv(self._quantize_input(x), self.compute_weight(x.dtype), self.bias, **self.conv_args)
        return torch.relu(out) if self.relu else out

    @torch.compiler.disable  # already one fused oneDNN kernel; inductor's re-lowering of it mis-strides outputs
    def _onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._act_qparams()
        if x.dtype != torch.uint8:
            x = torch.clamp(torch.round(x.float() * (1.0 / scale)) + zero_point, 0, 255).to(torch.uint8)
        x = x.contiguous(memory_format=torch.channels_last)
        packed, w_scale, w_zero = self._packed_weight(x.shape, scale, zero_point)
        out_scale, out_zero, out_dtype = 1.0, 0, torch.float32
        if self._emit_to:  # requantize for the next conv's input (read live: a loaded checkpoint updates it)
            (out_scale, out_zero), out_dtype = self._emit_to[0]._act_qparams(), torch.uint8
        return torch.ops.onednn.qconv_pointwise(
            x, scale, zero_point, packed, w_scale, w_zero, self.bias, *self._geometry, self.conv_args["groups"],
            out_scale, out_zero, out_dtype, "relu" if self.relu else "none", [], "",
        )  # fmt: skip

    def _packed_weight(self, shape, scale, zero_point) -> tuple:
        # Packed per input shape: oneDNN picks its kernel (and the weight layout it wants) from the input size;
        # a weight packed without it gets reordered again on every call (ONEDNN_VERBOSE lists the reorder).
        # A few shapes are kept (batch 1 and 8 alternate in the benchmark).
        key = tuple(shape)
        if key not in self._packed:
            if len(self._packed) >= 4:
                self._packed.pop(next(iter(self._packed)))
            w_scale = self.weight_scale.float().expand(self.weight_shape[0]).contiguous()
            packed = torch.ops.onednn.qconv_prepack(
                self.int8_weight(), w_scale, scale, zero_point, *self._geometry, self.conv_args["groups"], list(key),
            )  # fmt: skip
            self._packed[key] = (packed, w_scale, torch.zeros(self.weight_shape[0], dtype=torch.long))
        return self._packed[key]


class Int8Embedding(_Int8Weight, torch.nn.Module):
    """int8 (or packed int4) rows with a scale each; a lookup gathers and rescales only the rows it needs.

    ``out_dtype`` is the dtype of the looked-up rows: the float rest's dtype (``cast_float_rest`` sets it)."""

    @classmethod
    def from_float(cls, emb: torch.nn.Embedding, config: Int8Config | None = None) -> Int8Embedding:
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("int8 Embedding tables with max_norm or sparse gradients are not supported")
        new = cls()
        new.padding_idx = emb.padding_idx
        new._set_weight(emb.weight, config or Int8Config(activations="none"))
        new.activations = "none"  # the input is an index
        new.out_dtype = torch.float32
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return torch.nn.functional.embedding(x, self.compute_weight(self.out_dtype), self.padding_idx)
        # one scale for the whole table, or one per row: only the looked-up rows are rescaled
        scale = self.weight_scale[x].unsqueeze(-1) if self.per_channel else self.weight_scale.reshape(())
        return (self.int8_weight()[x].float() * scale).to(self.out_dtype)


class Uint8MaxPool2d(torch.nn.MaxPool2d):
    """A max pool between two chained int8 convs: it takes their uint8 activations as they are (a max commutes
    with the monotone quantization map). torch's max pool refuses uint8 in channels-last and its NCHW integer
    kernel is slower than a float pool (timed ad hoc), so the common non-overlapping case (kernel == stride) is
    an elementwise max over strided views (rows, then columns), channels-last in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return super().forward(x)
        k = self.kernel_size if isinstance(self.kernel_size, int) else None
        h, w = x.shape[-2:]
        if k is None or self.stride not in (k, (k, k)) or self.dilation not in (1, (1, 1)) or h % k or w % k:
            return super().forward(x.contiguous())
        nhwc = x.permute(0, 2, 3, 1)  # a view; contiguous when x is channels-last (what oneDNN emits)
        rows = functools.reduce(torch.maximum, (nhwc[:, i::k] for i in range(k)))  # max over the kernel's rows
        return functools.reduce(torch.maximum, (rows[:, :, j::k] for j in range(k))).permute(0, 3, 1, 2)


def chain_int8_convs(model: torch.nn.Module) -> None:
    """In each nn.Sequential, an oneDNN Int8Conv followed by another (past Identities and unpadded max pools)
    hands it uint8 directly."""
    for seq in model.modules():
        if not isinstance(seq, torch.nn.Sequential):
            continue
        children = [(n, m) for n, m in seq.named_children() if not isinstance(m, torch.nn.Identity)]
        for i, (_, first) in enumerate(children):
            if not (isinstance(first, Int8Conv) and first.onednn):
                continue
            j = i + 1
            while j < len(children) and _is_plain_max_pool(children[j][1]):
                j += 1
            if j < len(children) and isinstance(children[j][1], Int8Conv) and children[j][1].onednn:
                first._emit_to = [children[j][1]]
                for name, pool in children[i + 1 : j]:
                    if type(pool) is torch.nn.MaxPool2d:
                        kept = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
                        setattr(seq, name, Uint8MaxPool2d(**{k: getattr(pool, k) for k in kept}))


def _is_plain_max_pool(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.MaxPool2d) and not m.return_indices and m.padding in (0, (0, 0))

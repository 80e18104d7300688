"""Conversion of a QAT model to real low-bit storage and integer kernels.

Linear: int8 weights (4-bit ones packed two per byte) with per-channel (or per-tensor) scales; int8 activations
quantized per token (dynamic, symmetric) or with the calibrated scale (static); the product runs as an int8 x int8
-> int32 matmul (`torch._int_mm`, a maintained core op) rescaled in float, which inductor lowers to oneDNN's int8
GEMM under `fabric_quant.kernels.compile_model`. Shapes that op cannot take (on CUDA), and per-group weights, run
the float reference path (dequantized weight, same activation rounding): same numbers, no integer speed-up.
Conv: int8 weights (BatchNorm folded in); static-activation Conv2d on the ``x86`` backend runs oneDNN's int8
convolution, everything else computes in float from the dequantized weight (storage saving only).
Embedding: int8 rows with a scale each; a lookup gathers and rescales only the rows it reads.
"""

from __future__ import annotations

import copy
import functools
import math

import torch

from fabric_quant.layers.base import QuantizedLinear, Storage
from fabric_quant.numerics.quant import fake_quant, fake_quant_per_token, group_view, per_token_scale, qrange
from fabric_quant.qat.layers import QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear


def _quantize_rows(weight: torch.Tensor, bits: int, group_size: int | None, per_channel: bool, learned_scale=None):
    rows = group_view(weight.detach().float(), group_size, per_channel)
    qmin, qmax = qrange(bits, symmetric=True)
    scale = learned_scale.detach().float() if learned_scale is not None else rows.abs().amax(1).clamp(min=1e-8) / qmax
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
    """Packed weight buffers and their dequantization, shared by the converted Linear and Conv layers."""

    storage_keys = ("qweight", "weight_scale")

    def _set_weight(self, weight, cfg, learned_scale=None) -> None:
        bits, group_size, per_channel = cfg.weight_bits, cfg.group_size, cfg.per_channel
        q, scale = _quantize_rows(weight, bits, group_size, per_channel, learned_scale)
        self.bits, self.group_size, self.per_channel = bits, group_size, per_channel
        self.weight_shape = tuple(weight.shape)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q.reshape(weight.shape))
        self.register_buffer("weight_scale", scale)
        self._clear_caches()

    def _clear_caches(self) -> None:
        self._cache, self._row_sums, self._float_cache = None, None, {}

    def int8_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight
        if self._cache is None:  # unpacked once; the state dict keeps the packed bytes
            self._cache = unpack_int4(self.qweight, math.prod(self.weight_shape)).reshape(self.weight_shape)
        return self._cache

    def row_sums(self) -> torch.Tensor:
        """Sum of each int8 weight row (int32), for the activation zero-point correction; computed once."""
        if self._row_sums is None:
            self._row_sums = self.int8_weight().sum(1, dtype=torch.int32)
        return self._row_sums

    def _load_from_state_dict(self, *args, **kwargs):
        self._clear_caches()
        result = super()._load_from_state_dict(*args, **kwargs)
        if "qweight_t" in self._buffers:  # re-point the view at the loaded (possibly replaced) weight
            self._buffers["qweight_t"] = self.int8_weight().t()
        return result

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the float kernels (convolutions, per-group Linear), built once per dtype and
        kept: the checkpoint stays int8/int4, the float copy only lives in memory next to it."""
        if dtype not in self._float_cache:
            self._float_cache[dtype] = self.dequantized_weight().to(dtype)
        return self._float_cache[dtype]

    def is_quantized(self) -> bool:
        return True

    def dequantized_weight(self) -> torch.Tensor:
        rows = group_view(self.int8_weight().float(), self.group_size, self.per_channel)
        return (rows * self.weight_scale[:, None]).reshape(self.weight_shape)

    def weight_storage(self) -> Storage:
        nbytes = self.qweight.numel() * self.qweight.element_size() + self.weight_scale.numel() * 4
        return Storage(numel=math.prod(self.weight_shape), per_weight_bytes=nbytes, table_bytes=0)

    def _set_activation(self, qat) -> None:
        """Calibrated (static) activation scale and zero point of the QAT layer; an LSQ-learned scale wins."""
        self.activations = qat.qat.activations
        if self.activations != "static":
            return
        scale, zero_point = qat.act_observer.qparams()
        if getattr(qat, "act_scale", None) is not None:
            scale = qat.act_scale.detach()
        self.register_buffer("act_scale", scale.reshape(()).float())
        self.register_buffer("act_zero_point", zero_point.reshape(()).to(torch.int32))

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
    def __init__(self, qat: QATLinear) -> None:
        super().__init__()
        cfg = qat.qat
        self.in_features, self.out_features = qat.in_features, qat.out_features
        self.fq_mode = f"int{cfg.weight_bits}-converted"
        self._set_weight(qat.weight, cfg, getattr(qat, "weight_scale", None))
        self.bias = None if qat.bias is None else torch.nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        self.relu = bool(getattr(qat, "relu", False))
        self._set_activation(qat)
        # the (in, out) layout torch._int_mm takes: a view of the int8 buffer (no copy), not saved
        self.register_buffer("qweight_t", self.int8_weight().t(), persistent=False)

    def _integer_ok(self, x: torch.Tensor) -> bool:
        if self.activations == "none" or self.group_size is not None:
            return False  # weight-only, or per-group scales (they do not factor out of the matmul)
        rows = x.numel() // self.in_features
        if rows * self.in_features * self.out_features < SMALL_MATMUL:
            return False  # same numbers (up to float rounding) from a float matmul on the dequantized weight
        # CUDA's torch._int_mm takes K and N in multiples of 8 and M > 16 rows; the CPU kernel takes any shape
        return x.device.type == "cpu" or (self.in_features % 8 == 0 and self.out_features % 8 == 0 and rows > 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self._integer_ok(x):
            out = torch.nn.functional.linear(self._quantize_input(rows), self.compute_weight(x.dtype), self.bias)
        elif self.activations == "dynamic":
            out = self._dynamic_int8(rows)
        else:
            out = self._static_int8(rows.float())
            out = (out if self.bias is None else out + self.bias).to(x.dtype)
        if self.relu:
            out = torch.relu(out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dynamic_int8(self, rows: torch.Tensor) -> torch.Tensor:
        # Symmetric per-token activations: (q_x * s_x) @ (q_w * s_w)^T = (q_x @ q_w^T) * s_x * s_w. Written in
        # exactly this form (int mm -> cast -> mul -> mul -> add bias) because that is the pattern inductor's
        # freezing passes lower to one oneDNN int8 GEMM (AMX / VNNI) under fabric_quant.ptq.compile_model;
        # eager runs it as written.
        dtype = rows.dtype if rows.dtype in (torch.float32, torch.bfloat16) else torch.float32
        scale = per_token_scale(rows)
        q = torch.clamp(torch.round(rows.float() * (1.0 / scale)), -127, 127).to(torch.int8)  # as fake_quant
        out = torch._int_mm(q, self.qweight_t).to(dtype) * scale.to(dtype) * self.weight_scale.to(dtype)
        return out if self.bias is None else out + self.bias.to(dtype)

    def _static_int8(self, rows: torch.Tensor) -> torch.Tensor:
        # x ~ (q - z) * s with q in [0, 255]; shift to int8: q - 128 and z - 128, then
        # (q' - z') @ W^T = q' @ W^T - z' * rowsum(W), computed in int32.
        scale, zero_point = self.act_scale, self.act_zero_point
        q8 = (torch.clamp(torch.round(rows / scale) + zero_point, 0, 255) - 128).to(torch.int8)
        acc = torch._int_mm(q8, self.qweight_t)
        acc = acc - (zero_point - 128).to(torch.int32) * self.row_sums()[None, :]
        return acc.float() * scale * self.weight_scale


class Int8Conv(_Int8Weight, torch.nn.Module):
    """Conv1d/Conv2d with int8 (or int4-valued) weights, BatchNorm folded in, ReLU fused.

    With static activations on the ``x86`` backend a Conv2d runs oneDNN's int8 convolution (uint8 activations x
    int8 weights, int32 accumulation, bias/ReLU/requantization fused). When :func:`convert` finds two such convs
    in a row, the first emits uint8 already quantized for the second, so activations stay 8-bit between them
    (static quantization's payoff: no float round trip). Otherwise: float convolution on the dequantized weight.
    """

    def __init__(self, qat: QATConv1d | QATConv2d, backend: str = "reference") -> None:
        super().__init__()
        cfg = qat.qat
        self.relu = bool(getattr(qat, "relu", False))
        self.fq_mode = f"int{cfg.weight_bits}-converted"
        self.conv_args = {"stride": qat.stride, "padding": qat.padding, "dilation": qat.dilation, "groups": qat.groups}
        self.dims = 2 if isinstance(qat, QATConv2d) else 1
        weight, bias = qat.folded() if isinstance(qat, QATConvBn2d) else (qat.weight, qat.bias)
        self._set_weight(weight, cfg, getattr(qat, "weight_scale", None))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._set_activation(qat)
        if qat.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={qat.padding_mode!r} is not supported by the int8 conversion (only 'zeros')"
            )
        self.onednn = (
            backend == "x86" and self.dims == 2 and self.activations == "static" and not isinstance(qat.padding, str)
        )
        self._emit_to: list[Int8Conv] = []  # the next int8 conv, set by convert() when chained (list: no submodule)
        # stride, padding, dilation as the lists oneDNN's ops take, built once rather than on every call
        self._geometry = [list(self.conv_args[k]) for k in ("stride", "padding", "dilation")] if self.onednn else []

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.device.type == "cpu":
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
    """int8 (or packed int4) rows with a scale each; a lookup gathers and rescales only the rows it needs."""

    def __init__(self, qat: QATEmbedding) -> None:
        super().__init__()
        self.padding_idx, self.activations = qat.padding_idx, "none"  # the input is an index
        self.fq_mode = f"int{qat.qat.weight_bits}-converted"
        self._set_weight(qat.weight, qat.qat)
        self.out_dtype = torch.float32  # the float rest's dtype (set by quantize_dynamic(dtype=...))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return torch.nn.functional.embedding(x, self.compute_weight(self.out_dtype), self.padding_idx)
        # one scale for the whole table, or one per row: only the looked-up rows are rescaled
        scale = self.weight_scale[x].unsqueeze(-1) if self.per_channel else self.weight_scale.reshape(())
        return (self.int8_weight()[x].float() * scale).to(self.out_dtype)


_CONVERTED = {
    QATLinear: Int8Linear,
    QATConv1d: Int8Conv,
    QATConv2d: Int8Conv,
    QATConvBn2d: Int8Conv,
    QATEmbedding: Int8Embedding,
}


class _Uint8MaxPool2d(torch.nn.MaxPool2d):
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


def _chain_int8_convs(model: torch.nn.Module) -> None:
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
                        setattr(seq, name, _Uint8MaxPool2d(**{k: getattr(pool, k) for k in kept}))


def _is_plain_max_pool(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.MaxPool2d) and not m.return_indices and m.padding in (0, (0, 0))


def convert(model: torch.nn.Module, inplace: bool = False, backend: str = "auto") -> torch.nn.Module:
    """The deployable model: every QAT layer replaced by its int8 (or packed int4) version, in eval mode.

    ``backend``: ``auto`` / ``x86`` / ``reference`` (see :mod:`fabric_quant.kernels`); it picks the convolution
    kernel. Linear layers use ``torch._int_mm`` on every backend."""
    from fabric_quant.kernels import select_backend
    from fabric_quant.modules import replace_modules

    backend = select_backend(backend)
    model = model if inplace else copy.deepcopy(model)
    model.eval()

    def build(name, m):
        cls = _CONVERTED[type(m)]
        return cls(m, backend) if cls is Int8Conv else cls(m)

    replace_modules(model, lambda name, m: type(m) in _CONVERTED, build)
    _chain_int8_convs(model)
    return model

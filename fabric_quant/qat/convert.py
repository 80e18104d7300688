"""Conversion of a QAT model to real low-bit storage and integer kernels.

Linear: int8 weights (4-bit ones packed two per byte) with per-channel scales; int8 activations quantized per
token (dynamic) or with the calibrated scale (static); the product runs as an int8 x int8 -> int32 matmul
(`torch._int_mm`, a maintained core op) rescaled in float. Shapes that op cannot take, and per-group weights, run
the float reference path (dequantized weight, same activation rounding): same numbers, no integer speed-up.
Conv: int8 weights (BatchNorm folded in), computed in float from the dequantized weight (storage saving only).
Embedding: int8 rows with a scale each; a lookup gathers and rescales only the rows it reads.
"""

from __future__ import annotations

import copy
import math

import torch

from fabric_quant.layers.base import QuantizedLinear, Storage
from fabric_quant.numerics.quant import fake_quant, fake_quant_per_token, group_view, qrange, scale_zero_point
from fabric_quant.qat.layers import QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear


def _quantize_rows(weight: torch.Tensor, bits: int, group_size: int | None, learned_scale=None):
    rows = group_view(weight.detach().float(), group_size)
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

    def _set_weight(self, weight, bits, group_size, learned_scale=None) -> None:
        q, scale = _quantize_rows(weight, bits, group_size, learned_scale)
        self.bits, self.group_size, self.weight_shape = bits, group_size, tuple(weight.shape)
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
        return super()._load_from_state_dict(*args, **kwargs)

    def compute_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the float kernels (convolutions, per-group Linear), built once per dtype and
        kept: the checkpoint stays int8/int4, the float copy only lives in memory next to it."""
        if dtype not in self._float_cache:
            self._float_cache[dtype] = self.dequantized_weight().to(dtype)
        return self._float_cache[dtype]

    def is_quantized(self) -> bool:
        return True

    def dequantized_weight(self) -> torch.Tensor:
        rows = group_view(self.int8_weight().float(), self.group_size)
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


class Int8Linear(_Int8Weight, torch.nn.Module):
    def __init__(self, qat: QATLinear) -> None:
        super().__init__()
        cfg = qat.qat
        self.in_features, self.out_features = qat.in_features, qat.out_features
        self.fq_mode = f"int{cfg.weight_bits}-converted"
        self._set_weight(qat.weight, cfg.weight_bits, cfg.group_size, getattr(qat, "weight_scale", None))
        self.bias = None if qat.bias is None else torch.nn.Parameter(qat.bias.detach().clone(), requires_grad=False)
        self._set_activation(qat)

    def _integer_ok(self) -> bool:
        # torch._int_mm takes K and N in multiples of 8; per-group scales do not factor out of the matmul
        dims_ok = self.in_features % 8 == 0 and self.out_features % 8 == 0
        return dims_ok and self.activations != "none" and self.group_size is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not self._integer_ok():
            out = torch.nn.functional.linear(self._quantize_input(rows), self.compute_weight(x.dtype), self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        out = self._int8_matmul(rows.float())
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int8_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        # x ~ (q - z) * s with q in [0, 255]; shift to int8: q - 128 and z - 128, then
        # (q' - z') @ W^T = q' @ W^T - z' * rowsum(W), computed in int32.
        if self.activations == "dynamic":
            lo, hi = rows.aminmax(dim=1)
            scale, zero_point = scale_zero_point(lo, hi, 8, symmetric=False)
            scale, zero_point = scale[:, None], zero_point[:, None]
        else:
            scale, zero_point = self.act_scale, self.act_zero_point
        q = torch.clamp(torch.round(rows / scale) + zero_point, 0, 255) - 128
        m = q.shape[0]
        q8 = q.to(torch.int8)
        if m <= 16:  # _int_mm wants more than 16 rows
            q8 = torch.cat([q8, q8.new_zeros(17 - m, q8.shape[1])])
        w = self.int8_weight()
        acc = torch._int_mm(q8, w.t())[:m]
        acc = acc - (zero_point - 128).to(torch.int32) * self.row_sums()[None, :]
        return acc.float() * scale * self.weight_scale[None, :]


class Int8Conv(_Int8Weight, torch.nn.Module):
    def __init__(self, qat: QATConv1d | QATConv2d) -> None:
        super().__init__()
        cfg = qat.qat
        self.relu = bool(getattr(qat, "relu", False))
        self.fq_mode = f"int{cfg.weight_bits}-converted"
        self.conv_args = {"stride": qat.stride, "padding": qat.padding, "dilation": qat.dilation, "groups": qat.groups}
        self.dims = 2 if isinstance(qat, QATConv2d) else 1
        weight, bias = qat.folded() if isinstance(qat, QATConvBn2d) else (qat.weight, qat.bias)
        self._set_weight(weight, cfg.weight_bits, cfg.group_size, getattr(qat, "weight_scale", None))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._set_activation(qat)
        if qat.padding_mode != "zeros":
            raise ValueError(
                f"padding_mode={qat.padding_mode!r} is not supported by the int8 conversion (only 'zeros')"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = torch.nn.functional.conv2d if self.dims == 2 else torch.nn.functional.conv1d
        out = conv(self._quantize_input(x), self.compute_weight(x.dtype), self.bias, **self.conv_args)
        return torch.relu(out) if self.relu else out


class Int8Embedding(_Int8Weight, torch.nn.Module):
    """int8 (or packed int4) rows with a scale each; a lookup gathers and rescales only the rows it needs."""

    def __init__(self, qat: QATEmbedding) -> None:
        super().__init__()
        self.padding_idx, self.activations = qat.padding_idx, "none"  # the input is an index
        self.fq_mode = f"int{qat.qat.weight_bits}-converted"
        self._set_weight(qat.weight, qat.qat.weight_bits, qat.qat.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is not None:
            return torch.nn.functional.embedding(x, self.compute_weight(torch.float32), self.padding_idx)
        return self.int8_weight()[x].float() * self.weight_scale[x].unsqueeze(-1)


_CONVERTED = {
    QATLinear: Int8Linear,
    QATConv1d: Int8Conv,
    QATConv2d: Int8Conv,
    QATConvBn2d: Int8Conv,
    QATEmbedding: Int8Embedding,
}


def convert(model: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """The deployable model: every QAT layer replaced by its int8 (or packed int4) version, in eval mode."""
    from fabric_quant.modules import replace_modules

    model = model if inplace else copy.deepcopy(model)
    model.eval()
    replace_modules(model, lambda name, m: type(m) in _CONVERTED, lambda name, m: _CONVERTED[type(m)](m))
    return model

"""Weight-only quantized Linear layers (``woq-int8``, ``woq-int4``): integer weights, float activations.

At batch 1 (LLM decoding) a Linear layer is memory-bound: its time is the time to read its weight, so fewer weight
bytes are the speed-up, and the activations need no quantization. The products run on ATen's weight-only kernels
(maintained in core; torchao and gpt-fast use them):

==========  ===========================================  =============================================
mode        CPU (fp32 / bf16 activations)                CUDA
==========  ===========================================  =============================================
woq-int8    oneDNN's int8 GEMM on split activations      int8 weight cast to the activation dtype in the
            (:mod:`fabric_quant.nn.split_int8`); small   matmul, the per-channel scale applied to the
            layers ``torch._weight_int8pack_mm``         output (it factors out of the product)
woq-int4    ``torch._weight_int4pack_mm_for_cpu``        ``torch._weight_int4pack_mm`` (bf16 only)
==========  ===========================================  =============================================

fp32 activations run the CPU kernels in bf16 (:data:`FP32_VIA_BF16`).
Everything else (fp16 on CPU, other devices, shapes a kernel refuses: CPU int4 needs ``out_features % 16 == 0``
and ``in_features % group_size == 0``; CPU int8 with bf16 activations ``in_features % 16 == 0``, other widths crash
it) runs the reference path: ``F.linear`` on the dequantized weight, built for
the call and dropped (same numbers up to float rounding; no speed-up, the integer bytes stay what is resident).
CPU inputs of :data:`DEQUANT_ROWS` rows or more (a prefill, a large batch) run ``cpu-dequant``: the weight
dequantized in the activation dtype for the call and one oneDNN GEMM, faster there than the kernels.

Numbers. ``woq-int8``: symmetric, one scale per output channel, ``w = q * s`` with ``q`` in [-127, 127].
``woq-int4``: asymmetric in groups of ``group_size`` input elements, in the kernels' convention ``w = (q - 8) * s +
z`` with ``q`` in [0, 15] and ``z`` the group's midpoint in float. Scales and zeros are stored in bf16 (the dtype
the kernels take them in for bf16 activations; a bf16 number converts to fp32 exactly) and the codes are rounded
against the stored bf16 values, so every path computes with the very same weights. int8 scales are rounded *up*
to bf16 so the largest weight of a row still fits in [-127, 127]. ``scale_search="mse"`` (int4): per group, the
range is shrunk by each ratio of a small grid and the one with the lowest reconstruction error is kept (HQQ-lite:
clipping a few outliers buys a finer step for the rest).

Stored form. The checkpoint holds the canonical, device-independent form: int8 codes ``(out, in)``; int4 codes
two per byte ``(out, in_padded / 2)`` (element ``2j`` in the low nibble, as :func:`fabric_quant.nn.int8.pack_int4`),
``scales`` / ``zeros`` ``(out, groups)`` bf16; ``in_features`` is padded to a multiple of the group size by
repeating the last column (padding inside the group's range does not move its min / max). The int4 kernels'
layouts are device-specific (the CPU one is blocked by 32 output rows, CUDA's is tiled by ``innerKTiles``) and
private to ATen (they may change between releases), so they are built from the canonical form when a kernel first
needs them on a device and dropped on ``.to()`` / ``load_state_dict``: saving stays bit-exact and portable, at the
cost of a second copy of the int4 codes in memory on the kernel path (0.5 byte per weight; the int8 kernel takes
the canonical layout as it is).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F  # noqa: N812

from fabric_quant.nn import split_int8
from fabric_quant.nn.base import QuantizedLinear, Storage, derived
from fabric_quant.nn.onednn_linear import KernelCache

GROUP_SIZES = (32, 64, 128, 256)
"""int4 group sizes (the ones both ATen int4 kernels take)."""
SCALE_SEARCHES = ("none", "mse", "gptq")
MSE_RATIOS = tuple(1.0 - 0.01 * i for i in range(20))
"""Range-shrink ratios ``scale_search="mse"`` tries per group (1.0 = plain min / max)."""
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
DEQUANT_ROWS = {8: 32, 4: 80}
"""Per bit width: CPU inputs with at least this many rows (tokens times batch: a prefill) run ``cpu-dequant``: the
weight dequantized to the activation dtype for the call, then one oneDNN GEMM, instead of ATen's weight-only
kernels, whose time grows with the rows like one matrix-vector product per row. The crossovers measured on one
2048 -> 8192 layer (benchmarks/woq_layers.py --batch_sizes '[1, 8, 16, 32, 64, 128]', 2 threads): int8 at 32 rows
(6.4 ms both), int4 g128 between 64 (kernel 12.3 ms, dequantize + GEMM 14.1 ms) and 128 rows (24.5 / 15.6 ms).
int8 layers that take ``cpu-onednn`` (:func:`fabric_quant.nn.split_int8.suits`) keep it at any row count: it beat
the dequantizing path at 1 to 128 rows (128: 3.8 against 6.9 ms; ``--copies 16``).
``None`` turns the path off; compiled graphs (``torch.compile``) keep the kernels."""
DEQUANT_CHUNK = 1 << 24
"""Weights dequantized at a time on the ``cpu-dequant`` path (a layer with more runs in blocks of output rows), in
one workspace per thread that is reused: a fresh 32 MB tensor per call costs more in page faults than the
conversion itself (measured 12 ms against 3 ms for 16M int8 codes to bf16)."""
_workspace = threading.local()
FP32_VIA_BF16 = True
"""fp32 activations run the CPU kernels in bf16 (cast in, cast back), on every CPU: the kernels' fp32 paths
measured 9x (int8) and 27x (int4) slower than their bf16 ones on one 2048 x 8192 layer at batch 1 on Intel Xeon
(benchmarks/woq_layers.py), slower than the fp32 Linear itself. Their bf16 paths convert in registers, so they need
no native bf16: on AMD EPYC Zen 4 under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (an AVX2-only CPU,
ad hoc, 2 threads, batch 1) the int8 kernel took 1.2 ms in bf16 against 9.9 ms in fp32 and the fp32 Linear's 4.4 ms.
One setting everywhere also gives every CPU the same activation rounding. Set False for fp32 products."""


def _bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` (positive, fp32) rounded up to the next bf16 value (a nearest rounding could shrink a scale)."""
    y = x.to(torch.bfloat16)
    low = y.float() < x
    return torch.where(low, (y.view(torch.int16) + 1).view(torch.bfloat16), y)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 codes and their bf16 scales."""
    w = weight.detach().float()
    scale = _bf16_round_up((w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).eps))
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _int4_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = _bf16_round_up(((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).eps))
    return scale, (lo + 8 * scale.float()).to(torch.bfloat16)


def _int4_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    s, z = scale.float()[..., None], zero.float()[..., None]
    return torch.clamp(torch.round((groups - (z - 8 * s)) / s), 0, 15)


def quantize_int4(
    weight: torch.Tensor, group_size: int, scale_search: str = "none", hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 codes (uint8 values 0..15, shape ``(out, in_padded)``), bf16 scales and zeros per group.
    ``scale_search="gptq"`` takes the second moment of the layer's inputs (``hessian``,
    :mod:`fabric_quant.numerics.gptq`)."""
    if scale_search == "gptq":
        from fabric_quant.numerics.gptq import gptq_int4

        if hessian is None:
            raise ValueError("scale_search='gptq' needs the inputs' second moment (hessian=): see collect_hessians")
        return gptq_int4(weight.cpu(), hessian.cpu(), group_size, _int4_qparams, _int4_codes)
    w = weight.detach().float()
    pad = -w.shape[1] % group_size
    if pad:
        w = F.pad(w[None], (0, pad), mode="replicate")[0]
    groups = w.reshape(w.shape[0], -1, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale, zero = _int4_qparams(lo, hi)
    if scale_search == "mse":
        best = None
        for ratio in MSE_RATIOS:
            s, z = _int4_qparams(lo * ratio, hi * ratio)
            q = _int4_codes(groups, s, z)
            err = ((q - 8) * s.float()[..., None] + z.float()[..., None] - groups).square().sum(-1)
            if best is None:
                best, scale, zero = err, s, z
            else:
                better = err < best
                best = torch.where(better, err, best)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    q = _int4_codes(groups, scale, zero).to(torch.uint8).reshape(w.shape)
    return q, scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``(rows, 2m)`` values 0..15 -> ``(rows, m)`` bytes, element ``2j`` in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _cuda_inner_k_tiles(k: int) -> int | None:
    # torch._convert_weight_to_int4pack takes innerKTiles in (2, 4, 8) with K a multiple of innerKTiles * 16
    return next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)


class WOQLinear(QuantizedLinear, torch.nn.Module):
    """A Linear layer with int8 (per output channel) or int4 (per group) weights and float activations.

    Build one with :meth:`from_float`, or empty (``device="meta"``) and fill it with ``load_state_dict``.
    """

    onednn_int8: bool = True
    """int8 on CPU: oneDNN's GEMM on split activations where the shape suits it (:mod:`fabric_quant.nn.split_int8`,
    about 1.5x faster decoding than ATen's kernel) at the cost of a prepacked second copy of the codes (1 byte per
    weight). False (on the class or one layer): ATen's kernel, the codes held once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int = 4,
        group_size: int | None = 128,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits!r} is not supported. Valid choices: 4, 8")
        if bits == 4 and group_size not in GROUP_SIZES:
            raise ValueError(f"group_size={group_size!r} is not supported for int4. Valid choices: {GROUP_SIZES}")
        if bits == 8 and group_size is not None:
            raise ValueError(
                f"int8 weights have one scale per output channel: group_size must be None, got {group_size}"
            )
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.fq_mode = f"woq-int{bits}"
        if bits == 8:
            self.storage_keys = ("qweight", "scales")
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        else:
            self.storage_keys = ("qweight", "scales", "zeros")
            groups = -(-in_features // group_size)
            packed = torch.empty(out_features, groups * group_size // 2, dtype=torch.uint8, device=device)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        self.bias = None if b is None else torch.nn.Parameter(b, requires_grad=False)
        self._quantized = False
        self._clear_caches()

    @classmethod
    def from_float(
        cls,
        linear: torch.nn.Linear,
        bits: int = 4,
        group_size: int | None = 128,
        scale_search: str = "none",
        device: torch.device | str | None = None,
        hessian: torch.Tensor | None = None,
    ) -> WOQLinear:
        """The layer quantized from ``linear``'s weight on ``device`` (default: where the weight is); a weight on the
        meta device gives an empty layer of the right shape (filled by a later ``load_state_dict``)."""
        device = torch.device(device) if device is not None else linear.weight.device
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                  group_size=group_size, device=device, dtype=linear.weight.dtype)  # fmt: skip
        if linear.bias is not None:
            new.bias = torch.nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
        if linear.weight.device.type != "meta":
            new.quantize_(linear.weight, device, scale_search=scale_search, hessian=hessian)
        new.train(linear.training)
        return new

    # -- the QuantizedLinear interface ------------------------------------------------------------------------------

    def quantize_(
        self, weight: torch.Tensor | None = None, device: torch.device | None = None, *, scale_search: str = "none",
        hessian: torch.Tensor | None = None,
    ) -> None:
        if weight is None:
            raise ValueError("WOQLinear keeps no float weight: pass the weight to quantize")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} for a {self.out_features}x{self.in_features} layer"
            )
        if scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search={scale_search!r} is not supported. Valid choices: {SCALE_SEARCHES}")
        device = torch.device(device) if device is not None else self.qweight.device
        if device.type == "meta":
            device = weight.device
        weight = weight.detach().to(device)
        if self.bits == 8:
            self.qweight, self.scales = quantize_int8(weight)
        else:
            q, scales, zeros = quantize_int4(weight, self.group_size, scale_search, hessian)
            self.scales, self.zeros = scales.to(device), zeros.to(device)
            q = q.to(device)
            self.qweight = pack_nibbles(q)
        if self.bias is not None and self.bias.device != device:
            self.bias = torch.nn.Parameter(self.bias.data.to(device), requires_grad=False)
        self._quantized = True
        self._clear_caches()

    def is_quantized(self) -> bool:
        return self._quantized

    def statistics_finite(self) -> bool:
        stats = [self.scales] + ([self.zeros] if self.bits == 4 else [])
        return all(bool(torch.isfinite(t.float()).all()) for t in stats)

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales.float()[:, None]
        q = unpack_nibbles(self.qweight).float().reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.scales.float()[..., None] + self.zeros.float()[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def weight_storage(self) -> Storage:
        nbytes = sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.storage_keys)
        return Storage(numel=self.out_features * self.in_features, per_weight_bytes=nbytes, table_bytes=0)

    # -- kernels ----------------------------------------------------------------------------------------------------

    def _clear_caches(self) -> None:
        # kernel layouts and per-dtype scale tensors, built on first use per (device, dtype); never saved, copied or
        # pickled (oneDNN's packed weight is an opaque tensor that deepcopy and torch.save cannot read)
        self._cache: dict[tuple, torch.Tensor] = KernelCache()

    def _apply(self, fn, *args, **kwargs):
        self._clear_caches()  # a layout built for one device is meaningless on another
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._clear_caches()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._quantized = self.qweight.device.type != "meta"
        for key in self.storage_keys:  # assign=True keeps the loaded tensors: views into a safetensors file's bytes
            tensor = getattr(self, key)
            if tensor.device.type == "cpu" and tensor.data_ptr() % 64:  # the int8 kernel segfaults on unaligned data
                setattr(self, key, tensor.clone())

    def _cached(self, key: tuple, build) -> torch.Tensor:
        return derived(self._cache, key, build)

    def kernel(self, x: torch.Tensor) -> str:
        """Which path a float input ``x`` takes: ``cpu-onednn``, ``cpu-int8``, ``cpu-int4``, ``cpu-dequant``,
        ``cuda-int8``, ``cuda-int4`` or ``reference``."""
        device, dtype = x.device.type, x.dtype
        if self.bits == 8:
            if device == "cpu" and dtype in _KERNEL_DTYPES:
                # the split int8 GEMM first: faster than the dequantizing path at every row count measured (1-128);
                # not under autograd (rounding the activations has no gradient; the other paths' products do)
                if (self.onednn_int8 and not (x.requires_grad and torch.is_grad_enabled())
                        and split_int8.suits(self.in_features, self.out_features)):  # fmt: skip
                    return "cpu-onednn"
                if self._many_rows(x):
                    return "cpu-dequant"
            # bf16 needs in_features % 16 == 0 (other widths crash or return wrong numbers, torch 2.13; probed)
            if device == "cpu" and (dtype == torch.float32 or (dtype == torch.bfloat16 and self.in_features % 16 == 0)):
                return "cpu-int8"
            return "cuda-int8" if device == "cuda" and dtype.is_floating_point else "reference"
        aligned = self.in_features % self.group_size == 0
        if device == "cpu" and dtype in _KERNEL_DTYPES and aligned and self.out_features % 16 == 0:
            return "cpu-dequant" if self._many_rows(x) else "cpu-int4"
        if (device == "cuda" and dtype == torch.bfloat16 and aligned and self.out_features % 8 == 0
                and _cuda_inner_k_tiles(self.in_features) is not None):  # fmt: skip
            return "cuda-int4"
        return "reference"

    def _many_rows(self, x: torch.Tensor) -> bool:
        # eager only: a compiled graph keeps the kernels (the thread-local workspace is not traceable, and the
        # compiled crossover was not measured)
        if DEQUANT_ROWS is None or torch.compiler.is_compiling():
            return False
        return x.numel() >= DEQUANT_ROWS[self.bits] * self.in_features

    def forward(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """``path`` forces a path (tests compare the kernels with ``"reference"``)."""
        path = path or self.kernel(x)
        rows, out_dtype = x.reshape(-1, self.in_features), x.dtype
        if path.startswith("cpu") and path != "cpu-onednn" and x.dtype == torch.float32 and FP32_VIA_BF16:
            rows, x = rows.to(torch.bfloat16), x.to(torch.bfloat16)
        if path == "cpu-onednn":  # fp32 arithmetic throughout: no bf16 rounding of the activations
            scales = self._cached(("s", torch.float32), lambda: self.scales.float())
            if not torch.compiler.is_compiling():
                out = split_int8.linear(rows, self.qweight, scales, self._cached(("onednn",), self._onednn_layout))
            elif split_int8.compiled_uint8_kernel():
                out = split_int8.linear_op(rows, self.qweight, scales)
            else:  # inductor packs the constant weight itself where it lowers the traced product
                out = split_int8.linear(rows, self.qweight, scales, None)
        elif path == "cpu-int8":
            scales = self._cached(("s", x.dtype), lambda: self.scales.to(x.dtype))
            out = torch._weight_int8pack_mm(rows.contiguous(), self.qweight, scales)
        elif path == "cuda-int8":
            out = F.linear(rows, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        elif path == "cpu-int4":
            packed = self._cached(("w", x.device), self._cpu_int4_layout)
            sz = self._cached(("sz", x.dtype), lambda: self._scales_and_zeros(x.dtype))
            out = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, self.group_size, sz)
        elif path == "cuda-int4":
            packed = self._cached(("w", x.device), self._cuda_int4_layout)
            sz = self._cached(("sz", x.dtype), lambda: self._scales_and_zeros(x.dtype))
            out = torch._weight_int4pack_mm(rows.contiguous(), packed, self.group_size, sz)
        elif path == "cpu-dequant":
            out = self._dequantized_linear(rows)
        elif path == "reference":
            out = F.linear(rows, self.dequantized_weight().to(x.dtype))
        else:
            raise ValueError(
                f"path={path!r}. Valid choices: cpu-onednn, cpu-int8, cpu-int4, cpu-dequant, cuda-int8,"
                " cuda-int4, reference"
            )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(out_dtype).reshape(*x.shape[:-1], self.out_features)

    def _dequantized_linear(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ W^T`` with ``W`` dequantized in ``rows``' dtype, a block of output rows at a time (the codes and
        ``q - 8`` are exact in bf16; the scale and the zero round once each, in place in the workspace)."""
        if self.bits == 4 and self.in_features % self.group_size:
            raise ValueError(
                f"path='cpu-dequant' needs in_features % group_size == 0, got {self.in_features} % "
                f"{self.group_size}; use path='reference'"
            )
        step = max(1, DEQUANT_CHUNK // self.in_features)
        # autograd keeps the weight for the backward: a shared workspace would be overwritten before it runs
        shared = not (torch.is_grad_enabled() and rows.requires_grad)
        outs = []
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            outs.append(F.linear(rows, self._dequantize_block(start, stop, rows.dtype, shared)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _dequantize_block(self, start: int, stop: int, dtype: torch.dtype, shared: bool) -> torch.Tensor:
        n = (stop - start) * self.in_features
        buf = getattr(_workspace, "buf", None) if shared else None
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
                buf = torch.empty(max(n, DEQUANT_CHUNK) if shared else n, dtype=dtype)
            if shared:
                _workspace.buf = buf
        if self.bits == 8:
            w = buf[:n].view(stop - start, self.in_features)
            w.copy_(self.qweight[start:stop])  # into an existing tensor: several times faster than .to(dtype)
            return w.mul_(self.scales[start:stop, None])
        packed = self.qweight[start:stop]
        w = buf[:n].view(stop - start, -1, 2)
        w[..., 0], w[..., 1] = packed & 0xF, packed >> 4  # element 2j in the low nibble
        w = w.view(stop - start, -1, self.group_size).sub_(8)
        w.mul_(self.scales[start:stop, :, None]).add_(self.zeros[start:stop, :, None])
        return w.view(stop - start, self.in_features)

    def _codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)[:, : self.in_features]

    def _onednn_layout(self) -> torch.Tensor:
        return torch.ops.onednn.qlinear_prepack(self.qweight, None)

    def _cpu_int4_layout(self) -> torch.Tensor:
        return torch._convert_weight_to_int4pack_for_cpu(self._codes().to(torch.int32).contiguous(), 2)

    def _cuda_int4_layout(self) -> torch.Tensor:
        codes = self._codes()
        high_first = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()  # the byte order the CUDA op expects
        return torch._convert_weight_to_int4pack(high_first, _cuda_inner_k_tiles(self.in_features))

    def _scales_and_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernels' ``(groups, out, 2)`` tensor of (scale, zero) in the activation dtype."""
        return torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None},"
                f" bits={self.bits}{group}")  # fmt: skip

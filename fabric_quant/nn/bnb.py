"""bitsandbytes Linear layers that quantize on any device (CPU included) and reload their own checkpoints.

The classes subclass bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` so their kernels and autograd run
unchanged. What is added here is what Lightning's wrappers hard-wire to CUDA or leave out: quantizing on
the device the weight lives on, quantize-on-load of float checkpoints, bit-exact reload of quantized
checkpoints, and dequantization for export. Importing this module imports bitsandbytes.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import torch

from fabric_quant._bnb import import_bitsandbytes
from fabric_quant.nn import split_int8
from fabric_quant.nn.base import QuantizedLinear, Storage, local
from fabric_quant.nn.four_bit_matmul import PIECE_ELEMENTS, PiecewiseMatMul4bit, dequantize, rows_per_piece
from fabric_quant.nn.onednn_linear import KernelCache

bnb = import_bitsandbytes()
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit, has_avx512bf16  # noqa: E402
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module  # noqa: E402


def _resolve_device(device: torch.device | str | None, *candidates: torch.Tensor) -> torch.device | None:
    """The device to quantize on: the requested one, else the first non-meta tensor's device."""
    if device is not None:
        return torch.device(device)
    for tensor in candidates:
        if tensor.device.type != "meta":
            return tensor.device
    return None


def _check_shape(weight: torch.Tensor | torch.Size, layer: torch.nn.Linear, key: str, error_msgs: list[str]) -> bool:
    shape = tuple(weight.shape if isinstance(weight, torch.Tensor) else weight)
    expected = (layer.out_features, layer.in_features)
    if shape != expected:
        error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape}, the layer expects {expected}.")
        return False
    return True


def _check_float(weight: torch.Tensor, key: str, error_msgs: list[str]) -> bool:
    if not weight.is_floating_point():
        error_msgs.append(
            f"{key}: got a {weight.dtype} tensor without the quantization state of this layer's mode; expected a float"
            " weight (quantized on load) or a checkpoint saved from the same mode"
        )
        return False
    bad = int((~torch.isfinite(weight)).sum())
    if bad:
        error_msgs.append(f"{key}: the float weight holds {bad} non-finite values (NaN/inf); refusing to quantize it")
        return False
    return True


# Elements quantized per piece: bitsandbytes' portable kernel (the CPU path) holds about 16 bytes of temporaries
# per element (counted from its code: fp32 copies, the scaled values, int32 bucket indices), 270 MB for one
# 8192 x 2048 weight; in pieces of 2^20 elements they stay near 16 MB, and the loader's peak is the model plus one
# float weight.
_QUANTIZE_PIECE = 1 << 20


def quantize_4bit_rows(weight: torch.Tensor, device: torch.device, blocksize: int, quant_type: str,
                       compress_statistics: bool, quant_storage: torch.dtype):  # fmt: skip
    """``bitsandbytes.functional.quantize_4bit(weight.to(device), ...)``, computed a few rows at a time: the same
    packed bytes and statistics (blocks never straddle a piece, and the double quantization of the block
    constants runs once over all of them, as bitsandbytes does), a fraction of the temporaries."""
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    rows = weight.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight.reshape(1, -1)
    per_piece = rows_per_piece(*rows.shape, blocksize, _QUANTIZE_PIECE)
    packed, absmax = [], []
    for start in range(0, rows.shape[0], per_piece):
        piece = rows[start : start + per_piece].contiguous().to(device)
        out, scale = torch.ops.bitsandbytes.quantize_4bit.default(piece, blocksize, quant_type, quant_storage)
        packed.append(out.reshape(-1))
        absmax.append(scale.reshape(-1))
        del piece, out, scale
    packed = torch.cat(packed).unsqueeze(1) if len(packed) > 1 else packed[0].unsqueeze(1)
    absmax = torch.cat(absmax) if len(absmax) > 1 else absmax[0]
    common = {"shape": weight.shape, "dtype": weight.dtype, "blocksize": blocksize, "quant_type": quant_type,
              "code": get_4bit_type(quant_type, device=absmax.device)}  # fmt: skip
    if not compress_statistics:
        return packed, QuantState(absmax=absmax, **common)
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return packed, QuantState(absmax=qabsmax, offset=offset, state2=state2, **common)


def four_bit_storage(data: torch.Tensor, state: Any, numel: int) -> Storage:
    """Bytes of a 4-bit weight: packed codes plus its statistics (absmax, and with double quantization the nested
    absmax and offset) per weight, the code books per layer."""
    per_weight = data.numel() * data.element_size() + state.absmax.numel() * state.absmax.element_size()
    tables = state.code.numel() * state.code.element_size()
    if state.nested:
        nested = state.state2
        per_weight += nested.absmax.numel() * nested.absmax.element_size() + state.offset.element_size()
        tables += nested.code.numel() * nested.code.element_size()
    return Storage(numel=numel, per_weight_bytes=per_weight, table_bytes=tables)


def int8_storage(weight: torch.Tensor, scb: torch.Tensor) -> Storage:
    """Bytes of an LLM.int8() weight: the int8 codes and one scale per row."""
    per_weight = weight.numel() * weight.element_size() + scb.numel() * scb.element_size()
    return Storage(numel=weight.numel(), per_weight_bytes=per_weight, table_bytes=0)


def foreign_storage(module: torch.nn.Module) -> Storage | None:
    """The storage of a bitsandbytes layer this package did not build (Lightning's ``BitsandbytesPrecision`` layers,
    transformers' ``BitsAndBytesConfig`` ones): their statistics hang on the weight, not in a buffer, so counting
    parameters alone would miss them. None for anything else, including a wrapper whose ``weight`` is a property
    reading its child's (peft's LoRA layers): the child's storage is counted once, on the child."""
    weight = module._parameters.get("weight")
    if isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None:
        return four_bit_storage(weight.data, weight.quant_state, module.in_features * module.out_features)
    scb = getattr(weight, "SCB", None)
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8 and scb is not None:
        return int8_storage(weight, scb)
    return None


class _LoadMixin:
    """Shared load and initialisation logic of the two layer kinds: the layer pops its own weight keys, then lets
    ``nn.Module`` load the bias; ``to_empty`` and ``reset_parameters`` work on a float weight and quantize it (a
    packed weight can be neither allocated nor initialised in place)."""

    def _load_weight(self, state_dict: dict, prefix: str, error_msgs: list[str]) -> bool:
        raise NotImplementedError

    def _kernel_cache(self) -> KernelCache:
        """Derived copies of the weight that the CPU inference kernels read (never saved, copied or trained on)."""
        cache = self.__dict__.get("_fq_kernels")
        if cache is None:
            cache = self.__dict__["_fq_kernels"] = KernelCache()
        return cache

    def _inference_only(self, x: torch.Tensor) -> bool:
        # eval mode without autograd: where the derived copies are built (training keeps the one canonical copy)
        return not self.training and not (torch.is_grad_enabled() and x.requires_grad)

    def train(self, mode: bool = True):
        if mode:  # the derived copies cost memory; training never reads them
            self._kernel_cache().clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_cache().clear()  # built for one device and the old tensors
        return super()._apply(fn, *args, **kwargs)

    def _float_dtype(self) -> torch.dtype:
        return getattr(self, "compute_dtype", None) or torch.get_default_dtype()

    def to_empty(self, *, device, recurse: bool = True):
        """Uninitialised storage on ``device`` (e.g. after building on meta), as a quantized weight of this mode."""
        device = torch.device(device)
        if device.type == "meta":
            return super().to_empty(device=device, recurse=recurse)
        self.quantize_(torch.zeros(self.out_features, self.in_features, device=device, dtype=self._float_dtype()))
        if self.bias is not None:
            self.bias = torch.nn.Parameter(torch.empty_like(self.bias, device=device), self.bias.requires_grad)
        return self

    def reset_parameters(self) -> None:
        """``torch.nn.Linear``'s initialisation, drawn in float and quantized on the weight's device."""
        weight = getattr(self, "weight", None)
        if not isinstance(weight, bnb.nn.Params4bit | bnb.nn.Int8Params) or weight.device.type == "meta":
            return super().reset_parameters()  # nn.Linear's, during construction (a plain Parameter) or on meta
        fresh = torch.empty(self.out_features, self.in_features, device=weight.device, dtype=self._float_dtype())
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            torch.nn.init.uniform_(self.bias, -bound, bound)
        self.quantize_(fresh, weight.device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            if hasattr(state_dict[key], "_load_tensor"):  # Lightning's lazy loader (_NotYetLoadedTensor): read it
                state_dict[key] = state_dict[key]._load_tensor()
        has_weight = prefix + "weight" in state_dict
        if has_weight:
            self._load_weight(state_dict, prefix, error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if has_weight and prefix + "weight" in missing_keys:
            missing_keys.remove(prefix + "weight")


class Linear4bit(_LoadMixin, bnb.nn.Linear4bit, QuantizedLinear):
    """4-bit (NF4 / FP4, optionally double-quantized) Linear that works on CPU and CUDA."""

    cpu_gemv: bool = True
    """CPU inference (eval mode, no autograd, bf16 compute dtype: the default on the CPUs it runs on, those with
    AVX512-BF16): bitsandbytes' fused 4-bit kernel, on a derived copy of the codes in its blocked layout with bf16
    block constants (0.53 byte per weight more while in eval mode; dropped by ``train()``). Otherwise each call
    dequantizes the whole weight for a float matmul, several times slower than the fp32 Linear
    (``benchmarks/cpu_matrix.py``). False (on the class or one layer): no copy."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        quant_type: str = "nf4",
        compress_statistics: bool = False,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            bias=bias,
            compute_dtype=compute_dtype,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            device=device,
        )
        if dtype is not None and self.bias is not None:
            self.bias.data = self.bias.data.to(dtype)
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first eval forward and rounds the block
        # constants to bf16 (undoing double quantization): lossy and irreversible, so saved checkpoints would no
        # longer match and nf4-dq would cost 4.25 bits. Keep the canonical QLoRA layout instead.
        self.support_avx512bf16_for_cpu = False
        # Created on a real device (e.g. under `fabric.init_module()`): quantize now so the float weight of
        # only this one layer ever exists. On the meta device, quantization waits for the checkpoint load.
        if self.weight.device.type != "meta":
            self.quantize_()

    def is_quantized(self) -> bool:
        # FSDP flattens parameters and the Params4bit wrapper (and its flag) can be lost; the module keeps the
        # quant state (bitsandbytes restores it in forward), so that also means "already quantized".
        return bool(getattr(self.weight, "bnb_quantized", False)) or self.quant_state is not None

    def quantize_(self, weight: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        if weight is None:
            if self.is_quantized():
                return
            weight = self.weight.data
        device = _resolve_device(device, weight)
        if device is None:
            raise RuntimeError("Cannot quantize a weight on the meta device; load a checkpoint into the layer first.")
        old = self.weight
        packed, state = quantize_4bit_rows(weight.detach(), device, old.blocksize, old.quant_type,
                                           old.compress_statistics, old.quant_storage)  # fmt: skip
        self.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                        compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                        quant_storage=old.quant_storage, module=self, bnb_quantized=True)  # fmt: skip
        self.quant_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `fabric.setup_module(..., move_to_device=False)` skips the move that quantizes converted layers.
        if not self.is_quantized():
            self.quantize_(device=x.device)
        if self._cpu_gemv_ok(x):
            return self._cpu_gemv(x)
        big = torch.is_grad_enabled() and x.requires_grad and self.in_features * self.out_features > PIECE_ELEMENTS
        if big or self._misplaced_by_cpu_kernel(x.device):
            return self._forward_in_pieces(x)
        return super().forward(x)

    def kernel(self, x: torch.Tensor) -> str:
        """``bnb-gemv-4bit`` (bitsandbytes' AVX512-BF16 CPU kernel on a derived copy), ``portable-dequant`` or
        ``bnb-dequant`` (the weight dequantized, then a float matmul)."""
        if self._cpu_gemv_ok(x):
            return "bnb-gemv-4bit"
        return "portable-dequant" if self._misplaced_by_cpu_kernel(x.device) else "bnb-dequant"

    def _cpu_gemv_ok(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu" and self.cpu_gemv and self.compute_dtype == torch.bfloat16
            and self._inference_only(x) and not torch.compiler.is_compiling()
            and isinstance(self.weight, bnb.nn.Params4bit) and self.out_features % 32 == 0
            and self.in_features % self.weight.blocksize == 0 and _avx512_bf16()
        )  # fmt: skip

    def _cpu_gemv(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' fused CPU kernel (bf16 activations) on its blocked layout of the codes, built once beside
        the canonical weight: the layout is an exact permutation of the codes, but bitsandbytes rounds the block
        constants to bf16 (double quantization undone), so converting the weight itself in place, as its own
        Linear4bit does, would change what is saved and trained on."""
        cache, state = self._kernel_cache(), self.weight.quant_state
        key = (self.weight.data.data_ptr(), state.absmax.data_ptr())
        if cache.get("gemv_key") != key:
            cache["gemv"] = _convert_weight_packed_for_cpu(self.weight.data, copy.copy(state))  # mutates the state
            cache["gemv_key"] = key
        packed, gemv_state = cache["gemv"]
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        return bnb.matmul_4bit(x.to(torch.bfloat16), packed, quant_state=gemv_state, bias=bias).to(x.dtype)

    def _misplaced_by_cpu_kernel(self, device: torch.device) -> bool:
        """bitsandbytes' CPU dequantization misplaces the blocks of an even row length that is not a multiple of
        the block size (fabric_quant.nn.four_bit_matmul.dequantized_pieces): such layers dequantize portably."""
        state = getattr(self.weight, "quant_state", None) or self.quant_state  # sharded: the module's
        return device.type == "cpu" and self.in_features % state.blocksize != 0 and self.in_features % 2 == 0

    def _forward_in_pieces(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' forward (its dtype handling kept) with :class:`PiecewiseMatMul4bit` for the training
        matmul: a big weight is never dequantized whole (fabric_quant.nn.four_bit_matmul)."""
        fix_4bit_weight_quant_state_from_module(self)  # FSDP2: the statistics live on the module
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return PiecewiseMatMul4bit.apply(x, self.weight, bias, self.weight.quant_state).to(dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if getattr(self.weight, "quant_state", None) is None and self.quant_state is not None:
            # sharded (FSDP2): the weight is a DTensor now; the statistics live on the module (distributed/fsdp.py)
            for key, value in self.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def dequantized_weight(self) -> torch.Tensor:
        if self._misplaced_by_cpu_kernel(self.weight.device):
            return dequantize(self.weight.data, self.weight.quant_state, torch.float32)
        return dequantize_4bit(self.weight.data, self.weight.quant_state).float()

    def statistics_finite(self) -> bool:
        """Whether the quantized weight came from finite values: a NaN/inf in a block makes its absmax (and with
        double quantization the nested absmax) non-finite. A few hundred values to check instead of every weight."""
        state = self.weight.quant_state
        return bool(torch.isfinite(state.state2.absmax if state.nested else state.absmax).all())

    def weight_storage(self) -> Storage:
        # sharded (FSDP2): this rank's bytes of the packed weight; the statistics stay whole on the module
        state = getattr(self.weight, "quant_state", None) or self.quant_state
        return four_bit_storage(local(self.weight.data), state, self.in_features * self.out_features)

    def _load_weight(self, state_dict: dict, prefix: str, error_msgs: list[str]) -> bool:
        key = prefix + "weight"
        stats = {k[len(key) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(key + ".")}
        weight = state_dict.pop(key)
        device = _resolve_device(None, self.weight, weight)
        if not stats:  # a float checkpoint: quantize on load
            if _check_float(weight, key, error_msgs) and _check_shape(weight, self, key, error_msgs):
                self.quantize_(weight, device)
            return True
        if not any(k.startswith("quant_state.bitsandbytes__") for k in stats):
            error_msgs.append(f"{key}: quantization statistics without a packed quant_state entry: {sorted(stats)}")
            return False
        params = bnb.nn.Params4bit.from_prequantized(weight, stats, requires_grad=False, device=device, module=self)
        if not _check_shape(params.quant_state.shape, self, key, error_msgs):
            return False
        mine = self.weight
        if (params.quant_type, params.compress_statistics) != (mine.quant_type, mine.compress_statistics):
            error_msgs.append(
                f"{key}: checkpoint holds quant_type={params.quant_type!r}, double_quant={params.compress_statistics}"
                f" but the layer is quant_type={mine.quant_type!r}, double_quant={mine.compress_statistics}"
            )
            return False
        self.weight = params
        return True


class Linear8bit(_LoadMixin, bnb.nn.Linear8bitLt, QuantizedLinear):
    """LLM.int8() Linear that works on CPU (no fp16 requirement) and CUDA.

    ``has_fp16_weights=False`` (mode ``int8``): int8 weights with one fp32 scale per row, frozen.
    ``has_fp16_weights=True`` (mode ``int8-training``): float weights, trainable, quantized on each forward.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        has_fp16_weights: bool = False,
        threshold: float = 6.0,
    ) -> None:
        super().__init__(
            in_features, out_features, bias=bias, has_fp16_weights=has_fp16_weights, threshold=threshold, device=device
        )
        if dtype is not None:
            for param in (self.weight, self.bias):
                if param is not None:
                    param.data = param.data.to(dtype)
        if self.weight.device.type != "meta":
            self.quantize_()

    @property
    def storage_keys(self) -> tuple[str, ...]:
        # int8-training's weight is a float one: cast with the model's other float tensors to the compute dtype
        return () if self.state.has_fp16_weights else ("weight",)

    def is_quantized(self) -> bool:
        return self.state.has_fp16_weights or self.weight.dtype == torch.int8

    def quantize_(self, weight: torch.Tensor | None = None, device: torch.device | None = None) -> None:
        if weight is None:
            if self.weight.dtype == torch.int8:
                return
            weight = self.weight.data
        device = _resolve_device(device, weight)
        if device is None:
            raise RuntimeError("Cannot quantize a weight on the meta device; load a checkpoint into the layer first.")
        fp16_weights = self.state.has_fp16_weights
        if fp16_weights:
            # int8-training keeps a float weight: the layer's own dtype and trainability, not the source's (a fp32
            # checkpoint loaded into a bf16 model whose client froze every weight but the adapters')
            current = self.weight
            dtype = current.dtype if current.is_floating_point() else weight.dtype
            weight = weight.detach().to(device=device, dtype=dtype)
            params = bnb.nn.Int8Params(weight, requires_grad=current.requires_grad, has_fp16_weights=True)
            self._set_weight(params)
            return
        params = bnb.nn.Int8Params(weight.detach().to(device), requires_grad=False, has_fp16_weights=False)
        self._set_weight(params._quantize(device))

    def _set_weight(self, params: torch.nn.Parameter) -> None:
        # bitsandbytes moves CB/SCB from the parameter into `self.state` at the first forward; clear the stale
        # copies so the next forward takes the new weight's statistics.
        self.weight = params
        self.state.CB = self.state.SCB = None
        self.state.reset_grads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized():
            self.quantize_(device=x.device)
        if self._split_int8_ok(x):
            return self._split_int8(x)
        if x.device.type != "cpu":
            return super().forward(x)
        # On CPU, bitsandbytes' LLM.int8() inference path (MatMul8bitLt) quantizes activations row-wise with no fast
        # kernel, and its float-weight variant needs `int8_double_quant`, which has no CPU kernel at all. Its CPU
        # path MatMul8bitFp (int8 row-wise weight, dequantized into a float matmul) serves both: weight-only int8,
        # the same storage and checkpoints, lower error (no activation rounding) and faster at small batch.
        if self.weight.CB is not None:
            self.init_8bit_state()
        self.state.is_training = True
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        # MatMul8bitFp's backward handles 2-D inputs only (`A.t()` for the weight gradient, `sum(0)` for the bias
        # gradient): the leading (batch, sequence) dimensions are folded into rows around it
        rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        out = bnb.matmul(rows, self.weight, bias=bias, state=self.state)
        if not self.state.has_fp16_weights:
            self.weight.data = self.state.CB
        return out.reshape(*x.shape[:-1], out.shape[-1]) if x.dim() != 2 else out

    def kernel(self, x: torch.Tensor) -> str:
        """``cpu-onednn`` (oneDNN's int8 GEMM on split activations, inference on CPUs with VNNI or AMX),
        ``bnb-int8-fp`` (bitsandbytes' CPU path: the weight dequantized into a float matmul) or ``bnb-int8``."""
        if self._split_int8_ok(x):
            return "cpu-onednn"
        return "bnb-int8-fp" if x.device.type == "cpu" else "bnb-int8"

    def _split_int8_ok(self, x: torch.Tensor) -> bool:
        # int8 weights only (int8-training's are float); not while dynamo traces (the packed copy is eager state)
        return (
            x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and self._inference_only(x)
            and not self.state.has_fp16_weights and self.weight.dtype == torch.int8
            and not torch.compiler.is_compiling() and split_int8.suits(self.in_features, self.out_features)
        )  # fmt: skip

    def _split_int8(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-only int8 product on oneDNN's int8 GEMM (fabric_quant.nn.split_int8: activations split into
        two int8 terms, about 16 bits, fp32 arithmetic), with bitsandbytes' exact fp32 row scales ``SCB / 127``;
        bitsandbytes' CPU path dequantizes the whole weight every call instead (0.17x the fp32 Linear on a
        4096-wide MLP at batch 1). The packed copy (1 byte per weight) is built once in eval mode."""
        cache, codes, scb = self._kernel_cache(), self.weight.data, self._scb()
        key = (codes.data_ptr(), scb.data_ptr())
        if cache.get("onednn_key") != key:
            cache["onednn"] = (torch.ops.onednn.qlinear_prepack(codes, None), scb.float() / 127.0)
            cache["onednn_key"] = key
        packed, scales = cache["onednn"]
        out = split_int8.linear(x.reshape(-1, self.in_features), codes, scales, packed)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def statistics_finite(self) -> bool:
        """Whether the weight is finite: a NaN/inf in a row makes that row's scale (SCB) non-finite."""
        data = self.weight.data if self.state.has_fp16_weights else self._scb()
        return bool(torch.isfinite(data).all())

    def _scb(self) -> torch.Tensor:
        return self.weight.SCB if getattr(self.weight, "SCB", None) is not None else self.state.SCB

    def dequantized_weight(self) -> torch.Tensor:
        if self.state.has_fp16_weights:
            return self.weight.data.float()
        return self.weight.data.float() * (self._scb().float() / 127.0).unsqueeze(1)

    def weight_storage(self) -> Storage | None:
        if self.state.has_fp16_weights:
            return None
        return int8_storage(self.weight, self._scb())

    def _load_weight(self, state_dict: dict, prefix: str, error_msgs: list[str]) -> bool:
        key = prefix + "weight"
        weight = state_dict.pop(key)
        scb = state_dict.pop(prefix + "SCB", None)
        state_dict.pop(prefix + "weight_format", None)
        if not _check_shape(weight, self, key, error_msgs):
            return False
        device = _resolve_device(None, self.weight, weight)
        if weight.dtype != torch.int8:  # a float checkpoint: quantize on load
            if _check_float(weight, key, error_msgs):
                self.quantize_(weight, device)
            return True
        if self.state.has_fp16_weights or scb is None:
            error_msgs.append(
                f"{key}: an int8 weight{'' if scb is not None else ' without its SCB scales'} cannot be loaded into"
                f" {'an int8-training layer (float weights)' if self.state.has_fp16_weights else 'this layer'}"
            )
            return False
        weight, scb = weight.to(device), scb.to(device)
        self._set_weight(bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scb))
        return True


@functools.cache
def _avx512_bf16() -> bool:
    return bool(has_avx512bf16())


@functools.cache
def layer_class(mode: str, **options: Any) -> type[QuantizedLinear]:
    """A ``torch.nn.Linear``-signature subclass bound to one mode's options.

    A real class (not ``functools.partial``) so that it can replace ``torch.nn.Linear`` under
    ``fabric.init_module()`` and ``isinstance`` checks keep working.
    """
    options = dict(options)
    base = Linear4bit if options.pop("kind") == "4bit" else Linear8bit

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, **overrides):  # noqa: N807
        base.__init__(self, in_features, out_features, bias, device, dtype, **{**options, **overrides})

    name = "Linear_" + mode.replace("-", "_")
    return type(name, (base,), {"__init__": __init__, "fq_mode": mode, "__module__": __name__})

"""Which kernel each quantized layer runs on this machine, and why: ``fabric_quant.kernels.report(model)``.

A layer picks its kernel from the input it gets (device, dtype, rows) and from what the CPU has (``nn/cpu_isa.py``);
this asks each layer the question it answers itself (``layer.kernel(x)``) for a few row counts, so the report and
the forward can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fabric_quant.nn.cpu_isa import activation_encoding, cpu_features, onednn_isa_cap

WHY = {
    "onednn-s8": "oneDNN int8 GEMM, signed int8 activations (AMX kernel)",
    "onednn-u8": "oneDNN int8 GEMM, activations shifted to uint8 with zero point 128 (VNNI kernel)",
    "int_mm": "torch._int_mm + float rescale (compiled graphs trace this; the reference elsewhere)",
    "int_mm-static": "torch._int_mm on calibrated uint8 activations shifted to int8, zero-point correction",
    "float": "float matmul on the dequantized weight (weight-only, per-group scales, or too small to gain)",
    "onednn-qconv": "oneDNN uint8 x int8 convolution, bias / ReLU / requantization fused",
    "cpu-onednn": "oneDNN int8 GEMM on activations split into two int8 terms (~16-bit activations)",
    "cpu-int8": "ATen torch._weight_int8pack_mm (fp32 activations cast to bf16: nn/woq.py FP32_VIA_BF16)",
    "cpu-int4": "ATen torch._weight_int4pack_mm_for_cpu (fp32 activations cast to bf16: FP32_VIA_BF16)",
    "cpu-dequant": "weight dequantized for the call + one float GEMM (many rows: a prefill, a large batch)",
    "cuda-int8": "int8 weight cast in the matmul, scale on the output",
    "cuda-int4": "ATen torch._weight_int4pack_mm (tinygemm)",
    "reference": "F.linear on the dequantized weight (no kernel takes this shape / dtype / device)",
    "bnb-gemv-4bit": "bitsandbytes' fused 4-bit CPU kernel (bundled, AVX512-BF16, bf16) on a derived copy (eval)",
    "bnb-dequant": "bitsandbytes dequantizes the 4-bit weight, then a float matmul",
    "portable-dequant": "4-bit weight dequantized by the package (bitsandbytes' CPU kernel misplaces this shape)",
    "bnb-int8-fp": "bitsandbytes MatMul8bitFp: int8 row-wise weight dequantized into a float matmul",
    "bnb-int8": "bitsandbytes LLM.int8() (CUDA)",
    "gather": "rows gathered and rescaled",
}


def machine() -> str:
    """The CPU model and what its int8 kernels can use, in one line."""
    from fabric_quant.report import machine_name  # lazily: fabric_quant.kernels imports this module

    name = machine_name()
    features = ", ".join(k for k, v in cpu_features().items() if v) or "none"
    encoding, why = activation_encoding()
    cap = onednn_isa_cap() or "none"
    aten = torch.backends.cpu.get_cpu_capability()
    return (f"{name} ({features}); ATen {aten}; ONEDNN_MAX_CPU_ISA {cap}; int8 activations {encoding} ({why});"
            f" {torch.get_num_threads()} threads")  # fmt: skip


@dataclass
class KernelReport:
    machine: str
    rows: tuple[int, ...]
    layers: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    """(name, layer class, kernel at each row count)."""

    def kernels(self) -> dict[str, tuple[str, ...]]:
        return {name: kernels for name, _, kernels in self.layers}

    def markdown(self) -> str:
        head = "| layer | class | " + " | ".join(f"{r} rows" for r in self.rows) + " |"
        lines = [f"Machine: {self.machine}", "", head, "|" + "---|" * (len(self.rows) + 2)]
        lines += [f"| {n} | {c} | " + " | ".join(k) + " |" for n, c, k in self.layers]
        used = sorted({k for _, _, ks in self.layers for k in ks})
        lines += ["", "Kernels:"] + [f"- `{k}`: {WHY.get(k.split('+')[0], '?')}" for k in used]
        return "\n".join(lines)

    __str__ = markdown


def report(model: torch.nn.Module, rows: tuple[int, ...] = (1, 8), dtype: torch.dtype | None = None,
           device: torch.device | str | None = None) -> KernelReport:
    """The kernel every quantized layer of ``model`` runs for inputs of ``rows`` rows (tokens x batch), in
    ``dtype`` (default: the dtype of the model's first floating tensor) on ``device`` (default: its device),
    under inference (no autograd)."""
    first = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    device = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
    out = KernelReport(machine(), tuple(rows))
    with torch.inference_mode():
        for name, module in model.named_modules():
            kernels = tuple(_kernel(module, r, dtype, device) for r in rows)
            if kernels[0] is not None:
                out.layers.append((name, type(module).__name__, kernels))
    return out


def _kernel(module: torch.nn.Module, rows: int, dtype: torch.dtype, device) -> str | None:
    from fabric_quant.nn.base import QuantizedLinear
    from fabric_quant.nn.int8 import Int8Conv, Int8Embedding

    if not isinstance(module, QuantizedLinear):
        return None
    if isinstance(module, Int8Embedding):
        return "gather"
    if isinstance(module, Int8Conv):
        return module.kernel(torch.empty(0, device=device))
    width = getattr(module, "in_features", None)
    if hasattr(module, "kernel") and width is not None:
        return module.kernel(torch.empty(rows, width, dtype=dtype, device=device))
    return _bnb_kernel(module, rows, device)


def _bnb_kernel(module: torch.nn.Module, rows: int, device) -> str:
    kind = getattr(module, "fq_mode", "")
    cpu = torch.device(device).type == "cpu"
    if kind.startswith("int8"):
        return "bnb-int8-fp" if cpu else "bnb-int8"
    if cpu and getattr(module, "_misplaced_by_cpu_kernel", lambda d: False)(torch.device(device)):
        return "portable-dequant"
    # bitsandbytes' Linear4bit repacks its weight for its fused CPU kernel in eval mode without autograd on CPUs
    # with AVX512-BF16 (nn/modules.py: support_avx512bf16_for_cpu); otherwise it dequantizes and runs a float matmul
    fused = cpu and getattr(module, "support_avx512bf16_for_cpu", False) and not module.training
    return "bnb-gemv-4bit" if fused else "bnb-dequant"

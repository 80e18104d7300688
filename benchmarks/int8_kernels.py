"""Which CPU kernel is fastest for a Linear at all-MiniLM-L6-v2's shapes? (groundwork for the PTQ issue)

    python benchmarks/int8_kernels.py      # writes benchmarks/results/int8_kernels.{md,csv}

Per shape (tokens x in -> out), median wall time of: fp32 `F.linear`, bf16 `F.linear` (AMX-BF16 on this Xeon),
oneDNN int8 (`torch.ops.onednn.qlinear_pointwise`, AMX-INT8: per-channel symmetric int8 weights prepacked once,
activations quantized per call, symmetric per-tensor, fp32 and bf16 output), `torch._int_mm` on pre-quantized
int8 activations (kernel alone, no quantization or rescale), and the activation quantization alone. Relative
error of each int8 output against fp32 is reported too. All of these are maintained torch core ops (none is in
the deprecated torch.ao.quantization).

The ``compiled_*`` columns time a one-Linear model through :func:`fabric_quant.kernels.compile_model` as the
benchmarks use it: bf16, and ``quantize_dynamic`` int8 (per-token activations) lowered by inductor's freezing to
oneDNN's qlinear (``compiled_int8``) or, with ``autotune=True``, to whichever of inductor's C++ AMX template and
the library kernel timed faster (``compiled_int8_autotune``, ``compiled_bf16_autotune``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from jsonargparse import CLI

import fabric_quant as fq
from fabric_quant.kernels import can_compile, compile_model
from fabric_quant.report import machine_name, measure_latency, write_report

SHAPES = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384), (1024, 384, 1536), (1024, 1536, 384), (1, 2048, 2048)]
EAGER = ("fp32", "bf16", "onednn_int8_f32out", "onednn_int8_bf16out", "int_mm_kernel_only", "act_quant_only")
# name: (int8, autotune); timed where a C++ compiler exists
COMPILED = {
    "compiled_bf16_autotune": (False, True),
    "compiled_int8": (True, False),
    "compiled_int8_autotune": (True, True),
}


def compiled(linear: torch.nn.Linear, x: torch.Tensor, int8: bool, autotune: bool):
    model = torch.nn.Sequential(linear)
    model = fq.quantize_dynamic(model) if int8 else model.to(torch.bfloat16)
    fast, x = compile_model(model, autotune=autotune), x if int8 else x.bfloat16()
    return lambda: fast(x)


def measure(m: int, k: int, n: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x, w, bias = torch.randn(m, k), torch.randn(n, k) * 0.02, torch.zeros(n)
    w_scale = w.abs().amax(1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w_q, [m, k])
    zeros = torch.zeros(n, dtype=torch.long)

    def quant():
        scale = float(x.abs().amax()) / 127
        return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale

    def onednn(out_dtype):
        def run():
            x_q, scale = quant()
            return torch.ops.onednn.qlinear_pointwise(
                x_q, scale, 0, packed, w_scale, zeros, bias, 1.0, 0, out_dtype, "none", [], ""
            )

        return run

    x_q = quant()[0]
    x_mm = torch.cat([x_q, x_q.new_zeros(max(0, 17 - m), k)]) if m <= 16 else x_q  # _int_mm needs > 16 rows
    xb, wb = x.bfloat16(), w.bfloat16()
    row = {"shape": f"{m}x{k}->{n}"}
    with torch.inference_mode():
        ref = torch.nn.functional.linear(x, w, bias)
        fns = {
            "fp32": lambda: torch.nn.functional.linear(x, w, bias),
            "bf16": lambda: torch.nn.functional.linear(xb, wb),
            "onednn_int8_f32out": onednn(torch.float32),
            "onednn_int8_bf16out": onednn(torch.bfloat16),
            "int_mm_kernel_only": lambda: torch._int_mm(x_mm, w_q.t()),
            "act_quant_only": quant,
        }
        if can_compile():
            linear = torch.nn.Linear(k, n)
            with torch.no_grad():
                linear.weight.copy_(w), linear.bias.copy_(bias)
            for name, (int8, autotune) in COMPILED.items():
                fns[name] = compiled(linear, x, int8, autotune)
        for name, fn in fns.items():
            row[f"{name}_ms"] = measure_latency(fn, repeats, warmup=5)["median_ms"]
        row["onednn_int8_rel_err"] = ((onednn(torch.float32)() - ref).norm() / ref.norm()).item()
    row["bf16_speedup"] = row["fp32_ms"] / row["bf16_ms"]
    row["onednn_int8_speedup"] = row["fp32_ms"] / row["onednn_int8_bf16out_ms"]
    if can_compile():
        row["compiled_int8_autotune_vs_bf16"] = row["compiled_bf16_autotune_ms"] / row["compiled_int8_autotune_ms"]
    return row


def main(repeats: int = 50, threads: int = 2, out_dir: Path = Path("benchmarks/results")) -> None:
    torch.set_num_threads(threads)
    rows = [measure(m, k, n, repeats) for m, k, n in SHAPES]
    kernels = [*EAGER, *COMPILED] if can_compile() else EAGER
    columns = ["shape", *(f"{k}_ms" for k in kernels), "bf16_speedup", "onednn_int8_speedup", "onednn_int8_rel_err"]
    columns += ["compiled_int8_autotune_vs_bf16"] if can_compile() else []
    header = (
        f"# Linear kernels on {machine_name()}\n\nCommand: `python benchmarks/int8_kernels.py`; torch"
        f" {torch.__version__}, {threads} threads, median of {repeats}. Speedups are fp32 time / kernel time in"
        " the same run (int8 with bf16 output, activation quantization included); compiled_int8_autotune_vs_bf16 ="
        " compiled bf16 time / compiled int8 time, both autotuned."
    )
    print(write_report(rows, columns, out_dir, "int8_kernels", header)["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)

"""One row (batch 1) through the converted int8 MLP of ``int8_eager.py`` and through the int8 GEMM ops ATen offers,
layer shape by layer shape: where the eager int8 MLP's time goes, against the 2.5x-fp32 target of issue 15.

    python benchmarks/int8_one_row.py          # prints; writes nothing (median us of 400 calls, 2 threads)

Rows: the fp32 and the converted int8 MLP; per layer shape, the int8 layer's forward, oneDNN's
``qlinear_pointwise`` alone (codes quantized beforehand), its ``.tensor`` overload, ``torch._int_mm`` on the
transposed view and on a contiguous copy, and ``torch._weight_int8pack_mm`` with the codes as bf16 (which would
round the exact int32 sums to bf16: listed for its speed only).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from jsonargparse import CLI

import fabric_quant as fq
from fabric_quant.nn import Int8Linear


def _median_us(fn, calls: int) -> float:
    for _ in range(30):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(calls: int = 400, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096),
                              torch.nn.GELU(), torch.nn.Linear(4096, 1024)).eval()  # fmt: skip
    q = fq.convert(fq.quantize_(copy.deepcopy(mlp), "qat-int8"))
    x = torch.randn(1, 1024)
    with torch.inference_mode():
        fp32, int8 = _median_us(lambda: mlp(x), calls), _median_us(lambda: q(x), calls)
        print(f"torch {torch.__version__}, {threads} threads, median of {calls} calls (us)")
        print(f"MLP fp32 {fp32:.0f}, int8 {int8:.0f} ({fp32 / int8:.2f}x)\n")
        print("| layer | int8 forward | qlinear | qlinear.tensor | _int_mm view | _int_mm contiguous | int8pack bf16 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for layer in (m for m in q if isinstance(m, Int8Linear)):
            row = _layer_times(layer, calls)
            print(f"| {layer.in_features} x {layer.out_features} | " + " | ".join(f"{t:.0f}" for t in row) + " |")


def _layer_times(layer: Int8Linear, calls: int) -> list[float]:
    xi = torch.randn(1, layer.in_features)
    codes = torch.randint(-127, 128, (1, layer.in_features), dtype=torch.int8)
    weight, scale = layer.int8_weight(), layer.weight_scale.float().expand(layer.out_features).contiguous()
    packed = torch.ops.onednn.qlinear_prepack(weight, None)
    args = (packed, scale, None, layer.bias, 1.0, 0, torch.float32, "none", [], "")
    t_scale, t_zero = torch.tensor(0.01), torch.tensor(0, dtype=torch.int32)
    view, contiguous = weight.t(), weight.t().contiguous()
    codes_bf16, scale_bf16 = codes.bfloat16(), scale.bfloat16()
    return [
        _median_us(lambda: layer(xi), calls),
        _median_us(lambda: torch.ops.onednn.qlinear_pointwise(codes, 0.01, 0, *args), calls),
        _median_us(lambda: torch.ops.onednn.qlinear_pointwise.tensor(codes, t_scale, t_zero, *args), calls),
        _median_us(lambda: torch._int_mm(codes, view), calls),
        _median_us(lambda: torch._int_mm(codes, contiguous), calls),
        _median_us(lambda: torch._weight_int8pack_mm(codes_bf16, weight, scale_bf16), calls),
    ]

if __name__ == "__main__":
    CLI(main, as_positional=False)

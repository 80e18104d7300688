"""Why an eager int8 layer at batch 1 costs more than its GEMM: the small calls between two GEMMs run cold.

    python benchmarks/cold_ops.py          # prints; writes nothing

A one-row int8 GEMM on a 4096 x 4096 weight streams 16 MB through the core's caches (2 MB of L2 here), so the code
and data of whatever runs next come from L3. This times the one-row activation quantization of a dynamic int8
layer two ways, each warm (back to back) and right after such a GEMM (GEMM + quantization minus GEMM alone):
- ``aten``: the ATen chain the one-row path used before (abs, amax, item, mul, round_, to int8);
- ``numpy``: the chain it uses now (`fabric_quant.nn.onednn_linear.one_row_codes`; same codes).
Median of ``calls`` calls per timing, the timings taken in turns (``measure_latencies``).
"""

from __future__ import annotations

import numpy
import torch
from jsonargparse import CLI

_F32 = numpy.float32
_EPS = torch.finfo(torch.float32).eps


def aten_codes(x: torch.Tensor) -> torch.Tensor:
    """The one-row quantization as it was before (the same codes as ``one_row_codes``)."""
    scale = _F32(max(float(x.abs().amax()), _EPS)) / _F32(127)
    return torch.mul(x, float(_F32(1) / scale)).round_().to(torch.int8)


def main(features: int = 4096, calls: int = 300, threads: int = 2, seed: int = 0) -> None:
    from fabric_quant.nn.onednn_linear import one_row_codes
    from fabric_quant.report import measure_latencies

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    n = k = features
    packed = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, (n, k), dtype=torch.int8), None)
    w_scale, x = torch.rand(n), torch.randn(1, k)
    q = aten_codes(x)
    assert torch.equal(q, one_row_codes(x)[0])

    def gemm():
        return torch.ops.onednn.qlinear_pointwise(q, 0.01, 0, packed, w_scale, None, None, 1.0, 0, torch.float32,
                                                  "none", [], "")  # fmt: skip

    fns = {"gemm": gemm}
    for name, codes in (("aten", aten_codes), ("numpy", one_row_codes)):
        fns[name] = lambda c=codes: c(x)
        fns[f"gemm + {name}"] = lambda c=codes: (gemm(), c(x))
    with torch.inference_mode():
        us = {name: t["median_ms"] * 1e3 for name, t in measure_latencies(fns, calls, warmup=10).items()}
    print(f"`python benchmarks/cold_ops.py --features {features} --calls {calls} --threads {threads}`; torch"
          f" {torch.__version__}, CPU, {threads} threads; one-row int8 GEMM {k} -> {n}:"
          f" {us['gemm']:.0f} us\n")  # fmt: skip
    print("| quantization of one row | warm us | after the GEMM us | cold / warm |")
    print("|---|---|---|---|")
    for name in ("aten", "numpy"):
        cold = us[f"gemm + {name}"] - us["gemm"]
        print(f"| {name} | {us[name]:.1f} | {cold:.1f} | {cold / us[name]:.1f}x |")


if __name__ == "__main__":
    CLI(main, as_positional=False)

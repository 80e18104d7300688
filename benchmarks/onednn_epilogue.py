"""What the rescale after oneDNN's int8 GEMM costs in eager dynamic int8 (``ptq-dynamic-int8``): the per-token scale
and bias ``addcmul`` timed on a tensor already in cache, and right after ``torch.ops.onednn.qlinear_pointwise``
wrote it (GEMM + rescale minus GEMM alone), on all-MiniLM-L6-v2's Linear shapes at 128 tokens (batch 1).

    python benchmarks/onednn_epilogue.py          # prints; writes nothing

Median of 300 calls per timing, the three timings of a shape taken in turns (``measure_latencies``), 2 threads.
"""

from __future__ import annotations

import torch
from jsonargparse import CLI


def main(rows: int = 128, calls: int = 300, threads: int = 2, seed: int = 0) -> None:
    from fabric_quant.nn.onednn_linear import quantize_per_token
    from fabric_quant.report import measure_latencies

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    print(f"`python benchmarks/onednn_epilogue.py --rows {rows} --calls {calls} --threads {threads}`; torch"
          f" {torch.__version__}, CPU, {threads} threads\n")  # fmt: skip
    print("| shape (in -> out) | qlinear us | qlinear + addcmul us | addcmul alone us | extra after qlinear us |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for k, n in ((384, 1152), (384, 384), (384, 1536), (1536, 384)):
            packed = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 128, (n, k), dtype=torch.int8), None)
            w_scale, bias = torch.rand(n), torch.randn(n)
            q, scale = quantize_per_token(torch.randn(rows, k))

            def gemm(q=q, packed=packed, w_scale=w_scale):
                return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, w_scale, None, None, 1.0, 0,
                                                          torch.float32, "none", [], "")  # fmt: skip

            def both(gemm=gemm, bias=bias, scale=scale):
                out = gemm()
                torch.addcmul(bias, out, scale, out=out)  # as fabric_quant.nn.onednn_linear does

            cached = gemm()
            fns = {"gemm": gemm, "both": both,
                   "alone": lambda c=cached, b=bias, s=scale: torch.addcmul(b, c, s, out=c)}  # fmt: skip
            t = {k: v["median_ms"] * 1e3 for k, v in measure_latencies(fns, calls, warmup=20).items()}
            t_gemm, t_both, alone = t["gemm"], t["both"], t["alone"]
            print(f"| {k} -> {n} | {t_gemm:.1f} | {t_both:.1f} | {alone:.1f} | {t_both - t_gemm - alone:.1f} |")


if __name__ == "__main__":
    CLI(main, as_positional=False)

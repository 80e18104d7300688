"""Weight bandwidth of the one-row matmul kernels when the weights come from memory, not cache: bf16 ``F.linear``,
ATen's ``torch._weight_int8pack_mm`` and oneDNN's int8 x int8 GEMM (``torch.ops.onednn.qlinear_pointwise`` on a
prepacked weight) at 1, 2 and 4 activation rows. Why ``woq-int8`` runs the latter on split activations
(fabric_quant/nn/split_int8.py): decoding reads every weight once per token.

    python benchmarks/int8_stream.py          # prints; writes nothing

Each kernel cycles through ``copies`` distinct weights of ``out_features x in_features``, so a call rarely finds its
weight in cache; time per call is the median of ``repeats`` rounds over all copies. GB/s = weight bytes / time.
"""

from __future__ import annotations

import time

import torch
from jsonargparse import CLI


def _per_call(fn, weights: list, repeats: int) -> float:
    for w in weights * 2:  # warm-up: oneDNN primitives built, pages touched
        fn(w)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w)
        rounds.append((time.perf_counter() - start) / len(weights))
    return sorted(rounds)[len(rounds) // 2]


def main(in_features: int = 2048, out_features: int = 8192, copies: int = 16, repeats: int = 7,
         threads: int = 2, seed: int = 0) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    k, n = in_features, out_features
    int8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, k, dtype=torch.bfloat16)
    scale, ones = torch.rand(n, dtype=torch.bfloat16), torch.ones(n)
    print(f"`python benchmarks/int8_stream.py --in_features {k} --out_features {n} --copies {copies} --repeats"
          f" {repeats} --threads {threads}`; torch {torch.__version__}, CPU, {threads} threads\n")  # fmt: skip
    print("| kernel | rows | ms per call | weight GB/s |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        rows = [("bf16 F.linear", 1, 2 * n * k, lambda w: torch.nn.functional.linear(x, w), bf16),
                ("ATen _weight_int8pack_mm (bf16 act)", 1, n * k,
                 lambda w: torch._weight_int8pack_mm(x, w, scale), int8)]  # fmt: skip
        packed = [torch.ops.onednn.qlinear_prepack(w, None) for w in int8]
        for m in (1, 2, 4):
            q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            def gemm(p, q=q):
                return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, p, ones, None, None, 1.0, 0, torch.float32,
                                                          "none", [], "")  # fmt: skip

            rows.append(("oneDNN qlinear_pointwise (int8 x int8)", m, n * k, gemm, packed))
        for name, m, nbytes, fn, weights in rows:
            t = _per_call(fn, weights, repeats)
            print(f"| {name} | {m} | {t * 1e3:.3f} | {nbytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    CLI(main, as_positional=False)

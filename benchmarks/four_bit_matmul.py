"""The 4-bit training matmul whole (bitsandbytes' ``MatMul4Bit``) against in pieces (``fabric_quant``'s layer, see
fabric_quant/nn/four_bit_matmul.py): forward plus input gradient of one nf4-dq layer of each Llama-3.2-1B MLP shape,
512 tokens, bf16, one thread, the median of ``--calls`` after a warm-up, both in the same run (in turns:
``fabric_quant.report.measure_latencies``).

    python benchmarks/four_bit_matmul.py
"""

from __future__ import annotations

import torch
from jsonargparse import CLI


def _times(out_features: int, in_features: int, tokens: int, calls: int) -> tuple[float, float]:
    """Median ms of bitsandbytes' whole-weight matmul and of the layer's pieces, forward + input gradient."""
    import bitsandbytes as bnb

    from fabric_quant.nn.bnb import Linear4bit
    from fabric_quant.report import measure_latencies

    layer = Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True)
    layer.quantize_(torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02)
    x = torch.randn(tokens, in_features, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, out_features, dtype=torch.bfloat16)
    state = layer.weight.quant_state
    times = measure_latencies(
        {"whole": lambda: torch.autograd.grad(bnb.matmul_4bit(x, layer.weight, quant_state=state), x, grad),
         "pieces": lambda: torch.autograd.grad(layer(x), x, grad)},
        calls, warmup=1, inference=False,
    )  # fmt: skip
    return times["whole"]["median_ms"], times["pieces"]["median_ms"]


def main(tokens: int = 512, calls: int = 10, threads: int = 1) -> None:
    import bitsandbytes as bnb

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"`python benchmarks/four_bit_matmul.py --tokens {tokens} --calls {calls} --threads {threads}`; torch"
          f" {torch.__version__}, bitsandbytes {bnb.__version__}\n")  # fmt: skip
    print("| weight (out x in) | whole (bitsandbytes) ms | in pieces ms | pieces / whole |\n|---|---|---|---|")
    for out_features, in_features in ((8192, 2048), (2048, 8192)):
        a, b = _times(out_features, in_features, tokens, calls)
        print(f"| {out_features} x {in_features} | {a:.1f} | {b:.1f} | {b / a:.2f} |")


if __name__ == "__main__":
    CLI(main, as_positional=False)

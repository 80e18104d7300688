"""bitsandbytes' CPU 4-bit dequantization against the portable reading of the same packed bytes, for a row length
that is a multiple of the block size (128) and one that is not (96): the mean absolute error of each against the
original Gaussian weight. Why fabric_quant's ``Linear4bit`` reads even, non-multiple row lengths portably on CPU
(fabric_quant/nn/four_bit_matmul.py).

    python benchmarks/bnb_cpu_dequant.py          # prints; writes nothing
"""

from __future__ import annotations

import torch
from jsonargparse import CLI


def main(rows: int = 256, seed: int = 0) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from fabric_quant.nn.four_bit_matmul import block_constants, portable_dequantize

    print(f"`python benchmarks/bnb_cpu_dequant.py --rows {rows} --seed {seed}`; torch {torch.__version__},"
          f" bitsandbytes {bnb.__version__}, CPU, weights N(0, 1), block size 64\n")  # fmt: skip
    print("| type | shape | portable error | bitsandbytes CPU kernel error | kernel / portable |")
    print("|---|---|---|---|---|")
    for quant_type in ("nf4", "fp4"):
        for cols in (128, 96):
            weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
            packed, state = quantize_4bit(weight, blocksize=64, quant_type=quant_type, quant_storage=torch.uint8)
            portable = portable_dequantize(packed.reshape(-1), block_constants(state), state, torch.float32)
            kernel = dequantize_4bit(packed, state)
            a, b = (portable - weight).abs().mean().item(), (kernel - weight).abs().mean().item()
            print(f"| {quant_type} | {rows} x {cols} | {a:.4f} | {b:.4f} | {b / a:.2f} |")


if __name__ == "__main__":
    CLI(main, as_positional=False)

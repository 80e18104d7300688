"""GPU footprint / latency check for every bitsandbytes mode, against bf16 measured in the same run.

    python benchmarks/gpu_check.py            # needs a CUDA GPU; writes benchmarks/results/gpu_check.{md,csv}

A stack of Llama-7B-sized MLP projections (4096 -> 11008 -> 4096, 4 blocks) so the numbers are in the regime
where quantized kernels matter; latency is one forward at batch 1 and 16 tokens, median of 50.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.report import write_report

COLUMNS = ("mode", "gpu", "weight_mb", "bits_per_quantized_param", "peak_mb", "lat_b1_ms", "lat_b16_ms", "speed_b1")


def model() -> torch.nn.Module:
    blocks = [torch.nn.Sequential(torch.nn.Linear(4096, 11008, bias=False), torch.nn.SiLU(),
                                  torch.nn.Linear(11008, 4096, bias=False)) for _ in range(4)]  # fmt: skip
    return torch.nn.Sequential(*blocks)


def cuda_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(out_dir: Path = Path("benchmarks/results")) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    rows = []
    for mode in ["bf16-true", *fq.available_modes("bitsandbytes")]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if mode == "bf16-true":
            fabric = Fabric(accelerator="cuda", devices=1, precision="bf16-true")
        else:
            dtype = torch.float16 if mode.startswith("int8") else torch.bfloat16  # LLM.int8() CUDA kernels: fp16
            fabric = Fabric(accelerator="cuda", devices=1, plugins=fq.precision_plugin(mode, dtype=dtype))
        with fabric.init_module():
            net = model()
        net = fabric.setup_module(net)
        net.eval()
        fp = fq.footprint(net)
        x1, x16 = torch.randn(1, 4096, device="cuda"), torch.randn(16, 4096, device="cuda")
        with torch.inference_mode():
            b1, b16 = cuda_ms(partial(net, x1)), cuda_ms(partial(net, x16))
        rows.append({
            "mode": mode, "gpu": gpu, "weight_mb": fp.total_bytes / 1e6,
            "bits_per_quantized_param": fp.bits_per_quantized_param,
            "peak_mb": torch.cuda.max_memory_allocated() / 1e6, "lat_b1_ms": b1, "lat_b16_ms": b16,
            "speed_b1": (rows[0]["lat_b1_ms"] / b1) if rows else 1.0,
        })  # fmt: skip
    header = f"# GPU check on {gpu}\n\nCommand: `python benchmarks/gpu_check.py`; torch {torch.__version__}."
    paths = write_report(rows, COLUMNS, out_dir, "gpu_check", header)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()

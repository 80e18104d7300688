"""GPU check of every quantized mode: this package's plugin against Lightning's own ``BitsandbytesPrecision`` for each
bitsandbytes mode, and the weight-only modes, all against bf16 measured in the same run.

    python benchmarks/gpu_check.py            # needs a CUDA GPU; writes benchmarks/results/gpu_check.{md,csv,png}

A stack of Llama-7B-sized MLP projections (4096 -> 11008 -> 4096, 4 blocks) so the numbers are in the regime
where quantized kernels matter. Every arm loads the same float weights (one seeded state dict, quantized on load
under ``fabric.init_module()``), so the outputs are comparable: ``rel_err_vs_bf16`` is against the bf16 arm's output
and ``max_diff_vs_lightning`` against Lightning's plugin in the same mode (0 = the same numbers). Latency is one
forward at batch 1 and 16 tokens, median of 50 after 5 warm-ups. An arm that fails records its error and the run
goes on.
"""

from __future__ import annotations

import gc
import sys
import traceback
from functools import partial
from pathlib import Path

import torch
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.report import write_report

COLUMNS = ("arm", "plugin", "gpu", "weight_mb", "bits_per_quantized_param", "peak_mb", "lat_b1_ms", "lat_b16_ms",
           "speed_b1_vs_bf16", "rel_err_vs_bf16", "max_diff_vs_lightning", "error")  # fmt: skip
WOQ = {"woq-int8": {}, "woq-int4-g128": {"group_size": 128}, "woq-int4-g32": {"group_size": 32}}


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


def _fabric(arm: str, plugin: str) -> Fabric:
    if arm == "bf16" or arm.startswith("woq"):
        return Fabric(accelerator="cuda", devices=1, precision="bf16-true")
    dtype = torch.float16 if arm.startswith("int8") else torch.bfloat16  # LLM.int8()'s CUDA kernels: fp16
    if plugin == "lightning":
        from lightning.fabric.plugins import BitsandbytesPrecision

        return Fabric(accelerator="cuda", devices=1, plugins=BitsandbytesPrecision(arm, dtype=dtype))
    return Fabric(accelerator="cuda", devices=1, plugins=fq.precision_plugin(arm, dtype=dtype))


def run_arm(arm: str, plugin: str, state: dict, xs: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    gc.collect()  # the last arm's model sits in reference cycles (Fabric's wrappers): free it before the peak resets
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fabric = _fabric(arm, plugin)
    with fabric.init_module():
        net = model()
    net.load_state_dict(state)  # float weights: the quantized layers quantize them as they load
    net = fabric.setup_module(net)
    if arm.startswith("woq"):
        fq.quantize_(net, "woq-int4" if "int4" in arm else "woq-int8", **WOQ[arm])
    net.eval()
    fp = fq.footprint(net)
    dtype = torch.float16 if arm.startswith("int8") else torch.bfloat16
    x1, x16 = (x.to(dtype) for x in xs)
    with torch.inference_mode():
        out = net(x16).float()
        b1, b16 = cuda_ms(partial(net, x1)), cuda_ms(partial(net, x16))
    row = {"weight_mb": fp.total_bytes / 1e6, "bits_per_quantized_param": fp.bits_per_quantized_param,
           "peak_mb": torch.cuda.max_memory_allocated() / 1e6, "lat_b1_ms": b1, "lat_b16_ms": b16}  # fmt: skip
    del net
    return row, out


def probe_int8_kernels(rows: list[dict], gpu: str) -> None:
    """One 4096 -> 11008 layer at batch 1: bf16, the int8 path WOQLinear takes on CUDA, and ATen's
    ``_weight_int8pack_mm`` (which has a CUDA kernel): is it the better CUDA int8 path?"""
    from fabric_quant.nn.woq import WOQLinear

    lin = torch.nn.Linear(4096, 11008, bias=False, dtype=torch.bfloat16, device="cuda")
    q = WOQLinear.from_float(lin, bits=8, group_size=None)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ref = q(x, path="reference")
    arms = {"bf16 F.linear": partial(lin, x), "woq-int8 cuda-int8 path": partial(q, x)}
    try:
        out = torch._weight_int8pack_mm(x, q.qweight, q.scales.to(torch.bfloat16))
        arms["torch._weight_int8pack_mm"] = partial(torch._weight_int8pack_mm, x, q.qweight,
                                                    q.scales.to(torch.bfloat16))  # fmt: skip
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    except Exception as exc:  # recorded: the point is to learn whether it runs
        err = f"{type(exc).__name__}: {exc}"[:200]
    base = None
    for name, fn in arms.items():
        with torch.inference_mode():
            ms = cuda_ms(fn, repeats=200)
        base = base or ms
        rows.append({"arm": f"layer 4096x11008 b1: {name}", "plugin": "probe", "gpu": gpu, "lat_b1_ms": ms,
                     "speed_b1_vs_bf16": base / ms,
                     "rel_err_vs_bf16": err if name.startswith("torch.") else None})  # fmt: skip


def main(out_dir: Path = Path("benchmarks/results")) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    torch.manual_seed(0)
    state = {k: v.to(torch.bfloat16) for k, v in model().state_dict().items()}
    xs = (torch.randn(1, 4096, device="cuda"), torch.randn(16, 4096, device="cuda"))
    arms = [("bf16", "torch")]
    for mode in fq.available_modes("bitsandbytes"):
        arms += [(mode, "fabric-quant"), (mode, "lightning")]
    arms += [(arm, "fabric-quant") for arm in WOQ]
    rows, outs = [], {}
    for arm, plugin in arms:
        row = {"arm": arm, "plugin": plugin, "gpu": gpu}
        try:
            measured, outs[arm, plugin] = run_arm(arm, plugin, state, xs)
            row.update(measured)
            ref = outs["bf16", "torch"]
            row["rel_err_vs_bf16"] = ((outs[arm, plugin] - ref).norm() / ref.norm()).item()
            row["speed_b1_vs_bf16"] = (rows[0] if rows else row)["lat_b1_ms"] / row["lat_b1_ms"]
            if plugin == "lightning" and (arm, "fabric-quant") in outs:
                diff = (outs[arm, "fabric-quant"] - outs[arm, plugin]).abs().max().item()
                rows[-1]["max_diff_vs_lightning"] = row["max_diff_vs_lightning"] = diff
        except Exception as exc:  # one failing arm must not hide the others' numbers
            traceback.print_exc()
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(row, flush=True)
        rows.append(row)
    try:
        probe_int8_kernels(rows, gpu)
    except Exception:
        traceback.print_exc()
    header = (f"# GPU check on {gpu}\n\nCommand: `python benchmarks/gpu_check.py`; torch {torch.__version__}, "
              f"bitsandbytes {__import__('bitsandbytes').__version__}.")  # fmt: skip
    paths = write_report(rows, COLUMNS, out_dir, "gpu_check", header)
    print(paths["markdown"].read_text())


if __name__ == "__main__":
    main()

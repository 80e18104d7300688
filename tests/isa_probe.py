"""Run by tests/test_cpu_dispatch.py in a subprocess under a restricted ISA (env ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY): quantizes one small model in every CPU int8/int4 mode, writes each mode's kernels (from
``fabric_quant.kernels.report``) and outputs to a safetensors file, and the ISA decision to a JSON file."""

import copy
import json
import sys

import torch
from safetensors.torch import save_file

import fabric_quant as fq
from fabric_quant.kernel_report import report
from fabric_quant.nn.cpu_isa import activation_encoding

MODES = ("ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "woq-int8", "woq-int4", "qat-int8")


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # wide enough that every layer takes an integer kernel (woq-int8's split GEMM starts at 2^20 weights)
    return torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))


def main(out: str) -> None:
    torch.manual_seed(1)
    inputs = {1: torch.randn(1, 512), 8: torch.randn(8, 512)}
    tensors, kernels = {}, {}
    for mode in MODES:
        q = fq.quantize_(copy.deepcopy(model()), mode)
        if mode.startswith("qat"):
            q = fq.convert(q.eval())
        kernels[mode] = {name: list(ks) for name, ks in report(q, rows=(1, 8), dtype=torch.float32).kernels().items()}
        with torch.inference_mode():
            for rows, x in inputs.items():
                tensors[f"{mode}/{rows}"] = q(x).float().contiguous()
    # static int8: a small CNN (oneDNN's uint8 convolution) and its Linear head, calibrated on a few batches
    torch.manual_seed(2)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(64 * 16 * 16, 256)).eval()  # fmt: skip
    images = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    q = fq.quantize_(cnn, "ptq-static-int8", calibration_data=images)
    kernels["ptq-static-int8"] = {n: list(ks) for n, ks in report(q, rows=(1,), dtype=torch.float32).kernels().items()}
    with torch.inference_mode():
        tensors["ptq-static-int8/4"] = q(images[0]).float().contiguous()
    save_file(tensors, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump({"encoding": activation_encoding()[0], "kernels": kernels}, f)


if __name__ == "__main__":
    main(sys.argv[1])

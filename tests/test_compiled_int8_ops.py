"""Compiled int8 layers on a CPU whose int8 GEMM takes uint8 activations (VNNI, no AMX): ``compile_model`` calls the
eager kernel as one op (``fabric_quant::dynamic_int8_linear``, ``fabric_quant::split_int8_linear``), not the traced
``_int_mm`` form (there inductor's pattern is oneDNN's reference loop, and ATen's ``_int_mm`` slower than eager).
Run in a subprocess with oneDNN capped to AVX512_CORE_VNNI, so it runs on AMX CPUs too; the same numbers as eager,
to the bit (the same kernel on the same codes)."""

import json
import os
import subprocess
import sys

import pytest

from fabric_quant.kernels import can_compile
from fabric_quant.nn.cpu_isa import cpu_features, is_x86

pytestmark = [
    pytest.mark.skipif(not can_compile(), reason="no C++ compiler for inductor"),
    pytest.mark.skipif(not (is_x86() and cpu_features()["vnni"]), reason="needs an x86 CPU with AVX512-VNNI"),
]

SCRIPT = r"""
import copy, json, torch
from torch._inductor.utils import run_and_get_code
import fabric_quant as fq
from fabric_quant.kernels import compile_model
from fabric_quant.nn.onednn_linear import compiled_uint8_kernel
torch.set_num_threads(2)
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024)).eval()
result = {"uint8_kernel": compiled_uint8_kernel()}
for mode, op in (("ptq-dynamic-int8", "dynamic_int8_linear"), ("woq-int8", "split_int8_linear")):
    model = fq.quantize_(copy.deepcopy(mlp), mode).eval()
    for rows in (1, 8):
        torch._dynamo.reset()
        x = torch.randn(rows, 1024)
        with torch.inference_mode():
            eager = model(x)
            out, code = run_and_get_code(compile_model(model), x)
            again = compile_model(model)(x)  # a second compiled copy: the op's packed weight is rebuilt or reused
        result[f"{mode}/{rows}"] = {"equal": torch.equal(out, eager) and torch.equal(again, eager),
                                    "calls": sum(c.count(f"= torch.ops.fabric_quant.{op}.default(") for c in code)}
print("RESULT " + json.dumps(result))
"""


def test_compiled_int8_layers_call_the_eager_uint8_kernel_without_amx():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])
    assert result.pop("uint8_kernel") is True
    for case, r in result.items():
        assert r["equal"], case
        assert r["calls"] == 2, (case, r)  # both Linear layers, not the traced _int_mm form

"""Kernel choice per CPU (issue: int8 paths 100x slower than fp32 on AMD EPYC): every CPU int8 path must run a
fast oneDNN kernel, never its reference loop, on any ISA, and give the same numbers. No timing: oneDNN's verbose
log names the kernel each GEMM ran (``ref_int8`` is the reference loop), and restricted ISAs are emulated with
``ONEDNN_MAX_CPU_ISA`` / ``ATEN_CPU_CAPABILITY`` in subprocesses."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fabric_quant.nn.cpu_isa import cpu_features, kernel_codes, signed_activations
from fabric_quant.nn.onednn_linear import onednn_linear_available, qlinear

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="needs oneDNN's int8 Linear on x86")
PROBE = pathlib.Path(__file__).with_name("isa_probe.py")
ISAS = {
    "native": {},
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}


def test_kernel_codes_shift_signed_codes_by_128():
    q = torch.tensor([-128, -127, -1, 0, 1, 127], dtype=torch.int8)
    shifted, zero_point = kernel_codes(q.clone())
    if signed_activations():
        assert zero_point == 0 and torch.equal(shifted, q)
    else:
        assert zero_point == 128 and shifted.dtype == torch.uint8
        assert torch.equal(shifted.int() - zero_point, q.int())


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5])
def test_qlinear_gives_the_exact_int32_products(rows):
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (320, 256), dtype=torch.int8)
    q = torch.randint(-127, 128, (rows, 256), dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    out = qlinear(q.clone(), 1.0, packed, torch.ones(320), None, torch.float32)
    assert torch.equal(out, torch._int_mm(q, w.t()).float())  # integer sums below 2^24: exact in fp32


def _probe(tmp_path, name: str) -> tuple[dict, dict, str]:
    env = {**os.environ, **ISAS[name], "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / name)
    run = subprocess.run([sys.executable, str(PROBE), out], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out + ".json") as f:
        return json.load(f), load_file(out + ".safetensors"), run.stdout


@needs_onednn
@pytest.mark.slow
def test_every_isa_runs_fast_kernels_with_the_same_results(tmp_path):
    results = {name: _probe(tmp_path, name) for name in ISAS}
    native_out = results["native"][1]
    for name, (info, outputs, log) in results.items():
        # the reference loop never runs: it is what made ptq-dynamic-int8 100x slower than fp32 on AMD EPYC
        matmuls = [line for line in log.splitlines() if ",exec," in line and ",matmul," in line]
        slow = [line for line in matmuls if ",ref" in line]
        assert not slow, f"{name}: oneDNN ran its reference kernel: {slow[0][:200]}"
        features = cpu_features()
        expected = {"native": "s8" if features["amx"] else "u8+128" if features["vnni"] else "float",
                    "avx512-vnni": "u8+128" if features["vnni"] else "float", "avx2": "float"}[name]  # fmt: skip
        assert info["encoding"] == expected, name
        gemm = {"s8": "onednn-s8", "u8+128": "onednn-u8", "float": "float"}[expected]
        static = {"0": "onednn-qconv", "3": "onednn-qconv", "6": "int_mm-static"} if gemm != "float" else {}
        for mode, layers in info["kernels"].items():
            for layer, kernels in layers.items():
                woq8 = "cpu-int8" if gemm == "float" else "cpu-onednn"
                wanted = {"woq-int8": woq8, "woq-int4": "cpu-int4"}.get(mode, gemm)
                wanted = static.get(layer, "float") if mode == "ptq-static-int8" else wanted
                assert set(kernels) == {wanted}, (name, mode, layer, kernels)
        for key, value in outputs.items():
            # the integer products are exact everywhere; the float paths (no VNNI) and int4's float accumulation
            # round in another order, bf16 rests round their outputs, woq-int8 without VNNI takes bf16 activations
            bf16_rounded = "int4" in key or "bf16" in key or (name == "avx2" and key.startswith("woq"))
            tol = 2e-2 if bf16_rounded else 1e-4 if name == "avx2" else 1e-5
            torch.testing.assert_close(value, native_out[key], rtol=tol, atol=tol, msg=lambda m, k=key: f"{k}: {m}")

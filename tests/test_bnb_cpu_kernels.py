"""The bitsandbytes layers' CPU inference kernels (eval mode, no autograd): bitsandbytes' fused AVX512-BF16 4-bit
kernel and oneDNN's int8 GEMM for LLM.int8() weights, each on a derived copy beside the canonical weight, which is
what is saved and trained on. Numbers checked against a float matmul on the package's dequantized weights."""

import copy

import pytest
import torch

import fabric_quant as fq
from fabric_quant.nn.bnb import _avx512_bf16
from fabric_quant.nn.onednn_linear import onednn_linear_available


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def layer(mode: str, in_features: int = 1024, out_features: int = 1024):
    torch.manual_seed(0)
    options = {} if mode == "int8" else {"dtype": torch.bfloat16}  # the fused 4-bit kernel computes in bf16
    return fq.quantize_(torch.nn.Sequential(torch.nn.Linear(in_features, out_features)), mode, **options)[0]


def reference(module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), module.dequantized_weight(), module.bias.float())


def saved(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.skipif(not _avx512_bf16(), reason="bitsandbytes' fused CPU 4-bit kernel needs AVX512-BF16")
@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4-dq"])
def test_4bit_eval_runs_the_fused_kernel_on_a_copy_and_keeps_the_canonical_weight(mode):
    module = layer(mode).eval()
    before = saved(module)
    x = torch.randn(3, 5, 1024)
    with torch.no_grad():
        assert module.kernel(x) == "bnb-gemv-4bit"
        out = module(x)
    # bf16 activations and bf16 block constants in the kernel: within 1 % of the exact product of the same weights
    assert out.shape == (3, 5, 1024) and rel(out, reference(module, x)) < 1e-2
    after = saved(module)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert module._kernel_cache()  # the derived copy is held while in eval mode ...
    module.train()
    assert not module._kernel_cache()  # ... and dropped for training, which takes the canonical path
    x.requires_grad_(True)
    assert module.kernel(x) == "bnb-dequant"
    module(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.skipif(not _avx512_bf16(), reason="bitsandbytes' fused CPU 4-bit kernel needs AVX512-BF16")
def test_4bit_kernel_switch_and_shapes_it_refuses():
    module = layer("nf4-dq").eval()
    module.cpu_gemv = False
    assert module.kernel(torch.randn(1, 1024)) == "bnb-dequant"
    module.cpu_gemv, module.compute_dtype = True, torch.float32  # fp32 asked for: computed in fp32, not bf16
    assert module.kernel(torch.randn(1, 1024)) == "bnb-dequant"
    odd = layer("nf4-dq", 1024, 48).eval()  # 48 outputs: not a multiple of the kernel's 32-row blocks
    assert odd.kernel(torch.randn(1, 1024)) == "bnb-dequant"
    x = torch.randn(2, 1024)
    with torch.no_grad():
        assert rel(odd(x), reference(odd, x)) < 1e-2  # bitsandbytes' dequantizing path


@pytest.mark.skipif(not onednn_linear_available(), reason="needs oneDNN's exact int8 GEMM (VNNI or AMX)")
def test_int8_eval_runs_onednn_on_split_activations_with_the_exact_row_scales():
    module = layer("int8").eval()
    before = saved(module)
    x = torch.randn(4, 7, 1024)
    with torch.inference_mode():
        assert module.kernel(x) == "cpu-onednn"
        out = module(x)
        bf16 = module(x.bfloat16())
    assert rel(out, reference(module, x)) < 1e-4  # ~16-bit activations, fp32 scales: far below int8's own error
    assert bf16.dtype == torch.bfloat16 and rel(bf16, reference(module, x.bfloat16())) < 1e-2
    after = saved(module)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a deep copy (no packed copy carried over) and a reloaded checkpoint compute the same
    clone = copy.deepcopy(module)
    assert not clone._kernel_cache()
    with torch.inference_mode():
        assert torch.equal(clone(x), out)
    module.train()
    assert not module._kernel_cache()
    x = x.clone().requires_grad_(True)
    assert module.kernel(x) == "bnb-int8-fp"  # autograd: bitsandbytes' matmul, whose backward is the reference
    module(x).sum().backward()
    assert x.grad.shape == x.shape

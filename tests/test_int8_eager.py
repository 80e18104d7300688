"""The eager oneDNN path of dynamic int8 Linear layers against the torch._int_mm reference: same codes, same
outputs up to float rounding, derived state never saved, fallbacks."""

import copy
import warnings

import pytest
import torch

import fabric_quant as fq
from fabric_quant.nn import Int8Config, Int8Linear
from fabric_quant.nn import int8 as int8_module
from fabric_quant.nn.onednn_linear import onednn_linear_available, quantize_per_token
from fabric_quant.numerics.quant import fake_quant_per_token

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="needs oneDNN's int8 Linear on x86")


def _reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    layer.eager_kernel = False
    try:
        return layer(x)
    finally:
        del layer.eager_kernel  # back to the class default


@pytest.mark.parametrize("shape", [(1, 64), (7, 300), (96, 1024)])  # the last one takes the amax/amin branch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_gives_the_reference_codes_and_scales(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    x[0] = 0.0  # an all-zero token keeps a tiny scale and zero codes
    x[-1, :4] = torch.tensor([2.5, -2.5, 0.5, -127.0]) * x[-1].float().abs().max() / 127  # ties: half to even
    q, scale = quantize_per_token(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    assert torch.equal(q.float() * scale, fake_quant_per_token(x.float()))
    assert torch.equal(q[0], torch.zeros_like(q[0]))


@needs_onednn
@pytest.mark.parametrize("shape", [(2, 16, 2048), (1, 1, 2048)])  # many tokens; one token (scale fused in the GEMM)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("config", [Int8Config(), Int8Config(per_channel=False), Int8Config(bits=4)])
def test_onednn_path_matches_the_int_mm_reference(shape, bias, config):
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(2048, 640, bias=bias), config, relu=bias)
    x = torch.randn(shape) * 3
    with torch.inference_mode():
        out, ref = layer(x), _reference(layer, x)
    assert "packed" in layer._kernel  # it did run the oneDNN kernel
    assert out.shape == ref.shape == (*shape[:-1], 640) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not bias or out.min() == 0  # the fused ReLU


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2048), (1, 1, 2048)])
@pytest.mark.parametrize("grad", [False, True])  # an input that requires grad (the codes are computed in numpy)
def test_one_token_path_uses_the_reference_codes(monkeypatch, dtype, shape, grad):
    seen = []
    real = torch.ops.onednn.qlinear_pointwise

    class Spy:
        def __call__(self, q, x_scale, zero_point, *args):
            seen.append((q.int() - zero_point, x_scale))  # signed codes, or uint8 ones shifted by 128 (cpu_isa)
            return real(q, x_scale, zero_point, *args)

    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(2048, 640))
    x = (torch.randn(shape) * 5).to(dtype)
    x[..., :3] = torch.tensor([2.5, -2.5, 0.5]) * x.float().abs().max() / 127  # ties: half to even
    x.requires_grad_(grad)
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", Spy())
    with torch.no_grad():
        out = layer(x)
    (q, x_scale), expected = seen[0], quantize_per_token(x.detach().reshape(1, -1))
    assert torch.equal(q, expected[0].int()) and x_scale == expected[1].item()
    assert out.shape == (*shape[:-1], 640) and out.dtype == dtype
    torch.testing.assert_close(out.float(), _reference(layer, x.detach()).float(), rtol=0.02, atol=0.02)


@needs_onednn
@pytest.mark.parametrize(
    ("bad", "expected"),
    # a NaN propagates to every output; an inf makes the row's scale inf: every output inf or NaN (0 * inf)
    [(float("nan"), torch.isnan), (float("inf"), lambda t: ~torch.isfinite(t))],
)
def test_one_token_nan_or_inf_gives_non_finite_without_a_numpy_warning(bad, expected):
    layer = Int8Linear.from_float(torch.nn.Linear(2048, 640))
    x = torch.randn(1, 2048)
    x[0, 3] = bad
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" would be one
        out = layer(x)
    assert out.shape == (1, 640) and expected(out).all()


@needs_onednn
def test_onednn_path_bf16_rest_matches_within_bf16_rounding():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    q = fq.quantize_dynamic(net, dtype=torch.bfloat16)
    x = torch.randn(32, 256).bfloat16()
    with torch.inference_mode():
        out = q(x)
        for m in q.modules():
            if isinstance(m, Int8Linear):
                m.eager_kernel = False
        ref = q(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref.float(), rtol=0.02, atol=0.02)


@needs_onednn
def test_in_place_rescale_leaves_bias_and_input_alone_and_promotes_a_bf16_bias():
    # the token scale and bias are applied in place on the GEMM's output: the bias (also one of another dtype,
    # promoted exactly as .float() would) and the input must come out untouched, the output a fresh fp32 tensor
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(512, 384))
    layer.bias.data = layer.bias.data.bfloat16()
    bias, x = layer.bias.detach().clone(), torch.randn(16, 512)
    x0 = x.clone()
    with torch.inference_mode():
        out, ref = layer(x), _reference(layer, x)
    assert "packed" in layer._kernel and out.dtype == torch.float32
    assert torch.equal(layer.bias, bias) and torch.equal(x, x0)
    assert out.data_ptr() not in (layer.bias.data_ptr(), x.data_ptr())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_save_load_stays_bit_exact_and_the_packed_weight_is_rebuilt(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    q = fq.quantize_dynamic(net)
    x = torch.randn(16, 256)
    with torch.inference_mode():
        before = q(x)  # packs the weights
    assert all(not k.endswith(("packed", "_kernel")) for k in q.state_dict())
    path = fq.save_quantized(q, tmp_path / "int8.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    fresh = fq.quantize_dynamic(other)  # different weights: packed on its first call, then replaced by the load
    with torch.inference_mode():
        fresh(x)
    fq.load_quantized(fresh, path)
    for (k, a), b in zip(q.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with torch.inference_mode():
        assert torch.equal(fresh(x), before)  # the packed weight follows the loaded codes
    # an in-place edit of the codes (as load_state_dict does) repacks too
    layer = q[0]
    with torch.no_grad():
        layer.qweight.neg_()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_deepcopy_of_a_packed_model_repacks_its_own_weights():
    torch.manual_seed(0)
    q = fq.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 512)))
    x = torch.randn(16, 256)
    with torch.inference_mode():
        q(x)
        clone = copy.deepcopy(q)
        assert "packed" not in clone[0]._kernel
        assert torch.equal(clone(x), q(x))


def test_fallback_when_the_kernel_refuses(monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("onednn int8 linear: shape not supported")

    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(512, 384))
    x = torch.randn(16, 512)
    with torch.inference_mode():
        ref = _reference(layer, x)
        monkeypatch.setattr(int8_module, "onednn_linear_available", lambda: True)
        monkeypatch.setattr(int8_module, "dynamic_int8_linear", refuse)
        assert torch.equal(layer(x), ref)  # the reference path, same numbers
        assert layer._kernel.get("failed")  # and it is not tried again
        assert torch.equal(layer(x), ref)


def test_reference_path_where_the_kernel_does_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(int8_module, "dynamic_int8_linear", lambda *a, **k: calls.append(1))
    torch.manual_seed(0)
    x = torch.randn(16, 512)
    with torch.inference_mode():
        small = Int8Linear.from_float(torch.nn.Linear(512, 8))  # under SMALL_MATMUL: float path
        grouped = Int8Linear.from_float(torch.nn.Linear(512, 384), Int8Config(group_size=64))
        small(x), grouped(x)
        monkeypatch.setattr(int8_module, "onednn_linear_available", lambda: False)  # e.g. not an x86 CPU
        Int8Linear.from_float(torch.nn.Linear(512, 384))(x)
        monkeypatch.setattr(int8_module, "onednn_linear_available", lambda: True)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what dynamo traces
        Int8Linear.from_float(torch.nn.Linear(512, 384))(x)
    assert calls == []


def _ungrouped(model: torch.nn.Module) -> torch.nn.Module:
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, Int8Linear):
            m._siblings = None
    return other


def _count_gemms(monkeypatch) -> list:
    calls, real = [], torch.ops.onednn.qlinear_pointwise

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sibling_projections_run_as_one_gemm_with_the_same_numbers(monkeypatch, family):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if family == "bert":
        model = BertModel(BertConfig(vocab_size=100, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512)).eval()  # fmt: skip
        per_layer = (6, 4)  # q, k, v, attention output, intermediate, output -> qkv fused
    else:
        model = LlamaModel(LlamaConfig(vocab_size=100, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=512)).eval()  # fmt: skip
        per_layer = (7, 4)  # q, k, v, o, gate, up, down -> qkv and gate/up fused
    q = fq.quantize_dynamic(model, layers=["linear"])
    groups = {id(m._siblings) for m in q.modules() if isinstance(m, Int8Linear) and m._siblings is not None}
    assert len(groups) == (2 if family == "bert" else 4)
    ids = torch.randint(0, 100, (2, 16))  # 32 tokens: every projection big enough for the int8 GEMM
    plain = _ungrouped(q)
    with torch.inference_mode():
        calls = _count_gemms(monkeypatch)
        ref = plain(input_ids=ids).last_hidden_state
        n_plain = len(calls)
        out = q(input_ids=ids).last_hidden_state
    assert (n_plain, len(calls) - n_plain) == (2 * per_layer[0], 2 * per_layer[1])
    assert torch.equal(out, ref)  # the same codes, int32 sums and rescale: bit-identical


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key = torch.nn.Linear(512, 256), torch.nn.Linear(512, 384, bias=False)
        self.value = torch.nn.Linear(512, 256)


@needs_onednn
def test_siblings_called_on_other_or_edited_inputs_compute_afresh():
    torch.manual_seed(0)
    q = fq.quantize_dynamic(_Attention())
    assert q.query._siblings is q.key._siblings is q.value._siblings is not None
    plain = _ungrouped(q)
    x1, x2 = torch.randn(9, 512), torch.randn(9, 512)
    with torch.no_grad():  # normal tensors: an in-place edit bumps their version
        assert torch.equal(q.query(x1), plain.query(x1))
        assert torch.equal(q.key(x2), plain.key(x2))  # another input: not the pending output for x1
        assert torch.equal(q.value(x1), plain.value(x1))  # x1's pending value output was dropped by the x2 call
        q.query(x1)
        x1.mul_(2)  # edited in place between two members' calls
        assert torch.equal(q.key(x1), plain.key(x1))
        assert torch.equal(q.key(x1[:8]), plain.key(x1[:8]))  # a view of the same storage, another shape
    copied = copy.deepcopy(q)  # the copy's group holds the copy's layers, and no pending state
    assert copied.query._siblings.members == [copied.query, copied.key, copied.value]
    assert not copied.query._siblings.pending
    with torch.inference_mode():
        assert torch.equal(copied.value(x2), plain.value(x2))

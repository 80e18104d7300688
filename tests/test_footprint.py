import math

import pytest
import torch
from conftest import make_net, setup_quantized

import fabric_quant as fq

# QLoRA: 4 bits + one fp32 absmax per 64 weights = 4.5; double quantization = 4 + 8/64 + 32/(64*256) = 4.127.
BITS_BOUND = {"nf4": 4.51, "fp4": 4.51, "nf4-dq": 4.13, "fp4-dq": 4.13, "int8": 8.1}


@pytest.mark.parametrize("mode", sorted(BITS_BOUND))
def test_bits_per_quantized_param(mode):
    _, model = setup_quantized(mode, make_net())
    fp = fq.footprint(model)
    assert fp.bits_per_quantized_param <= BITS_BOUND[mode]
    assert fp.bits_per_quantized_param >= (4.12 if mode != "int8" else 8.0)
    assert fp.quantized_numel == 512 * 512 + 512 * 64


def test_float_model_has_no_quantized_bytes():
    net = make_net()
    fp = fq.footprint(net)
    assert fp.quantized_numel == 0 and math.isnan(fp.bits_per_quantized_param)
    assert fp.total_bytes == 4 * sum(p.numel() for p in net.parameters())
    assert fp.bits_per_param == 32


def test_int8_training_keeps_float_weights_and_says_so():
    _, model = setup_quantized("int8-training", make_net())
    assert fq.footprint(model).quantized_numel == 0


def test_totals_add_up_and_table_lists_layers():
    _, model = setup_quantized("nf4-dq", make_net())
    fp = fq.footprint(model)
    assert fp.total_bytes == fp.quantized_bytes + fp.table_bytes + fp.float_bytes
    # float part: LayerNorm (2*512) and the two biases (512 + 64), fp32
    assert fp.float_bytes == 4 * (2 * 512 + 512 + 64)
    assert 0 < fp.table_bytes < 0.02 * fp.total_bytes
    table = fp.table()
    assert "| fc1 | Linear_nf4_dq | " in table and "| norm | LayerNorm |" in table and "**total**" in table


def test_shared_tensors_counted_once():
    lin = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(lin, lin)
    assert fq.footprint(model).total_bytes == 4 * (64 + 8)


def test_views_of_a_weight_are_not_counted_again():
    # the converted int8 Linear keeps a transposed view of its int8 weight for torch._int_mm
    q = fq.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 128)))
    assert q[0].qweight_t.data_ptr() == q[0].qweight.data_ptr()
    assert fq.footprint(q).total_bytes == 256 * 128 + 4 * 128 + 4 * 128  # int8 weight, fp32 scales, fp32 bias


def test_lora_wrapped_4bit_layers_are_counted_once():
    # peft's LoRA layer exposes its base layer's weight as a property: the 4-bit storage must not count twice
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    plain = torch.nn.Sequential(torch.nn.Linear(128, 64))
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(plain[0].state_dict())
    layer = layer.to("cpu")  # quantizes
    base = torch.nn.Sequential(layer)
    before = fq.footprint(base).total_bytes
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["0"]))
    adapters = sum(p.numel() * p.element_size() for n, p in wrapped.named_parameters() if "lora_" in n)
    assert fq.footprint(wrapped).total_bytes == before + adapters

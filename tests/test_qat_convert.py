"""Conversion of QAT models to real int8 / packed int4 layers."""

import os

import pytest
import torch
from lightning.fabric import Fabric
from safetensors.torch import save_file
from test_qat import tiny_cnn

import fabric_quant as fq
from fabric_quant.demo.models import digits_images
from fabric_quant.nn import Int8Conv, Int8Linear, pack_int4, unpack_int4
from fabric_quant.qat import QATConfig, QATLinear, convert_layer


def digits(n=512):
    x, y = digits_images()
    return x[:n], y[:n]


def trained_qat_cnn(mode="qat-int8-static", steps=40):
    x, y = digits()
    plugin = fq.precision_plugin(mode, freeze_observer_step=30, freeze_bn_step=25)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = fabric.setup_module(tiny_cnn())
    opt = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=2e-2))
    for step in range(steps):
        plugin.apply_schedule(model, step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        fabric.backward(loss)
        opt.step()
    return plugin, model.module.eval(), x


def test_int4_pack_roundtrip():
    q = torch.randint(-7, 8, (5, 9), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == 23
    assert torch.equal(unpack_int4(packed, 45).reshape(5, 9), q)


@pytest.mark.parametrize("mode", ["qat-int8", "qat-int8-static"])
def test_converted_cnn_matches_fake_quant_model(mode):
    plugin, qat_model, x = trained_qat_cnn(mode)
    deployed = plugin.convert(qat_model)
    assert isinstance(deployed[0], Int8Conv) and isinstance(deployed[8], Int8Linear)
    assert deployed[0].qweight.dtype == torch.int8
    with torch.no_grad():
        expected, got = qat_model(x), deployed(x)
    agreement = (expected.argmax(1) == got.argmax(1)).float().mean().item()
    assert agreement >= 0.99
    # BN folding reorders float ops (1-ulp differences), which can flip a value sitting on a rounding boundary by
    # one quantization step further down; almost every output still matches to 1e-3
    close = torch.isclose(got, expected, atol=1e-3, rtol=1e-3).float().mean().item()
    assert close >= 0.98, close


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_integer_kernel_path_equals_float_reference(activations):
    torch.manual_seed(0)
    qat = QATLinear.from_float(torch.nn.Linear(256, 256), QATConfig(activations=activations))
    x = torch.randn(20, 256)  # 1.3 M multiply-adds: the integer kernel (smaller products take the float path)
    qat(torch.randn(100, 256) * 2)  # calibrates the static observer
    with torch.no_grad():
        reference = qat(x)
        layer = convert_layer(qat)
        assert layer._integer_ok(x) and not layer._integer_ok(x[:2])
        got, small = layer(x), layer(x[:2])
    assert torch.allclose(got, reference, atol=1e-4, rtol=1e-4)
    assert torch.allclose(small, reference[:2], atol=1e-4, rtol=1e-4)


def test_int4_groups_are_packed_and_reference_exact():
    torch.manual_seed(0)
    qat = QATLinear.from_float(torch.nn.Linear(64, 16), QATConfig(weight_bits=4, group_size=32))
    layer = convert_layer(qat)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.numel() == 64 * 16 // 2
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), qat(x), atol=1e-5)
    bits = fq.footprint(torch.nn.Sequential(layer)).bits_per_quantized_param
    assert 4.0 < bits <= 4 + 32 / 32 + 0.01  # 4 bits + one fp32 scale per 32 weights


def test_converted_checkpoint_is_4x_smaller_and_reloads(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "fp32.safetensors")
    plugin = fq.precision_plugin("qat-int8")
    deployed = plugin.convert(plugin.convert_module(net))
    path = fq.save_quantized(deployed, tmp_path / "int8.safetensors")
    ratio = os.path.getsize(tmp_path / "fp32.safetensors") / os.path.getsize(path)
    assert ratio >= 3.9  # int8 + one fp32 scale per 512-wide row; the fp32 biases stay
    fresh = plugin.convert(plugin.convert_module(torch.nn.Sequential(
        torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))))  # fmt: skip
    fq.load_quantized(fresh, path)
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.equal(fresh(x), deployed(x))
    assert fq.footprint(deployed).bits_per_quantized_param == pytest.approx(8 + 32 / 512, abs=0.01)


def test_convert_does_not_touch_the_qat_model():
    plugin, qat_model, _ = trained_qat_cnn(steps=3)
    plugin.convert(qat_model)
    assert not any(isinstance(m, Int8Linear | Int8Conv) for m in qat_model.modules())


def test_embedding_qat_and_conversion(tiny_bert_with_tokenizer):
    from transformers import AutoModel

    from fabric_quant.nn import Int8Embedding
    from fabric_quant.qat import QATEmbedding

    model = AutoModel.from_pretrained(tiny_bert_with_tokenizer)
    plugin = fq.QATPrecision("qat-int8", embeddings=True)
    plugin.convert_module(model)
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, QATEmbedding) and emb.act_observer is None
    rows = emb.weight[1:6]  # (row 0 is the all-zero padding row)
    expected = torch.round(rows / (rows.abs().amax(1, keepdim=True) / 127)) * (rows.abs().amax(1, keepdim=True) / 127)
    assert torch.allclose(emb(torch.arange(1, 6)), expected, atol=1e-7)
    deployed = plugin.convert(model)
    assert isinstance(deployed.embeddings.word_embeddings, Int8Embedding)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        assert torch.allclose(
            deployed.embeddings.word_embeddings(ids), model.eval().embeddings.word_embeddings(ids), atol=1e-6
        )
        out_q, out_d = model(input_ids=ids).last_hidden_state, deployed(input_ids=ids).last_hidden_state
    assert torch.allclose(out_q, out_d, atol=1e-3)
    fp = fq.footprint(deployed)
    assert fp.quantized_numel >= emb.weight.numel()  # the table counts as quantized storage


def test_per_tensor_embedding_converts(tiny_bert_with_tokenizer):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_with_tokenizer)
    plugin = fq.QATPrecision("qat-int4", group_size=None, per_channel=False, embeddings=True)
    plugin.convert_module(model)
    deployed = plugin.convert(model)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        fake, real = model.eval().embeddings.word_embeddings(ids), deployed.embeddings.word_embeddings(ids)
    assert torch.allclose(fake, real, atol=1e-6)
    assert len(torch.unique(real)) <= 16  # one 4-bit grid for the whole table


def test_conv_with_learned_activation_scale_converts_to_the_learned_scale():
    from fabric_quant.qat import QATConv2d

    torch.manual_seed(0)
    conv = QATConv2d.from_float(torch.nn.Conv2d(2, 8, 3), QATConfig(activations="static", learnable_scales=True))
    x = torch.randn(4, 2, 8, 8)
    conv(x).square().mean().backward()  # calibrates the observer and initialises the LSQ scale from it
    with torch.no_grad():
        conv.act_scale.mul_(1.5)  # as if training had moved it away from the observer's range
        conv.act_observer.enabled = False
        expected = conv(x)
        deployed = convert_layer(conv)
        assert deployed.act_scale.item() == pytest.approx(conv.act_scale.item())
        assert torch.allclose(deployed(x), expected, atol=1e-5)

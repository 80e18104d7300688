"""BnbPrecision on CPU with real bitsandbytes kernels, every mode."""

import itertools

import pytest
import torch
from conftest import BNB_MODES, Net, make_net, rel_err, setup_quantized
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.bnb import mode_kind
from fabric_quant.nn import QuantizedLinear

# Relative output error of one layer with Gaussian weights vs fp32. int8: row-wise absmax int8 has an RMS
# error of ~0.73 % on Gaussian rows; 4-bit: QLoRA-level block quantization error (NF4 < FP4).
ERROR_BOUND = {"int8": 0.01, "int8-training": 0.01, "nf4": 0.11, "nf4-dq": 0.11, "fp4": 0.14, "fp4-dq": 0.14}


def layer_error(mode: str, train: bool) -> float:
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256)
    torch.nn.init.normal_(lin.weight, std=0.02)
    x = torch.randn(32, 512)
    ref = lin(x)
    _, model = setup_quantized(mode, torch.nn.Sequential(lin))
    model.train(train)
    with torch.no_grad():
        return rel_err(model(x), ref)


@pytest.mark.parametrize("mode", BNB_MODES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_output_error_within_mode_bound(mode, train):
    assert layer_error(mode, train) < ERROR_BOUND[mode]


def test_nf4_beats_fp4_on_gaussian_weights():
    # QLoRA Table 2 ordering: NF4 is information-theoretically matched to normally distributed weights.
    assert layer_error("nf4", False) < 0.85 * layer_error("fp4", False)
    assert layer_error("nf4-dq", False) < 0.85 * layer_error("fp4-dq", False)


@pytest.mark.parametrize("mode", BNB_MODES)
def test_weights_are_really_quantized(mode):
    _, model = setup_quantized(mode)
    for lin in (model.module.fc1, model.module.fc2):
        assert isinstance(lin, QuantizedLinear) and lin.fq_mode == mode
        n = lin.in_features * lin.out_features
        if mode == "int8":
            assert lin.weight.dtype == torch.int8 and lin.weight.numel() == n
            assert lin.weight.element_size() * lin.weight.numel() == n
        elif mode == "int8-training":  # float weights, quantized on every forward (trainable)
            assert lin.weight.dtype == torch.float32 and lin.weight.requires_grad
        else:
            assert lin.weight.dtype == torch.uint8 and lin.weight.numel() * lin.weight.element_size() == n // 2
            state = lin.weight.quant_state
            assert state.quant_type == mode[:3] and state.nested == mode.endswith("-dq")
            assert tuple(state.shape) == (lin.out_features, lin.in_features)


@pytest.mark.parametrize("mode", BNB_MODES)
def test_backward_reaches_inputs_and_trainable_float_params(mode):
    _, model = setup_quantized(mode)
    x = torch.randn(4, 512, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    net = model.module
    for param in (net.norm.weight, net.norm.bias, net.fc1.bias, net.fc2.bias):
        assert param.grad is not None and param.grad.abs().sum() > 0
    for lin in (net.fc1, net.fc2):
        if mode == "int8-training":
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
        else:
            assert not lin.weight.requires_grad and lin.weight.grad is None


@pytest.mark.parametrize("mode", ["nf4-dq", "int8-training"])
def test_a_training_step_lowers_the_loss(mode):
    fabric, model = setup_quantized(mode)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-2))
    torch.manual_seed(1)
    # frozen quantized weights: the biases and LayerNorm can still fit a shifted target
    x, target = torch.randn(64, 512), torch.full((64, 64), 0.5)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_default_dtype_fits_the_cpu_and_casts_float_layers():
    plugin = fq.BnbPrecision("nf4")
    expected = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    assert plugin.dtype is expected
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = fabric.setup_module(make_net())
    assert model.module.norm.weight.dtype is expected and model.module.fc1.bias.dtype is expected
    assert model.module.fc1.compute_dtype is expected
    out = model(torch.randn(2, 512))
    assert out.dtype is torch.float32  # convert_output restores the default dtype


@pytest.mark.parametrize("mode", ["int8", "int8-training"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_on_cpu_does_not_need_fp16(mode, dtype):
    _, model = setup_quantized(mode, dtype=dtype)
    assert model(torch.randn(2, 512)).isfinite().all()


def test_ignore_modules_keeps_prefixed_layers_float():
    _, model = setup_quantized("nf4", ignore_modules={"fc2"})
    assert isinstance(model.module.fc1, QuantizedLinear)
    assert type(model.module.fc2) is torch.nn.Linear


def test_hf_model_from_pretrained_with_ignore_modules(tiny_bert_dir):
    from transformers import AutoModel

    _, model = setup_quantized("nf4-dq", AutoModel.from_pretrained(tiny_bert_dir), ignore_modules=["pooler"])
    bert = model.module
    assert isinstance(bert.encoder.layer[0].attention.self.query, QuantizedLinear)
    assert type(bert.pooler.dense) is torch.nn.Linear
    out = model(input_ids=torch.randint(0, 200, (2, 16)))
    assert out.last_hidden_state.shape == (2, 16, 64) and out.last_hidden_state.isfinite().all()


@pytest.mark.parametrize("mode", BNB_MODES)
def test_init_module_creates_quantized_layers_directly(mode):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode, dtype=torch.float32))
    with fabric.init_module():
        net = Net()
    # quantized at construction: int8 codes, or 4-bit codes packed in uint8; int8-training trains its float weight
    # (quantized in each forward), so it alone keeps it, in the plugin's dtype
    storage = {"int8": torch.int8, "int8-training": torch.float32}.get(mode, torch.uint8)
    for lin in (net.fc1, net.fc2):
        assert isinstance(lin, QuantizedLinear) and lin.is_quantized()
        assert lin.weight.dtype == storage
    # loading a float checkpoint quantizes on load, exactly as converting the float model does
    source = make_net(seed=3)
    net.load_state_dict(source.state_dict())
    _, converted = setup_quantized(mode, make_net(seed=3))
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.equal(fabric.setup_module(net)(x), converted(x))


def test_model_built_on_meta_device_quantizes_on_load():
    with torch.device("meta"):
        net = Net()
    fq.precision_plugin("nf4-dq", dtype=torch.float32).convert_module(net)
    assert net.fc1.weight.device.type == "meta" and not net.fc1.is_quantized()
    net.load_state_dict(make_net(seed=4).state_dict(), assign=True)
    assert net.fc1.is_quantized() and net.fc1.weight.device.type == "cpu"
    _, reference = setup_quantized("nf4-dq", make_net(seed=4))
    assert torch.equal(net.fc1.weight, reference.module.fc1.weight)


@pytest.mark.parametrize("mode", BNB_MODES)
def test_float_checkpoint_loads_into_quantized_model(mode):
    _, model = setup_quantized(mode, make_net(seed=0))
    source = make_net(seed=5)
    model.load_state_dict(source.state_dict())
    _, direct = setup_quantized(mode, make_net(seed=5))
    for key, value in direct.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("mode", BNB_MODES)
def test_move_to_device_false_still_quantizes_before_first_forward(mode):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode, dtype=torch.float32))
    model = fabric.setup_module(make_net(), move_to_device=False)
    model(torch.randn(2, 512))
    assert model.module.fc1.is_quantized()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("shape", [(1536, 1024), (777, 40), (3, 5)])
def test_piecewise_quantization_equals_bitsandbytes(quant_type, compress_statistics, shape, monkeypatch):
    """The loader quantizes a few rows at a time (small temporaries); the packed bytes and every statistic must be
    bitsandbytes' own for the whole tensor, including shapes whose blocks do not align with rows."""
    from bitsandbytes.functional import quantize_4bit

    from fabric_quant.nn import bnb as fq_bnb

    monkeypatch.setattr(fq_bnb, "_QUANTIZE_PIECE", 4096)  # many pieces even for the small shapes
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(torch.bfloat16)
    ref_packed, ref_state = quantize_4bit(weight, blocksize=64, compress_statistics=compress_statistics,
                                           quant_type=quant_type, quant_storage=torch.uint8)  # fmt: skip
    packed, state = fq_bnb.quantize_4bit_rows(weight, torch.device("cpu"), 64, quant_type, compress_statistics,
                                              torch.uint8)  # fmt: skip
    assert torch.equal(packed, ref_packed)
    ours, ref = state.as_dict(packed=True), ref_state.as_dict(packed=True)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key].view(torch.uint8), ref[key].view(torch.uint8)), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 128), (200, 192), (48, 45)])
def test_training_matmul_in_pieces_equals_bitsandbytes(quant_type, compress_statistics, dtype, shape, monkeypatch):
    """A training forward dequantizes a big 4-bit weight a few rows at a time, its input gradient a few columns at
    a time: the output, the input gradient and the bias gradient must be bitsandbytes' up to summation order
    (smaller matmuls may block their sums differently); a row length not a multiple of the block size is one piece
    (four_bit_matmul.dequantized_pieces); without grad, bitsandbytes' own path."""
    import bitsandbytes as bnb

    from fabric_quant.nn import bnb as fq_bnb
    from fabric_quant.nn import four_bit_matmul

    torch.manual_seed(0)
    layer = fq_bnb.Linear4bit(shape[1], shape[0], compute_dtype=dtype, quant_type=quant_type,
                              compress_statistics=compress_statistics)  # fmt: skip
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, shape[1], dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, shape[0], dtype=dtype)
    ref = bnb.matmul_4bit(x, layer.weight, bias=layer.bias.to(dtype), quant_state=layer.weight.quant_state)
    ref_x, ref_b = torch.autograd.grad(ref, (x, layer.bias), grad)
    pieces, columns = [], []
    real_rows, real_columns = four_bit_matmul.dequantized_pieces, four_bit_matmul.dequantized_columns
    monkeypatch.setattr(fq_bnb, "PIECE_ELEMENTS", 1000)
    def recorded(real, record):
        return lambda *a, **k: [record.append(p[:2]) or p for p in real(*a[:3], elements=1000)]

    monkeypatch.setattr(four_bit_matmul, "dequantized_pieces", recorded(real_rows, pieces))
    monkeypatch.setattr(four_bit_matmul, "dequantized_columns", recorded(real_columns, columns))
    out = layer(x)
    assert len(pieces) > 4 if shape[1] % 64 == 0 else len(pieces) == 1  # the forward: rows
    forward = pieces[:]  # (a one-piece gradient reads the rows again)
    got_x, got_b = torch.autograd.grad(out, (x, layer.bias), grad)
    assert len(columns) > 1 if shape[1] % 64 == 0 else columns == [(0, shape[1])]  # the input gradient: columns
    for done, whole in ((forward, shape[0]), (columns, shape[1])):
        assert done[0][0] == 0 and done[-1][1] == whole  # every row (column)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(done))  # contiguous, none twice
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # of the largest entry: one bf16 rounding is 4e-3
    for got, want in ((out, ref), (got_x, ref_x), (got_b, ref_b)):
        assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max()
    pieces.clear()
    with torch.no_grad():  # inference: bitsandbytes' own path
        assert torch.equal(layer(x), ref.detach())
    assert not pieces


@pytest.mark.parametrize("mode", BNB_MODES)
def test_footprint_counts_the_statistics_of_plain_bitsandbytes_layers(mode):
    """Layers built by Lightning's plugin or transformers are plain bitsandbytes ones whose statistics hang on the
    weight: footprint counts them, to the byte of this package's layer in the same mode."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.randn(256, 512) * 0.02
    if mode_kind(mode) == "int8":
        if mode == "int8-training":
            pytest.skip("int8-training keeps a float weight: nothing packed to count")
        plain = bnb.nn.Linear8bitLt(512, 256, bias=False, has_fp16_weights=False)
        plain.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        kind, dq = mode.split("-")[0], mode.endswith("-dq")
        plain = bnb.nn.Linear4bit(512, 256, bias=False, compress_statistics=dq, quant_type=kind)
        plain.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=dq, quant_type=kind)
    plain = torch.nn.Sequential(plain.to("cpu"))  # the move quantizes
    ours = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False))
    ours[0].weight.data.copy_(weight)
    fq.quantize_(ours, mode)
    got, expected = fq.footprint(plain), fq.footprint(ours)
    assert got.total_bytes == expected.total_bytes < weight.numel() * 2  # fewer bytes than bf16: codes counted once
    assert got.bits_per_quantized_param == expected.bits_per_quantized_param


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize(("out_features", "in_features"), [(256, 96), (16, 32)])
def test_rows_not_a_multiple_of_the_block_size_dequantize_right_on_cpu(
    quant_type, compress_statistics, out_features, in_features
):
    """Blocks run over the flattened weight, across rows (of 96; of 32: two rows per block): the layer's dequantized
    weight must be the flattened-block reading of its packed bytes (bitsandbytes 0.50's CPU kernel misplaces them:
    on 16 x 32, an error of 0.24 instead of 0.09), and its forward, with and without grad, must use that weight."""
    from bitsandbytes.functional import get_4bit_type

    from fabric_quant.nn import bnb as fq_bnb
    from fabric_quant.nn.four_bit_matmul import block_constants

    torch.manual_seed(0)
    original = torch.randn(out_features, in_features)
    layer = fq_bnb.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                              quant_type=quant_type, compress_statistics=compress_statistics)  # fmt: skip
    layer.quantize_(original)
    state = layer.weight.quant_state
    # an independent reading: nibble pairs (high first), the code book, one constant per 64 flattened values
    packed = layer.weight.data.reshape(-1)
    nibbles = torch.stack([packed // 16, packed % 16], dim=1).reshape(-1).long()
    constants = block_constants(state)  # bitsandbytes' own reading of the (nested) block constants
    expected = get_4bit_type(quant_type, device="cpu")[nibbles].view(-1, 64) * constants[:, None]
    expected = expected.reshape(out_features, in_features)
    weight = layer.dequantized_weight()
    assert torch.allclose(weight, expected, rtol=1e-6, atol=1e-7)
    # on N(0, 1): nf4 about 0.07-0.09, fp4 0.09-0.10 (0.103 on the 512 values of 16 x 32)
    assert (weight - original).abs().mean() < (0.1 if quant_type == "nf4" else 0.12)
    x = torch.randn(4, in_features, requires_grad=True)
    assert torch.allclose(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ expected.t(), rtol=1e-5, atol=1e-5)


def _submodule_net() -> torch.nn.Module:
    class Sub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(64, 32)

    class Net2(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = torch.nn.Linear(64, 64)
            self.l2 = Sub()

    return Net2()


@pytest.mark.parametrize("mode", BNB_MODES)
def test_plugin_attributes_assigned_after_construction_are_honoured(mode):
    """Lightning's plugin reads ``ignore_modules`` and ``dtype`` at use; users and Lightning's tests assign them on
    a built plugin, and every conversion, init context and forward must follow."""
    precision = fq.BnbPrecision(mode, dtype=torch.float32)
    precision.ignore_modules = {"l2"}
    model = precision.convert_module(_submodule_net())
    assert isinstance(model.l1, QuantizedLinear) and type(model.l2.l) is torch.nn.Linear
    precision.ignore_modules.clear()  # in place, too
    model = precision.convert_module(_submodule_net())
    assert isinstance(model.l2.l, QuantizedLinear)

    precision.dtype = torch.bfloat16
    with precision.module_init_context():
        model = _submodule_net()
    assert model.l1.bias.dtype is torch.bfloat16
    if mode_kind(mode) == "4bit":
        assert model.l1.compute_dtype is torch.bfloat16
    x = precision.convert_input(torch.randn(3, 64))
    with precision.forward_context():
        assert model.l1(x).dtype is torch.bfloat16

    precision.dtype = "fp32"  # a name, parsed at use; a model built earlier takes the plugin's dtype at conversion
    model = precision.convert_module(model)
    assert model.l1.bias.dtype is torch.float32
    if mode_kind(mode) == "4bit":
        assert model.l1.compute_dtype is torch.float32
    assert precision.convert_input(torch.randn(2, 64, dtype=torch.bfloat16)).dtype is torch.float32


def test_invalid_plugin_attributes_raise_at_use_naming_the_value():
    precision = fq.BnbPrecision("nf4")
    precision.mode = "nf5"
    with pytest.raises(ValueError, match=r"Unknown bitsandbytes mode 'nf5'. Valid choices: int8, int8-training"):
        precision.convert_module(_submodule_net())
    precision = fq.BnbPrecision("nf4")
    precision.quant_storage = "int4"
    with pytest.raises(ValueError, match=r"Unsupported quant_storage 'int4'. Valid choices: torch.uint8"):
        precision.convert_module(_submodule_net())
    precision = fq.BnbPrecision("nf4")
    precision.ignore_modules = {"l3"}
    with pytest.raises(ValueError, match=r"ignore_modules=\['l3'\] match no submodule"):
        precision.convert_module(_submodule_net())
    with pytest.raises(RuntimeError, match=r"ignore_modules=\['l3'\].*is not supported"):
        precision.module_init_context()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_checkpoint_keeps_an_int8_training_layer_frozen_and_in_its_dtype(dtype):
    """A client freezes every weight but its adapters, then loads a float (fp32) checkpoint: the layer keeps its
    trainability and the run's dtype, and holds the checkpoint's values."""
    torch.manual_seed(0)
    model = fq.quantize_(make_net(), "int8-training", dtype=dtype)
    assert model.fc1.weight.dtype is dtype and model.fc1.weight.requires_grad
    model.fc1.weight.requires_grad_(False)
    source = make_net(seed=1)
    model.load_state_dict(source.state_dict())
    assert model.fc1.weight.dtype is dtype and not model.fc1.weight.requires_grad
    assert model.fc2.weight.requires_grad  # not frozen by the client: still trainable
    assert torch.equal(model.fc1.weight.data, source.fc1.weight.data.to(dtype))


@pytest.mark.parametrize("mode", ["int8", "int8-training"])
@pytest.mark.parametrize("shape", [(2, 5), (3,), (2, 2, 3)], ids=["3d", "2d", "4d"])
def test_int8_trains_on_cpu_with_leading_dimensions(mode, shape):
    """bitsandbytes' CPU int8 backward handles 2-D inputs only ('t() expects a tensor with <= 2 dimensions'); every
    transformer passes (batch, sequence, features). Output and gradients equal a float layer holding the weight the
    forward uses (the int8 codes times their row scales), computed by the same ops: fp32, exactly."""
    torch.manual_seed(0)
    model = fq.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 32)), mode, dtype=torch.float32)
    layer = model[0]
    x = torch.randn(*shape, 64, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    codes, scales = layer.state.CB, layer.state.SCB
    ref = torch.nn.Linear(64, 32)
    with torch.no_grad():
        ref.weight.copy_(codes.to(torch.float32).mul_(scales.unsqueeze(1).mul(1.0 / 127.0)))
        ref.bias.copy_(layer.bias)
    x_ref = x.detach().clone().requires_grad_()
    out_ref = ref(x_ref.reshape(-1, 64)).reshape(*shape, 32)
    (out_ref * grad_out).sum().backward()
    assert out.shape == (*shape, 32)
    assert torch.equal(out, out_ref) and torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.bias.grad, ref.bias.grad)
    if mode == "int8-training":
        assert torch.allclose(layer.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    else:
        assert layer.weight.grad is None

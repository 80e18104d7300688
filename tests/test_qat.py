"""QAT numerics and the QAT plugin (CPU)."""

import pytest
import torch
from lightning.fabric import Fabric

import fabric_quant as fq
from fabric_quant.numerics.fold import fold_bn
from fabric_quant.numerics.observers import MinMaxObserver, MovingAverageMinMaxObserver, make_observer
from fabric_quant.numerics.quant import fake_quant, fake_quant_per_token, fake_quant_weight, qrange, scale_zero_point
from fabric_quant.qat import QATConfig, QATConv2d, QATConvBn2d, QATLinear


def reference_fq(x, scale, zero_point, qmin, qmax):
    # the definition: (clamp(round(x / s + z), qmin, qmax) - z) * s, round half to even
    return (torch.clamp(torch.round(x / scale + zero_point), qmin, qmax) - zero_point) * scale


def test_qrange():
    assert qrange(8, True) == (-127, 127) and qrange(4, True) == (-7, 7) and qrange(8, False) == (0, 255)
    with pytest.raises(ValueError, match=r"bits=3 is not supported. Valid choices: \(4, 8\)"):
        qrange(3, True)


def test_fake_quant_per_tensor_affine_matches_reference_exactly():
    torch.manual_seed(0)
    x = torch.randn(64, 33) * 3
    scale, zp = scale_zero_point(x.min(), x.max(), 8, symmetric=False)
    assert 0 <= int(zp) <= 255
    out = fake_quant(x, scale, zp, 0, 255)
    assert torch.equal(out, reference_fq(x, scale, zp.float(), 0, 255))
    assert out.unique().numel() <= 256


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, None), (4, 16), (8, 32)])
def test_weight_fake_quant_per_channel_and_group_matches_reference(bits, group):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    out = fake_quant_weight(w, bits, group)
    rows = w.reshape(-1, group or 64)
    qmax = 2 ** (bits - 1) - 1
    scale = (rows.abs().amax(1) / qmax)[:, None]
    assert torch.equal(out, reference_fq(rows, scale, 0, -qmax, qmax).reshape(w.shape))
    per_row_levels = [r.unique().numel() for r in out.reshape(-1, group or 64)]
    assert max(per_row_levels) <= 2 * qmax + 1


def test_per_channel_beats_per_tensor_on_rows_of_different_scale():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]
    per_channel = fake_quant_weight(w, 8, None)
    absmax = w.abs().max()
    s, z = scale_zero_point(-absmax, absmax, 8, True)
    per_tensor = fake_quant(w, s, z, -127, 127)
    assert (per_channel - w).norm() < 0.5 * (per_tensor - w).norm()


def test_straight_through_estimator_gradient():
    x = torch.tensor([-3.0, -0.4, 0.0, 0.26, 0.9, 2.5], requires_grad=True)
    scale, zp = torch.tensor(0.01), torch.tensor(0, dtype=torch.int32)
    out = fake_quant(x, scale, zp, -100, 100)  # representable range [-1, 1]
    out.backward(torch.ones_like(out))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the range, zero outside


def test_dynamic_per_token_uses_one_scale_per_row():
    x = torch.stack([torch.linspace(-1, 1, 50), torch.linspace(-100, 100, 50)])
    out = fake_quant_per_token(x)
    assert (out[0] - x[0]).abs().max() <= 2 / 255  # the small row keeps its own fine scale
    assert (out[1] - x[1]).abs().max() <= 200 / 255


def test_minmax_observer():
    obs = MinMaxObserver()
    with pytest.raises(RuntimeError, match="has seen no data"):
        obs.qparams()
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([0.5, 3.0]))
    assert obs.min_val.item() == -1.0 and obs.max_val.item() == 3.0
    scale, zp = obs.qparams()
    assert scale.item() == pytest.approx(4.0 / 255) and zp.item() == round(1.0 / (4.0 / 255))
    obs.enabled = False
    obs(torch.tensor([100.0]))
    assert obs.max_val.item() == 3.0


def test_moving_average_observer():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-11.0, 11.0]))
    assert obs.min_val.item() == pytest.approx(-2.0) and obs.max_val.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"Unknown observer 'histo'. Valid choices: minmax, moving_average"):
        make_observer("histo")


def _conv_bn(seed=0):
    torch.manual_seed(seed)
    conv, bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn.eval()


def test_bn_folding_equals_conv_then_bn_in_eval():
    conv, bn = _conv_bn()
    x = torch.randn(4, 3, 10, 10)
    w, b = fold_bn(conv.weight, conv.bias, bn)
    with torch.no_grad():
        assert torch.allclose(torch.nn.functional.conv2d(x, w, b, padding=1), bn(conv(x)), atol=1e-5)


def test_qat_conv_bn_frozen_is_the_folded_fake_quantized_conv():
    conv, bn = _conv_bn()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        expected_float = torch.relu(bn(conv(x)))
    fused = QATConvBn2d.from_float(conv, bn, relu=True, config=QATConfig(activations="none"))
    fused.freeze_bn()
    fused.train()  # a frozen BatchNorm stays in eval mode when the model trains
    assert not fused.bn.training
    fused.fake_quant_enabled = False
    with torch.no_grad():
        assert torch.allclose(fused(x), expected_float, atol=1e-5)
        fused.fake_quant_enabled = True
        w, b = fused.folded()
        deployed = torch.relu(torch.nn.functional.conv2d(x, fake_quant_weight(w, 8, None), b, padding=1))
        assert torch.allclose(fused(x), deployed, atol=1e-4)


def tiny_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    )  # fmt: skip


def test_plugin_fuses_and_swaps_and_trains_on_digits(digits):
    x, y = digits[0][:256].unsqueeze(1), digits[1][:256]
    plugin = fq.precision_plugin("qat-int8-static", start_step=2, freeze_observer_step=20, freeze_bn_step=15)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = fabric.setup_module(tiny_cnn())
    net = model.module
    assert isinstance(net[0], QATConvBn2d) and net[0].relu and isinstance(net[1], torch.nn.Identity)
    assert isinstance(net[3], QATConvBn2d) and isinstance(net[8], QATLinear)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-2))
    losses = []
    for step in range(30):
        plugin.apply_schedule(model, step)
        assert net[0].fake_quant_enabled == (step >= 2)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # (float training of this net reaches 0.63x in the same 30 steps)
    assert not net[0].act_observer.enabled and net[0].bn_frozen and not net[0].bn.training
    running = net[0].bn.running_mean.clone()
    model(x)
    assert torch.equal(running, net[0].bn.running_mean)  # frozen statistics no longer move


def test_learnable_scales_receive_gradients():
    lin = QATLinear.from_float(torch.nn.Linear(32, 8), QATConfig(activations="static", learnable_scales=True))
    x = torch.randn(16, 32)
    lin(x).square().sum().backward()
    assert lin.weight_scale.grad is not None and lin.weight_scale.grad.abs().sum() > 0
    assert lin.act_scale.grad is not None and lin.act_scale.item() > 0


def test_registry_names_and_options():
    assert fq.available_modes("qat") == ["qat-int8", "qat-int8-static", "qat-int4"]
    plugin = fq.precision_plugin("qat-int4")
    assert plugin.config.weight_bits == 4 and plugin.config.group_size == 32
    assert fq.precision_plugin("qat-int4", group_size=16).config.group_size == 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_bits": 3}, r"weight_bits=3 is not supported. Valid choices: \(4, 8\)"),
        ({"learnable_scales": True}, r"learnable_scales=True needs activations='static' or 'none'"),
        ({"activations": "per-channel"}, r"activations='per-channel' is not supported. Valid choices"),
        ({"start_step": -1}, r"start_step must be >= 0"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fq.QATPrecision("qat-int8", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"per_channel": "false"}, r"per_channel='false' must be True or False"),  # a CLI string, truthy
        ({"learnable_scales": 1}, r"learnable_scales=1 must be True or False"),
        ({"group_size": "32"}, r"group_size='32' must be a positive integer or None"),
        ({"embeddings": "no"}, r"embeddings='no' must be True or False"),
    ],
)
def test_options_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        fq.QATPrecision("qat-int8", **kwargs)


def test_group_size_not_dividing_is_refused_before_any_change():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 48), torch.nn.Linear(48, 2))
    with pytest.raises(ValueError, match=r"2: group_size=32 does not divide the input dimension 48"):
        fq.precision_plugin("qat-int4").convert_module(net)
    assert all(type(m) is torch.nn.Linear for m in net)


def test_unknown_qat_mode():
    with pytest.raises(ValueError, match=r"Unknown qat mode 'nf4'. Valid choices: qat-int8, qat-int8-static, qat-int4"):
        fq.QATPrecision("nf4")


def test_conv2d_swap_outside_sequential_keeps_parameters():
    conv = torch.nn.Conv2d(2, 4, 3)
    model = torch.nn.ModuleDict({"c": conv})
    fq.precision_plugin("qat-int8").convert_module(model)
    assert isinstance(model["c"], QATConv2d) and model["c"].weight is conv.weight


DDP_SCRIPT = """
import json, sys, torch
from lightning.fabric import Fabric
import fabric_quant as fq
sys.path.insert(0, {tests!r})
from test_qat import tiny_cnn
from fabric_quant.demo.models import digits_images

plugin = fq.precision_plugin("qat-int8-static", freeze_bn_step=6, freeze_observer_step=8)
fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", plugins=plugin)
fabric.launch()
x, y = (t[:256] for t in digits_images())
shard = slice(fabric.global_rank, None, fabric.world_size)
model = fabric.setup_module(tiny_cnn())
opt = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-2))
for step in range(10):
    plugin.apply_schedule(model, step)
    loss = torch.nn.functional.cross_entropy(model(x[shard]), y[shard])
    opt.zero_grad()
    fabric.backward(loss)
    opt.step()
weights = fabric.all_gather(model.module[0].weight.detach())
deployed = plugin.convert(model.module)
if fabric.global_rank == 0:
    json.dump({{"same_weights": bool(torch.equal(weights[0], weights[1])), "loss": loss.item(),
               "converted": type(deployed[0]).__name__}}, open({out!r}, "w"))
"""


@pytest.mark.slow
def test_qat_plugin_under_ddp_with_two_cpu_processes(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "result.json"
    script = tmp_path / "ddp_qat.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["same_weights"] and result["converted"] == "Int8Conv" and result["loss"] < 2.3

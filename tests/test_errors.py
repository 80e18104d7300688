"""Bad input: a clear error naming the bad value and the valid choices, and nothing half-done."""

import pytest
import torch
from conftest import make_net, setup_quantized
from lightning.fabric import Fabric

import fabric_quant as fq


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float8", "bogus"])
def test_incompatible_dtype(dtype):
    with pytest.raises(ValueError, match=r"Unsupported dtype for mode 'nf4'.*Valid choices: torch.float32"):
        fq.BnbPrecision("nf4", dtype=dtype)


def test_unknown_mode_through_the_plugin():
    with pytest.raises(ValueError, match=r"Unknown bitsandbytes mode 'nf4dq'. Valid choices: int8, int8-training, nf4"):
        fq.BnbPrecision("nf4dq")


def test_model_without_linear_layers_is_refused():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.BnbPrecision("nf4"))
    with pytest.raises(TypeError, match=r"mode 'nf4' quantizes torch.nn.Linear .* has no Linear layers \(Sequential\)"):
        fabric.setup_module(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1), torch.nn.ReLU()))


def test_ignore_modules_matching_nothing_is_refused_before_any_change():
    net = make_net()
    plugin = fq.BnbPrecision("nf4", ignore_modules={"fc2", "lm_head"})
    with pytest.raises(ValueError, match=r"ignore_modules=\['lm_head'\] match no submodule of Net.*'fc1', 'fc2'"):
        plugin.convert_module(net)
    assert type(net.fc1) is torch.nn.Linear and net.fc1.weight.dtype is torch.float32  # untouched


def test_ignore_modules_as_a_bare_string_is_refused():
    with pytest.raises(TypeError, match="collection of name prefixes, got the string 'fc2'"):
        fq.BnbPrecision("nf4", ignore_modules="fc2")


def test_init_module_with_ignore_modules_explains_why():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.BnbPrecision("nf4", ignore_modules={"fc2"}))
    with (
        pytest.raises(RuntimeError, match="layer names are unknown while the model is constructed"),
        fabric.init_module(),
    ):
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu():
    with pytest.raises(RuntimeError, match="CUDA"):
        Fabric(accelerator="cuda", devices=1, plugins=fq.BnbPrecision("nf4"))
    net = make_net()
    with pytest.raises(RuntimeError, match=r"device='cuda': CUDA is not available here; valid choices: 'cpu'"):
        fq.quantize_(net, "nf4", device="cuda")
    assert type(net.fc1) is torch.nn.Linear  # refused before any layer was replaced


def test_shape_mismatch_on_load_is_reported():
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.BnbPrecision("nf4-dq", dtype=torch.float32))
    model = fabric.setup_module(make_net())
    bad = make_net().state_dict()
    bad["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match=r"size mismatch for fc1.weight.*\(3, 3\).*\(512, 512\)"):
        model.load_state_dict(bad)


@pytest.mark.parametrize("first, second", [("nf4", "int8"), ("nf4-dq", "ptq-dynamic-int8"), ("int8", "qat-int8")])
def test_requantizing_in_another_mode_is_refused(first, second):
    net = fq.quantize_(make_net(), first, dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"Net is already quantized \({first}\); mode '{second}' cannot quantize"):
        fq.quantize_(net, second)
    assert net.fc1.fq_mode == first  # untouched
    with pytest.raises(ValueError, match=rf"already quantized \({first}\); mode '{second}'"):
        Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(second)).setup_module(net)


def test_same_mode_again_is_a_no_op():
    net = fq.quantize_(make_net(), "nf4", dtype=torch.float32)
    codes = net.fc1.weight.data.clone()
    assert fq.quantize_(net, "nf4", dtype=torch.float32) is net
    assert torch.equal(net.fc1.weight.data, codes)


def test_ignore_modules_match_whole_dotted_names():
    seq = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(12)])
    fq.quantize_(seq, "nf4", dtype=torch.float32, ignore_modules={"1"})
    kept = [i for i, layer in enumerate(seq) if type(layer) is torch.nn.Linear]
    assert kept == [1]  # not 10 and 11 too


@pytest.mark.parametrize("bad", ["", " "])
def test_empty_ignore_modules_entry_is_refused(bad):
    net = make_net()
    with pytest.raises(ValueError, match=r"ignore_modules entries must be module names such as 'lm_head'"):
        fq.quantize_(net, "nf4", ignore_modules={bad})
    with pytest.raises(ValueError, match=r"ignore_modules entries must be module names"):
        fq.BnbPrecision("nf4", ignore_modules={bad})
    assert type(net.fc1) is torch.nn.Linear


@pytest.mark.parametrize("mode", ["nf4-dq", "int8", "qat-int8", "ptq-dynamic-int8"])
def test_non_finite_weights_are_refused_with_the_layer_name(mode):
    net = make_net()
    with torch.no_grad():
        net.fc2.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"fc2.weight holds 1 non-finite values \(NaN/inf\): refusing to quantize"):
        fq.quantize_(net, mode)
    assert type(net.fc1) is torch.nn.Linear and type(net.fc2) is torch.nn.Linear  # nothing half-done


def test_non_finite_float_checkpoint_is_refused_on_load():
    _, model = setup_quantized("nf4")
    bad = make_net().state_dict()
    bad["fc1.weight"][0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"fc1.weight: the float weight holds 1 non-finite values"):
        model.load_state_dict(bad)


def test_non_finite_calibration_batch_is_named():
    batches = [torch.randn(8, 512), torch.randn(8, 512)]
    batches[1][2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"calibration batch 1 holds non-finite values"):
        fq.quantize_(make_net(), "ptq-static-int8", calibration_data=batches, progress=False)

import pytest
import torch

import fabric_quant as fq
from fabric_quant.registry import mode_spec


@pytest.fixture
def scratch_mode():
    """A mode of a made-up family, removed again after the test (the registry is global)."""
    fq.register_mode("test-other-family", family="test", quantize=lambda model, mode: model,
                     plugin="fabric_quant.plugins.bnb:BnbPrecision", description="x")  # fmt: skip
    yield "test-other-family"
    fq.unregister_mode("test-other-family")


def test_bnb_modes_registered_in_order():
    assert fq.available_modes("bitsandbytes") == ["int8", "int8-training", "nf4", "nf4-dq", "fp4", "fp4-dq"]
    assert set(fq.available_modes("bitsandbytes")) <= set(fq.available_modes())


@pytest.mark.parametrize("mode", fq.available_modes("bitsandbytes"))
def test_precision_plugin_builds_the_registered_plugin(mode):
    plugin = fq.precision_plugin(mode, dtype="bf16")
    assert isinstance(plugin, fq.BnbPrecision)
    assert plugin.mode == mode
    assert plugin.dtype is torch.bfloat16
    assert mode_spec(mode).description


def test_every_mode_has_a_library_function_and_a_plugin():
    for mode in fq.available_modes():
        spec = mode_spec(mode)
        assert callable(spec.quantize) and callable(spec.plugin_factory()), mode


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'nf3'.*int8-training.*nf4-dq"):
        fq.precision_plugin("nf3")
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'nf3'.*qat-int8.*ptq-static-int8"):
        fq.quantize_(torch.nn.Linear(4, 4), "nf3")


def test_bnb_plugin_rejects_modes_of_other_families(scratch_mode):
    assert scratch_mode in fq.available_modes("test")
    with pytest.raises(ValueError, match=r"Unknown bitsandbytes mode 'test-other-family'. Valid choices: int8"):
        fq.BnbPrecision(scratch_mode)


def test_unregister_removes_the_mode(scratch_mode):
    fq.unregister_mode(scratch_mode)
    assert scratch_mode not in fq.available_modes()
    fq.register_mode(scratch_mode, family="test", quantize=lambda model, mode: model,
                     plugin="fabric_quant.plugins.bnb:BnbPrecision", description="x")  # fmt: skip (fixture removes it)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        fq.register_mode("nf4", family="bitsandbytes", quantize=fq.quantize_, plugin="a:b", description="again")
    with pytest.raises(ValueError, match=r"plugin='BnbPrecision' must name the plugin class or factory as"):
        fq.register_mode("new", family="x", quantize=fq.quantize_, plugin="BnbPrecision", description="x")

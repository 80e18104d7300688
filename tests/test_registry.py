import pytest
import torch

import fabric_quant as fq
from fabric_quant.registry import mode_spec


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


def test_unknown_mode_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown quantization mode 'nf3'.*int8-training.*nf4-dq"):
        fq.precision_plugin("nf3")


def test_bnb_plugin_rejects_modes_of_other_families():
    fq.register_mode("test-other-family", lambda name: None, family="test", description="x")
    with pytest.raises(ValueError, match=r"Unknown bitsandbytes mode 'test-other-family'. Valid choices: int8"):
        fq.BnbPrecision("test-other-family")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        fq.register_mode("nf4", fq.BnbPrecision, family="bitsandbytes", description="again")

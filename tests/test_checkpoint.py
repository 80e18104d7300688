import os

import pytest
import torch
from conftest import BNB_MODES, Net, make_net, rel_err, setup_quantized
from lightning.fabric import Fabric
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fabric_quant as fq
from fabric_quant.checkpoint import atomic_write_bytes


@pytest.mark.parametrize("mode", BNB_MODES)
def test_quantized_save_reload_is_bit_exact(mode, tmp_path):
    _, model = setup_quantized(mode, make_net(seed=0))
    model.eval()
    x = torch.randn(8, 512)
    with torch.no_grad():
        expected = model(x)  # a forward before saving must not change what is saved
    path = fq.save_quantized(model, tmp_path / "q.safetensors")
    _, fresh = setup_quantized(mode, make_net(seed=1))
    fresh.eval()
    fq.load_quantized(fresh, path)
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key], loaded[key]), key
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_quantized_checkpoint_is_smaller_than_float(tmp_path):
    _, model = setup_quantized("nf4-dq", make_net())
    path = fq.save_quantized(model, tmp_path / "q.safetensors")
    float_path = tmp_path / "f.safetensors"
    save_file(make_net().state_dict(), float_path)
    assert os.path.getsize(path) < 0.2 * os.path.getsize(float_path)


@pytest.mark.parametrize("mode", BNB_MODES)
def test_dequantized_save_loads_into_plain_torch_model(mode, tmp_path):
    _, model = setup_quantized(mode, make_net(seed=0))
    path = fq.save_dequantized(model, tmp_path / "dq.safetensors")
    plain = Net()
    plain.load_state_dict(load_file(path), strict=True)
    x = torch.randn(8, 512)
    with torch.no_grad():
        if mode == "int8-training":  # float master weights, quantized per forward: the export is those weights
            assert torch.equal(plain(x), make_net(seed=0)(x))
        else:  # the weights exactly as the quantized model computes with them
            assert rel_err(plain(x), model(x)) < 1e-5
            assert rel_err(plain(x), make_net(seed=0)(x)) > 1e-4


def test_dequantized_state_dict_dtype():
    _, model = setup_quantized("nf4", make_net())
    state = fq.dequantized_state_dict(model, dtype=torch.bfloat16)
    assert set(state) == set(Net().state_dict())
    assert all(v.dtype is torch.bfloat16 for v in state.values())


def test_fabric_save_and_load_round_trip(tmp_path):
    fabric, model = setup_quantized("nf4-dq", make_net(seed=0))
    fabric.save(tmp_path / "ckpt", {"model": model})
    _, fresh = setup_quantized("nf4-dq", make_net(seed=1))
    fabric.load(tmp_path / "ckpt", {"model": fresh})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_load_into_other_mode_is_refused_and_leaves_model_untouched(tmp_path):
    _, nf4 = setup_quantized("nf4", make_net())
    path = fq.save_quantized(nf4, tmp_path / "nf4.safetensors")
    _, int8 = setup_quantized("int8", make_net(seed=2))
    before = {k: v.clone() for k, v in int8.state_dict().items()}
    with pytest.raises(ValueError, match=r"other quantization modes.*'fc1': \('nf4', 'int8'\)"):
        fq.load_quantized(int8, path)
    assert all(torch.equal(before[k], v) for k, v in int8.state_dict().items())


def test_load_state_dict_of_other_4bit_type_reports_the_mismatch():
    _, nf4 = setup_quantized("nf4", make_net())
    _, fp4 = setup_quantized("fp4", make_net())
    with pytest.raises(RuntimeError, match=r"quant_type='nf4'.*quant_type='fp4'"):
        fp4.load_state_dict(nf4.state_dict())


def test_load_of_a_foreign_file_is_refused(tmp_path):
    save_file(make_net().state_dict(), tmp_path / "plain.safetensors")
    _, model = setup_quantized("nf4", make_net())
    with pytest.raises(ValueError, match="not a fabric_quant quantized checkpoint"):
        fq.load_quantized(model, tmp_path / "plain.safetensors")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "out.bin", b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left behind


def test_checkpoint_of_fabric_wrapped_and_plain_module_agree(tmp_path):
    fabric = Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin("int8", dtype=torch.float32))
    wrapped = fabric.setup_module(make_net())
    a = fq.save_quantized(wrapped, tmp_path / "a.safetensors")
    b = fq.save_quantized(wrapped.module, tmp_path / "b.safetensors")
    # (compared by content: safetensors does not keep the metadata's key order)
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()


@pytest.mark.parametrize("mode", ["nf4-dq", "fp4"])
def test_quant_storage_in_compute_dtype_for_fsdp(mode, tmp_path):
    # FSDP flattens parameters of one dtype: the packed 4-bit data can be stored as bf16 instead of uint8
    _, model = setup_quantized(mode, make_net(seed=0), dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    _, uint8 = setup_quantized(mode, make_net(seed=0), dtype=torch.bfloat16)
    lin = model.module.fc1
    assert lin.weight.dtype is torch.bfloat16 and lin.weight.numel() * 2 == 512 * 512 // 2
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.equal(model(x), uint8(x))  # same codes, other container
    assert fq.footprint(model).bits_per_quantized_param == fq.footprint(uint8).bits_per_quantized_param
    path = fq.save_quantized(model, tmp_path / "bf16-storage.safetensors")
    _, fresh = setup_quantized(mode, make_net(seed=1), dtype=torch.bfloat16, quant_storage="bfloat16")
    fq.load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_quant_storage_is_validated():
    with pytest.raises(ValueError, match=r"Unsupported quant_storage 'int4'. Valid choices: torch.uint8"):
        fq.BnbPrecision("nf4", quant_storage="int4")
    with pytest.raises(ValueError, match=r"quant_storage applies to the 4-bit modes; mode 'int8'"):
        fq.BnbPrecision("int8", quant_storage=torch.bfloat16)


def test_fsdp1_plugin_is_refused_naming_the_fsdp2_path():
    """Fabric's FSDP strategy (FSDP1) would need the packed bytes in bf16 storage, where bitsandbytes #1945 rewrites
    NaN bit patterns: the plugin for it is refused, pointing to FSDP2 with uint8 storage."""
    refusal = r"precision_plugin\('nf4-dq', fsdp=True\).*#1945.*fabric_quant\.distributed\.fsdp"
    with pytest.raises(ValueError, match=refusal):
        fq.precision_plugin("nf4-dq", fsdp=True)
    assert isinstance(fq.precision_plugin("nf4-dq", fsdp=False), fq.BnbPrecision)
    assert not hasattr(fq, "BnbFSDPPrecision")


def test_float_storage_is_refused_by_the_sharding_path():
    """The packed bytes of a bf16-stored layer include bf16 NaN patterns (about 0.1 % of byte pairs), the
    reason FSDP must not shard them as floats; fabric_quant.distributed.fsdp refuses that storage before sharding."""
    from fabric_quant.distributed.fsdp import check_shardable

    _, model = setup_quantized("nf4-dq", dtype=torch.bfloat16, quant_storage="bfloat16")
    packed = model.fc1.weight.data.view(torch.int16)
    assert bool(torch.isnan(packed.view(torch.bfloat16)).any())  # what NaN canonicalization would rewrite
    with pytest.raises(ValueError, match=r"layer '_forward_module.fc1' stores its packed weight as torch.bfloat16"):
        check_shardable(model)


def _flip_byte(path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("mode", ["nf4-dq", "ptq-dynamic-int8"])
def test_a_flipped_byte_is_caught_naming_file_and_tensor(mode, tmp_path):
    model = fq.quantize_(make_net(), mode, **({"dtype": torch.float32} if mode == "nf4-dq" else {}))
    path = fq.save_quantized(model, tmp_path / "q.safetensors")
    assert fq.load_quantized(fq.quantize_(make_net(1), mode, **({"dtype": torch.float32} if mode == "nf4-dq" else {})),
                             path) is not None  # fmt: skip
    _flip_byte(path)
    fresh = fq.quantize_(make_net(1), mode, **({"dtype": torch.float32} if mode == "nf4-dq" else {}))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{path}: tensor '[\w.]+' does not match its checksum: the file is corrupt"):
        fq.load_quantized(fresh, path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing loaded


def test_dequantized_export_carries_checksums(tmp_path):
    from fabric_quant.checkpoint import load_tensors

    path = fq.save_dequantized(fq.quantize_(make_net(), "int8", dtype=torch.float32), tmp_path / "f.safetensors")
    assert set(load_tensors(path)) == set(make_net().state_dict())
    _flip_byte(path, 10)
    with pytest.raises(ValueError, match="does not match its checksum"):
        load_tensors(path)


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(tmp_path / "x.bin", b"abc")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644

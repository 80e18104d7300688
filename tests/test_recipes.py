import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import bench  # noqa: E402


@pytest.mark.slow
def test_bench_minilm_task_end_to_end(tiny_bert_with_tokenizer, tmp_path):
    modes = ["nf4-dq", "ptq-dynamic-int8", *([bench.TORCH_AO] if bench.TORCH_AO in bench.all_modes("minilm") else [])]
    rows = bench.setup(
        task="minilm", model=tiny_bert_with_tokenizer, modes=modes, compile=False, batch_sizes=[1, 2], seq_len=16,
        num_texts=8, repeats=2, out_dir=tmp_path / "out",
    )  # fmt: skip
    assert [r["mode"] for r in rows] == ["fp32", *modes]  # the fp32 reference always first
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["fp32"]["speedup_b1"] == 1.0 and by_mode["fp32"]["fidelity"] == pytest.approx(1.0)
    assert 0.9 < by_mode["ptq-dynamic-int8"]["fidelity"] <= 1.0 + 1e-6
    assert by_mode["ptq-dynamic-int8"]["size_mb"] < by_mode["fp32"]["size_mb"] / 2
    assert all(r["b2_ms"] > 0 for r in rows) and by_mode["nf4-dq"]["train_vs_fp32_b2"] > 0
    # 32x32 layers: the one nested absmax + offset per layer weigh more than in real layers (see test_footprint)
    assert 4.12 < by_mode["nf4-dq"]["bits_per_quantized_param"] < 4.2
    assert by_mode["nf4-dq"]["size_mb"] < by_mode["fp32"]["size_mb"]
    assert math.isnan(by_mode["fp32"]["bits_per_quantized_param"])
    if bench.TORCH_AO in by_mode:  # a reference row: timed and scored, its size not counted (NaN)
        ao = by_mode[bench.TORCH_AO]
        assert ao["fidelity"] > 0.9 and math.isnan(ao["size_mb"])
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / "out" / f"bench.{suffix}").stat().st_size > 0
    with open(tmp_path / "out" / "bench.csv") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["fp32", *modes]


@pytest.mark.slow
def test_bench_cli_help():
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "bench.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--modes" in out.stdout and "--repeats" in out.stdout


@pytest.mark.slow
def test_bench_digits_task_has_static_and_qat_rows(tmp_path):
    rows = bench.setup(
        task="digits-cnn", modes=["ptq-static-int8", "qat-int8"], compile=False, batch_sizes=[1], train_epochs=2,
        repeats=2, out_dir=tmp_path / "out",
    )  # fmt: skip
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"fp32", "ptq-static-int8", "qat-int8"}
    for mode in ("ptq-static-int8", "qat-int8"):
        assert by_mode[mode]["size_mb"] < by_mode["fp32"]["size_mb"] / 3.5  # int8 weights, fp32 scales
        assert by_mode[mode]["fidelity"] > by_mode["fp32"]["fidelity"] - 0.05


def test_bench_rejects_autotune_without_compile(tmp_path):
    with pytest.raises(ValueError, match="autotune=True tunes the compiled rows: it needs compile=True"):
        bench.setup(task="minilm", compile=False, autotune=True, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bench_rejects_unknown_mode_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown mode\(s\) \['qat-int8'\] for task 'minilm'. Valid choices: fp32"):
        bench.setup(task="minilm", modes=["qat-int8"], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()

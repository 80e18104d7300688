"""Per-rank memory and step time of sharded QLoRA (--strategy fsdp) against DDP (the whole 4-bit base on every
rank): the QLoRA recipe itself, 2 processes, the same model, data, batch and steps.

    python benchmarks/qlora_sharded.py --model llama-1b --steps 3                    # CPU, gloo, 2 processes
    python benchmarks/qlora_sharded.py --model llama-1b --accelerator cuda --devices 2 --steps 10   # 2 GPUs, nccl
Writes benchmarks/results/qlora_sharded_<model>_<accelerator>.{md,csv,png}.

The model is qlora_resources.py's Llama-3.2-shaped checkpoint (random weights, sharded bf16 safetensors). Per arm
and rank, from the recipe's metrics.json: the memory at start (after imports), right after the load, the peak of the
whole run (CPU: the process's peak RSS; CUDA: the allocator's peak), and the bytes of the model the rank holds
(``fq.footprint``). On CPU each process runs one thread (2 cores, 2 processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

COLUMNS = ("strategy", "rank", "device", "model_mb", "memory_at_start_mb", "load_memory_mb", "peak_memory_mb",
           "peak_over_start_mb", "step_time_s", "tokens_per_s", "peak_over_start_vs_ddp")  # fmt: skip


def _run(strategy: str, model_dir: Path, data: Path, out: Path, accelerator: str, devices: int, steps: int,
         micro: int, seq: int, checkpointing: bool) -> dict:  # fmt: skip
    args = [sys.executable, str(ROOT / "recipes" / "qlora.py"), "--model.path", str(model_dir), "--model.task",
            "causal-lm", "--data.train_path", str(data), "--data.val_path", str(data.with_name("val.jsonl")),
            "--quantize", "nf4-dq", "--out_dir", str(out), "--accelerator", accelerator, "--devices", str(devices),
            "--strategy", strategy, "--train.micro_batch_size", str(micro), "--train.global_batch_size",
            str(micro * devices), "--train.max_steps", str(steps), "--train.max_seq_length", str(seq),
            "--train.save_interval", "null", "--train.gradient_checkpointing", str(checkpointing).lower(),
            "--eval.interval", "null", "--eval.initial", "false", "--merge", "false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if accelerator == "cpu" else dict(os.environ)
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{strategy} failed:\n{proc.stderr[-4000:]}")
    return json.loads((out / "metrics.json").read_text())


def main(
    model: Literal["llama-1b", "llama-3b"] = "llama-1b",
    accelerator: Literal["cpu", "cuda"] = "cpu",
    devices: int = 2,
    steps: int = 3,
    micro_batch_size: int = 2,
    seq: int = 256,
    gradient_checkpointing: bool = True,
    out_dir: Path = Path("benchmarks/results"),
) -> None:
    from qlora_resources import prepare

    from fabric_quant.report import bar_panels, machine_name, write_report

    device = torch.cuda.get_device_name() if accelerator == "cuda" else machine_name()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = prepare(model, Path(tmp))
        for strategy in ("ddp", "fsdp"):
            m = _run(strategy, model_dir, data, Path(tmp) / strategy, accelerator, devices, steps, micro_batch_size,
                     seq, gradient_checkpointing)  # fmt: skip
            for rank, r in enumerate(m["per_rank"]):
                rows.append({"strategy": strategy, "rank": rank, "device": device, "model_mb": r["model_mb"],
                             "memory_at_start_mb": r["memory_at_start_mb"],
                             "load_memory_mb": r["peak_memory_after_load_mb"], "peak_memory_mb": r["peak_memory_mb"],
                             "peak_over_start_mb": r["peak_memory_mb"] - r["memory_at_start_mb"],
                             "step_time_s": m["train_time_s"] / steps,
                             "tokens_per_s": m["throughput_tokens_per_s"]})  # fmt: skip
            print(strategy, json.dumps(m["per_rank"]), f"step {m['train_time_s'] / steps:.2f} s", flush=True)
    ddp = {r["rank"]: r for r in rows if r["strategy"] == "ddp"}
    for row in rows:
        row["peak_over_start_vs_ddp"] = row["peak_over_start_mb"] / ddp[row["rank"]]["peak_over_start_mb"]
    fsdp_step = next(r["step_time_s"] for r in rows if r["strategy"] == "fsdp")
    ratio = fsdp_step / next(r["step_time_s"] for r in rows if r["strategy"] == "ddp")
    memory = "torch.cuda.max_memory_allocated" if accelerator == "cuda" else "peak RSS of the rank's process"
    header = (
        f"# Sharded QLoRA (FSDP2) vs DDP, per rank: {model} on {device}\n\n"
        f"Command: `python benchmarks/qlora_sharded.py --model {model} --accelerator {accelerator} --devices {devices}"
        f" --steps {steps} --micro_batch_size {micro_batch_size} --seq {seq} --gradient_checkpointing"
        f" {str(gradient_checkpointing).lower()}`; torch {torch.__version__}. The QLoRA recipe (nf4-dq, LoRA r=8"
        f" all-linear, bf16 compute, AdamW), {devices} processes, micro-batch {micro_batch_size} x {seq} tokens per"
        f" rank. model_mb = bytes of the model this rank holds (fq.footprint); memory = {memory}; peak_over_start ="
        f" the run's peak minus the memory at the recipe's start (after imports). FSDP step time = {ratio:.2f}x DDP's."
    )
    plot = bar_panels([{**r, "arm": f"{r['strategy']} rank {r['rank']}"} for r in rows], "arm",
                      ["model_mb", "load_memory_mb", "peak_over_start_mb", "step_time_s"],
                      f"Sharded QLoRA vs DDP ({model}, {accelerator})")  # fmt: skip
    print(write_report(rows, COLUMNS, out_dir, f"qlora_sharded_{model}_{accelerator}", header, plot)["markdown"]
          .read_text())  # fmt: skip


if __name__ == "__main__":
    CLI(main, as_positional=False)

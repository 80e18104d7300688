"""CPU resources of QLoRA training: this package's recipe (nf4-dq and 16-bit LoRA) against a plain
transformers + peft QLoRA loop (BitsAndBytesConfig + prepare_model_for_kbit_training), same model, data,
LoRA shape, batch and steps. Each arm runs in its own process so its peak RSS is its own.

    python benchmarks/qlora_cpu.py --steps 20     # writes benchmarks/results/qlora_cpu.{md,csv,png}
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

ARMS = ("fabric-quant nf4-dq", "fabric-quant bf16 LoRA", "transformers+peft nf4-dq")
COLUMNS = ("arm", "steps", "step_time_s", "peak_rss_mb", "step_time_vs_bf16_lora", "peak_rss_vs_bf16_lora")
MICRO, SEQ, R = 16, 64, 8


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(arm: str, steps: int) -> dict:
    from fabric_quant.finetune.args import DataArgs, EvalArgs, LoRAArgs, TrainArgs

    train = TrainArgs(micro_batch_size=MICRO, global_batch_size=MICRO, max_steps=steps, max_seq_length=SEQ,
                      save_interval=None, lr=3e-3)  # fmt: skip
    if arm.startswith("fabric-quant"):
        import qlora

        m = qlora.setup(
            quantize="nf4-dq" if "nf4" in arm else None, lora=LoRAArgs(r=R), train=train, data=DataArgs(),
            eval=EvalArgs(interval=None, initial=False), accelerator="cpu", merge=False,
            out_dir=Path("runs/qlora_cpu") / arm.replace(" ", "_"),
        )  # fmt: skip
        return {"step_time_s": m["train_time_s"] / steps, "peak_rss_mb": _rss_mb()}
    return _hf_peft_loop(train, steps)


def _hf_peft_loop(train, steps: int) -> dict:
    """The transformers + peft QLoRA recipe as its docs give it, with the same data pipeline."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from fabric_quant.finetune import data as fdata
    from fabric_quant.finetune.args import DataArgs
    from fabric_quant.models import minilm_path

    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    train_set, _ = fdata.load_datasets("sequence-classification", DataArgs(), tok, SEQ, 42)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["classifier"])  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(train_set.labels), quantization_config=q, device_map="cpu"
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="SEQ_CLS"))  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    batches = fdata.epoch_micro_batches(len(train_set), MICRO, 42, 0, 0, 1)
    start = time.perf_counter()
    for i in range(steps):
        batch = fdata.collate([train_set.examples[j] for j in batches[i % len(batches)]], tok.pad_token_id,
                              "sequence-classification")  # fmt: skip
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"step_time_s": (time.perf_counter() - start) / steps, "peak_rss_mb": _rss_mb()}


def main(steps: int = 20, out_dir: Path = Path("benchmarks/results"), worker_arm: str | None = None) -> None:
    if worker_arm:
        print("RESULT " + json.dumps(worker(worker_arm, steps)))
        return
    from fabric_quant.report import bar_panels, machine_name, write_report

    rows = []
    for arm in ARMS:
        cmd = [sys.executable, __file__, "--steps", str(steps), "--worker_arm", arm]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        rows.append({"arm": arm, "steps": steps, **result})
        print(arm, result, flush=True)
    base = rows[1]
    for row in rows:
        row["step_time_vs_bf16_lora"] = row["step_time_s"] / base["step_time_s"]
        row["peak_rss_vs_bf16_lora"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    header = (
        f"# QLoRA training resources on CPU\n\nCommand: `python benchmarks/qlora_cpu.py --steps {steps}`;"
        f" {machine_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads. all-MiniLM-L6-v2,"
        f" pydoc-topics, micro-batch {MICRO} x seq {SEQ}, LoRA r={R} all-linear, AdamW; step time = mean over"
        " all steps; peak RSS = the process's maximum resident set size (model load included). Ratios against"
        " the bf16 LoRA arm of the same run."
    )
    plot = bar_panels(rows, "arm", ["step_time_s", "peak_rss_mb"], "QLoRA on CPU")
    print(write_report(rows, COLUMNS, out_dir, "qlora_cpu", header, plot)["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)

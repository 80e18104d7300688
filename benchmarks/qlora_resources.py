"""Peak memory and step time of QLoRA training: this package's recipe (nf4-dq, and 16-bit LoRA as the baseline)
against a plain transformers + peft QLoRA loop (BitsAndBytesConfig + prepare_model_for_kbit_training), same
model, data, LoRA shape, batch and steps. Each arm runs in its own process, so its peak memory is its own.

    python benchmarks/qlora_resources.py                                   # CPU, all-MiniLM-L6-v2 (classification)
    python benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 20   # GPU, ~1.2B Llama
Writes benchmarks/results/qlora_resources_<model>_<accelerator>.{md,csv,png}.

`llama-1b` is a Llama-3.2-1B-shaped model (2048 hidden, 16 layers, GQA 32/8 heads, 8192 MLP) built from its
config with random weights (no download), trained as a causal LM on instruction records made from pydoc topics.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

ARMS = ("fabric-quant nf4-dq", "fabric-quant 16-bit LoRA", "transformers+peft nf4-dq")
COLUMNS = ("arm", "device", "steps", "step_time_s", "peak_memory_mb", "step_time_vs_lora16", "peak_memory_vs_lora16")
SHAPES = {  # micro-batch, sequence length, task
    "minilm": (16, 64, "sequence-classification"),
    "llama-1b": (4, 256, "causal-lm"),
}


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def prepare(model: str, workdir: Path) -> tuple[Path | None, Path | None]:
    """The model folder (None = packaged MiniLM) and the training JSONL (None = built-in pydoc topics)."""
    if model == "minilm":
        return None, None
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fabric_quant.data import topic_paragraphs
    from fabric_quant.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    path = workdir / "llama-1b"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    data = workdir / "instructions.jsonl"
    records = [{"instruction": "Name the topic of this paragraph.", "input": text, "output": topic}
               for topic, text in topic_paragraphs()]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, data


def worker(arm: str, model: str, accelerator: str, steps: int, model_dir: Path | None, data: Path | None) -> dict:
    from fabric_quant.finetune.args import DataArgs, EvalArgs, LoRAArgs, ModelArgs, TrainArgs

    micro, seq, task = SHAPES[model]
    train = TrainArgs(micro_batch_size=micro, global_batch_size=micro, max_steps=steps, max_seq_length=seq,
                      save_interval=None, lr=3e-4)  # fmt: skip
    if arm.startswith("fabric-quant"):
        import qlora

        m = qlora.setup(
            model=ModelArgs(path=model_dir, task=task), quantize="nf4-dq" if "nf4" in arm else None,
            lora=LoRAArgs(r=8), train=train, data=DataArgs(train_path=data), accelerator=accelerator,
            eval=EvalArgs(interval=None, initial=False), merge=False,
            out_dir=Path("runs/qlora_resources") / f"{model}-{arm.replace(' ', '_')}",
        )  # fmt: skip
        return {"step_time_s": m["train_time_s"] / steps, "peak_memory_mb": _peak_mb(accelerator)}
    return _hf_peft_loop(model_dir, data, task, train, accelerator, steps)


def _hf_peft_loop(model_dir, data, task, train, accelerator: str, steps: int) -> dict:
    """The transformers + peft QLoRA recipe as their docs give it, fed by the same data pipeline."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from fabric_quant.finetune import data as fdata
    from fabric_quant.finetune.args import DataArgs
    from fabric_quant.models import minilm_path

    torch.manual_seed(42)
    path = model_dir or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_set, _ = fdata.load_datasets(task, DataArgs(train_path=data), tok, train.max_seq_length, 42)
    cls = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    head = ["classifier"] if task == "sequence-classification" else ["lm_head"]
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=head)  # fmt: skip
    extra = {"num_labels": len(train_set.labels)} if train_set.labels else {}
    model = cls.from_pretrained(path, quantization_config=q, device_map=accelerator, **extra)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                      task_type="SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    batches = fdata.epoch_micro_batches(len(train_set), train.micro_batch_size, 42, 0, 0, 1)
    start = time.perf_counter()
    for i in range(steps):
        examples = [train_set.examples[j] for j in batches[i % len(batches)]]
        batch = {k: v.to(accelerator) for k, v in fdata.collate(examples, tok.pad_token_id, task).items()}
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if accelerator == "cuda":
        torch.cuda.synchronize()
    return {"step_time_s": (time.perf_counter() - start) / steps, "peak_memory_mb": _peak_mb(accelerator)}


def main(
    model: Literal["minilm", "llama-1b"] = "minilm",
    accelerator: Literal["cpu", "cuda"] = "cpu",
    steps: int = 20,
    out_dir: Path = Path("benchmarks/results"),
    worker_arm: str | None = None,
    model_dir: Path | None = None,
    data: Path | None = None,
) -> None:
    if worker_arm:
        print("RESULT " + json.dumps(worker(worker_arm, model, accelerator, steps, model_dir, data)))
        return
    from fabric_quant.report import bar_panels, machine_name, write_report

    device = torch.cuda.get_device_name() if accelerator == "cuda" else machine_name()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = prepare(model, Path(tmp))
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--model", model, "--accelerator", accelerator, "--steps", str(steps),
                   "--worker_arm", arm]  # fmt: skip
            cmd += ["--model_dir", str(model_dir), "--data", str(data)] if model_dir else []
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{arm} failed:\n{out.stderr[-3000:]}")
            result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
            rows.append({"arm": arm, "device": device, "steps": steps, **result})
            print(arm, result, flush=True)
    base = rows[1]
    for row in rows:
        row["step_time_vs_lora16"] = row["step_time_s"] / base["step_time_s"]
        row["peak_memory_vs_lora16"] = row["peak_memory_mb"] / base["peak_memory_mb"]
    micro, seq, task = SHAPES[model]
    memory = (
        "torch.cuda.max_memory_allocated" if accelerator == "cuda" else "peak RSS of the process (model load included)"
    )
    header = (
        f"# QLoRA training resources: {model} on {device}\n\n"
        f"Command: `python benchmarks/qlora_resources.py --model {model} --accelerator {accelerator} --steps {steps}`;"
        f" torch {torch.__version__}. Task {task}, micro-batch {micro} x seq {seq}, LoRA r=8 all-linear, AdamW,"
        f" bf16 compute. Step time = mean over all steps; memory = {memory}. Ratios against the 16-bit LoRA arm"
        " of the same run."
    )
    plot = bar_panels(rows, "arm", ["step_time_s", "peak_memory_mb"], f"QLoRA resources ({model}, {accelerator})")
    name = f"qlora_resources_{model}_{accelerator}"
    print(write_report(rows, COLUMNS, out_dir, name, header, plot)["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)

"""Peak memory and step time of QLoRA training: this package's recipe (nf4-dq, and 16-bit LoRA as the baseline)
against a plain transformers + peft QLoRA loop (BitsAndBytesConfig + prepare_model_for_kbit_training), same
model, data, LoRA shape, batch and steps. Each arm runs in its own process, so its peak memory is its own.

    python benchmarks/qlora_resources.py                                   # CPU, all-MiniLM-L6-v2 (classification)
    python benchmarks/qlora_resources.py --model llama-1b --steps 3        # CPU, Llama-3.2-1B shape
    python benchmarks/qlora_resources.py --model llama-3b --steps 3        # CPU, Llama-3.2-3B shape
    python benchmarks/qlora_resources.py --model llama-1b --accelerator cuda --steps 20   # GPU
Writes benchmarks/results/qlora_resources_<model>_<accelerator>.{md,csv,png}.

`llama-1b` / `llama-3b` are Llama-3.2-1B / -3B-shaped models (2048 / 3072 hidden, 16 / 28 layers, GQA 32/8 and
24/8 heads, 8192 MLP, 128256-token vocabulary, tied embeddings) built from their config with random weights (no
download), saved as sharded bf16 safetensors and loaded through the same code users hit, trained as causal LMs on
instruction records made from pydoc topics. Per arm (its own process): load time, peak memory right after the
load (RSS over the RSS after imports on CPU), peak memory of the whole run, step time and tokens/s.
"""

from __future__ import annotations

import itertools
import json
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
COLUMNS = ("arm", "device", "steps", "load_time_s", "load_memory_mb", "peak_memory_mb", "first_step_s", "step_time_s",
           "tokens_per_s", "step_time_vs_lora16", "peak_memory_vs_lora16")  # fmt: skip
SHAPES = {  # micro-batch, sequence length, task
    "minilm": (16, 64, "sequence-classification"),
    "llama-1b": (4, 256, "causal-lm"),
    "llama-3b": (4, 256, "causal-lm"),
}
LLAMA = {  # Llama-3.2 shapes (hidden, layers, heads, kv heads, MLP)
    "llama-1b": (2048, 16, 32, 8, 8192),
    "llama-3b": (3072, 28, 24, 8, 8192),
}
_BASELINE: dict[str, float] = {}  # the worker's memory after its imports


def _peak_mb(device: str) -> float:
    """Peak memory so far: CUDA's allocator peak, or on CPU the process's peak RSS over its RSS after imports."""
    from fabric_quant.report import peak_memory_mb

    return peak_memory_mb(device) - (_BASELINE.get("rss", 0.0) if device == "cpu" else 0.0)


def prepare(model: str, workdir: Path) -> tuple[Path | None, Path | None]:
    """The model folder (None = packaged MiniLM) and the training JSONL (None = built-in pydoc topics)."""
    if model == "minilm":
        return None, None
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fabric_quant.demo.data import topic_paragraphs
    from fabric_quant.demo.models import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    hidden, layers, heads, kv_heads, mlp = LLAMA[model]
    config = LlamaConfig(
        vocab_size=128256, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    path = workdir / model
    LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).save_pretrained(path, max_shard_size="1GB")
    tokenizer.save_pretrained(path)
    data = workdir / "instructions.jsonl"
    records = [{"instruction": "Name the topic of this paragraph.", "input": text, "output": topic}
               for topic, text in topic_paragraphs()]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # a small validation file: the recipe's final evaluation is not what this benchmark measures
    (workdir / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:8]))
    return path, data


def worker(arm: str, model: str, accelerator: str, steps: int, model_dir: Path | None, data: Path | None,
           checkpointing: bool = False) -> dict:  # fmt: skip
    """One arm's numbers. The step time is the steady state: the mean interval between optimizer steps from the second
    on (on an H100 the recipe's first step took 2.75 s against about 0.3 s for the next ones, so a mean over 10
    steps was mostly warm-up); the first step is reported apart (the run's training time minus the later steps)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []

    def on_step(*_) -> None:
        if accelerator == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    handle = register_optimizer_step_post_hook(on_step)
    try:
        result = _arm(arm, model, accelerator, steps, model_dir, data, checkpointing)
    finally:
        handle.remove()
    later = [b - a for a, b in itertools.pairwise(stamps)]
    result["first_step_s"] = result.pop("train_time_s") - sum(later)
    result["step_time_s"] = sum(later) / len(later) if later else result["first_step_s"]
    result["later_steps_s"] = later  # each step's time from the second on (not a report column)
    return result


def _arm(arm: str, model: str, accelerator: str, steps: int, model_dir: Path | None, data: Path | None,
         checkpointing: bool) -> dict:  # fmt: skip
    from fabric_quant.finetune.args import DataArgs, EvalArgs, LoRAArgs, ModelArgs, TrainArgs

    micro, seq, task = SHAPES[model]
    train = TrainArgs(micro_batch_size=micro, global_batch_size=micro, max_steps=steps, max_seq_length=seq,
                      save_interval=None, lr=3e-4, gradient_checkpointing=checkpointing)  # fmt: skip
    val = data.with_name("val.jsonl") if data is not None else None
    if arm.startswith("fabric-quant"):
        import qlora

        m = qlora.setup(
            model=ModelArgs(path=model_dir, task=task), quantize="nf4-dq" if "nf4" in arm else None,
            lora=LoRAArgs(r=8), train=train, data=DataArgs(train_path=data, val_path=val), accelerator=accelerator,
            eval=EvalArgs(interval=None, initial=False), merge=False,
            out_dir=Path("runs/qlora_resources") / f"{model}-{arm.replace(' ', '_')}", overwrite=True,
        )  # fmt: skip
        load_memory = m["peak_memory_after_load_mb"] - (_BASELINE.get("rss", 0) if accelerator == "cpu" else 0)
        return {"load_time_s": m["load_time_s"], "load_memory_mb": load_memory, "peak_memory_mb": _peak_mb(accelerator),
                "train_time_s": m["train_time_s"], "tokens_per_s": m["throughput_tokens_per_s"]}  # fmt: skip
    return _hf_peft_loop(model_dir, data, task, train, accelerator, steps)  # train carries the checkpointing flag


def _hf_peft_loop(model_dir, data, task, train, accelerator: str, steps: int) -> dict:
    """The transformers + peft QLoRA recipe as their docs give it, fed by the same data pipeline."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from fabric_quant.demo.models import minilm_path
    from fabric_quant.finetune import data as fdata
    from fabric_quant.finetune.args import DataArgs

    torch.manual_seed(42)
    path = model_dir or minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    data_args = DataArgs(train_path=data)
    train_set, _ = fdata.load_datasets(task, data_args, tok, train.max_seq_length, 42)
    widths = (data_args.pad_to_multiple_of, train.max_seq_length)  # the batch widths the recipe's arms see
    cls = AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM
    head = ["classifier"] if task == "sequence-classification" else ["lm_head"]
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=head)  # fmt: skip
    extra = {"num_labels": len(train_set.labels)} if train_set.labels else {}
    load_start = time.perf_counter()
    model = cls.from_pretrained(path, quantization_config=q, device_map=accelerator, **extra)
    load_time, load_memory = time.perf_counter() - load_start, _peak_mb(accelerator)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                      task_type="SEQ_CLS" if task == "sequence-classification" else "CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    # from_pretrained returns the model in eval mode; transformers' Trainer switches it to train mode in every
    # training step. Without this the arm would train with the model's dropouts off (and, on CPU, with the fused
    # attention kernel that dropout rules out): less work than a real fine-tuning step.
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.lr)
    batches = fdata.epoch_micro_batches(len(train_set), train.micro_batch_size, 42, 0, 0, 1)
    start, tokens = time.perf_counter(), 0
    for i in range(steps):
        examples = [train_set.examples[j] for j in batches[i % len(batches)]]
        batch = {k: v.to(accelerator) for k, v in fdata.collate(examples, tok.pad_token_id, task, *widths).items()}
        tokens += int(batch["attention_mask"].sum())
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if accelerator == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"load_time_s": load_time, "load_memory_mb": load_memory, "peak_memory_mb": _peak_mb(accelerator),
            "train_time_s": elapsed, "tokens_per_s": tokens / elapsed}  # fmt: skip


def main(
    model: Literal["minilm", "llama-1b", "llama-3b"] = "minilm",
    accelerator: Literal["cpu", "cuda"] = "cpu",
    steps: int = 20,
    out_dir: Path = Path("benchmarks/results"),
    gradient_checkpointing: bool = False,
    worker_arm: str | None = None,
    model_dir: Path | None = None,
    data: Path | None = None,
) -> None:
    if worker_arm:
        if accelerator == "cpu":
            import peft  # noqa: F401
            import transformers  # noqa: F401

            import fabric_quant  # noqa: F401  (the imports every arm pays; measured from here)
            from fabric_quant.report import peak_rss_mb

            _BASELINE["rss"] = peak_rss_mb()
        result = worker(worker_arm, model, accelerator, steps, model_dir, data, gradient_checkpointing)
        print("RESULT " + json.dumps(result))
        return
    from fabric_quant.report import bar_panels, machine_name, write_report

    device = torch.cuda.get_device_name() if accelerator == "cuda" else machine_name()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, data = prepare(model, Path(tmp))
        checkpoint_mb = sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6 if model_dir else None
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--model", model, "--accelerator", accelerator, "--steps", str(steps),
                   "--worker_arm", arm, "--gradient_checkpointing", str(gradient_checkpointing).lower()]  # fmt: skip
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
        "torch.cuda.max_memory_allocated"
        if accelerator == "cuda"
        else "peak RSS of the process minus its RSS after importing torch, transformers, peft and fabric_quant"
    )
    header = (
        f"# QLoRA training resources: {model} on {device}\n\n"
        f"Command: `python benchmarks/qlora_resources.py --model {model} --accelerator {accelerator} --steps {steps}"
        f"{' --gradient_checkpointing true' if gradient_checkpointing else ''}`;"
        f" torch {torch.__version__}."
        + (f" Checkpoint: {checkpoint_mb:.0f} MB of bf16 safetensors." if checkpoint_mb else "")
        + f" Task {task}, micro-batch {micro} x seq {seq}, LoRA r=8 all-linear, AdamW, gradient checkpointing"
        f" {'on' if gradient_checkpointing else 'off'} in every arm,"
        f" bf16 compute. load = building the model from the checkpoint (quantizing included); load_memory = peak"
        f" memory right after the load; peak_memory = over the whole run. Step time = mean from the second step on"
        f" (first_step_s apart: warm-up); tokens/s over all steps; memory ="
        f" {memory}. Ratios against the 16-bit LoRA arm of the same run."
    )
    plot = bar_panels(rows, "arm", ["load_time_s", "load_memory_mb", "peak_memory_mb", "step_time_s"],
                      f"QLoRA resources ({model}, {accelerator})")  # fmt: skip
    name = f"qlora_resources_{model}_{accelerator}" + ("_checkpointing" if gradient_checkpointing else "")
    print(write_report(rows, COLUMNS, out_dir, name, header, plot)["markdown"].read_text())


if __name__ == "__main__":
    CLI(main, as_positional=False)

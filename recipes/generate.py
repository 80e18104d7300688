"""Generate text with a causal LM: a base in any bitsandbytes mode or 16-bit, plus an optional LoRA adapter, or a
merged folder written by the QLoRA recipe.

    python recipes/generate.py --model.path DIR --quantize nf4-dq --prompt "Name the topic." --max_new_tokens 64
    python recipes/generate.py --model.path DIR --adapter runs/qlora/final/adapter --prompt "..."
    python recipes/generate.py --model.path runs/qlora/final/merged --quantize null --prompts_path prompts.jsonl
    python recipes/generate.py --model.path runs/qlora/final/merged --quantize woq-int4 --prompt "..."
    python recipes/generate.py --model.path runs/woq-int4 --quantize woq-int4 --prompt "..."   # fq.export_woq's folder
    python recipes/generate.py --help

Prompts are wrapped in the Alpaca template the QLoRA recipe trains with (``--template alpaca``), the model's chat
template (``chat``) or used as they are (``none``). ``--quantize woq-int8`` / ``woq-int4`` quantizes a float base
weight-only while loading (the CPU decoding modes); a folder written by ``fabric_quant.export_woq`` is recognised and
loaded as it was saved. A prompts file is JSONL with one ``{"prompt": ...}`` (or
``{"instruction": ..., "input": ...}``) per line. Tokens stream to the terminal; tokens/s and peak memory follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from jsonargparse import CLI

import fabric_quant as fq
from fabric_quant.finetune.args import ModelArgs
from fabric_quant.finetune.data import chat_ids, load_tokenizer, read_jsonl
from fabric_quant.finetune.generation import alpaca_prompt, generate
from fabric_quant.finetune.model import load_model
from fabric_quant.options import check_range, parse_dtype
from fabric_quant.report import peak_memory_mb


def _prompts(prompt: str | None, prompts_path: Path | None) -> list[tuple[str, str]]:
    """(instruction, context) pairs from the command line or a JSONL file."""
    if (prompt is None) == (prompts_path is None):
        raise ValueError("give exactly one of --prompt and --prompts_path")
    if prompt is not None:
        return [(prompt, "")]
    records = read_jsonl(prompts_path, {})
    pairs = []
    for i, r in enumerate(records, 1):
        text = r.get("prompt", r.get("instruction"))
        if not isinstance(text, str):
            raise ValueError(f"{prompts_path}: record {i} has neither a 'prompt' nor an 'instruction' string")
        pairs.append((text, r.get("input") or ""))
    return pairs


def _encode(tokenizer, instruction: str, context: str, template: str) -> list[int]:
    if template == "chat":
        if not tokenizer.chat_template:
            raise ValueError("--template chat: this tokenizer has no chat template; use alpaca or none")
        content = f"{instruction}\n\n{context}" if context else instruction
        return chat_ids(tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
    text = alpaca_prompt(instruction, context) if template == "alpaca" else f"{instruction}{context}"
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(text, add_special_tokens=False)["input_ids"]


def _load(model: ModelArgs, quantize: str | None, adapter: Path | None, dtype: torch.dtype, device: torch.device):
    """The model: a weight-only folder as saved, a float base quantized weight-only, or load_model's modes."""
    from fabric_quant.registry import available_modes
    from fabric_quant.woq.folder import is_woq_folder, load_woq

    woq_modes = available_modes("woq")
    if is_woq_folder(model.path):
        saved = json.loads((Path(model.path) / "woq.json").read_text())["mode"]
        if quantize not in (None, saved):
            raise ValueError(f"{model.path} is a {saved} folder (fabric_quant.export_woq): --quantize must be {saved}"
                             f" or null, got {quantize!r}")  # fmt: skip
        if adapter is not None:
            raise ValueError("--adapter cannot go on a weight-only folder: merge it when exporting"
                             " (fabric_quant.export_woq(base, out, adapter=...))")  # fmt: skip
        return load_woq(model.path, device)
    if quantize in woq_modes:
        if adapter is not None:
            raise ValueError(f"--quantize {quantize} with --adapter: LoRA does not wrap weight-only layers; export the"
                             " merged model first (fabric_quant.export_woq(base, out, adapter=...))")  # fmt: skip
        net = load_model(model.path, "causal-lm", None, None, dtype, device, progress=False)
        options = {} if model.ignore_modules is None else {"ignore_modules": model.ignore_modules}
        return fq.quantize_(net, quantize, **options)
    return load_model(model.path, "causal-lm", None, quantize, dtype, device, model.ignore_modules)


def setup(
    model: ModelArgs = ModelArgs(task="causal-lm"),
    quantize: str | None = "nf4-dq",
    adapter: Path | None = None,
    prompt: str | None = None,
    prompts_path: Path | None = None,
    template: Literal["alpaca", "chat", "none"] = "alpaca",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    precision: Literal["bf16-true", "32-true", "16-true"] = "bf16-true",
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    seed: int = 42,
) -> list[dict]:
    """Generate a continuation for each prompt and print it, with its speed.

    Args:
        model: the base (or merged) model folder; the task must be causal-lm.
        quantize: a bitsandbytes or weight-only (woq-int8, woq-int4) mode the base is quantized with while
            loading, or null for 16-bit. A weight-only folder (``fabric_quant.export_woq``) loads as saved: give
            its mode or null.
        adapter: a LoRA adapter folder (PEFT format, e.g. the QLoRA recipe's final/adapter).
        prompt: one prompt.
        prompts_path: a JSONL file of prompts.
        template: alpaca (the recipe's training format), chat (the tokenizer's chat template) or none.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 = greedy; > 0 samples.
        top_p: nucleus sampling threshold (with temperature > 0).
        precision: compute dtype of what is not quantized.
        accelerator: cpu, cuda or auto.
        seed: sampling seed.
    """
    if model.task != "causal-lm" or model.path is None:
        raise ValueError("generate needs --model.path (a causal LM folder) and --model.task causal-lm")
    check_range("max_new_tokens", max_new_tokens, 1)
    check_range("temperature", temperature, 0, integer=False)
    check_range("top_p", top_p, 0, 1, integer=False, low_open=True)
    pairs = _prompts(prompt, prompts_path)
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter={str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json)")
    device = torch.device("cuda" if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
                          else "cpu")  # fmt: skip
    torch.manual_seed(seed)
    # any tokenizer transformers loads, able to encode any prompt (load_tokenizer); an unusable one names its file
    tokenizer = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file()
                               else model.path)  # fmt: skip
    net = _load(model, quantize, adapter, parse_dtype(precision), device)
    if adapter is not None:
        from peft import PeftModel

        from fabric_quant.checkpoint import load_tensors

        for path in Path(adapter).glob("*.safetensors"):
            load_tensors(path, require_checksums=False)  # checksums written by this package are verified
        net = PeftModel.from_pretrained(net, adapter).eval()
    results = []
    for instruction, context in pairs:
        print(f"\n>>> {instruction}{' | ' + context if context else ''}")
        ids = _encode(tokenizer, instruction, context, template)
        out = generate(net, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stream=True)  # fmt: skip
        results.append({"prompt": instruction, **out})
        print(f"[{out['new_tokens']} tokens, {out['tokens_per_s']:.1f} tokens/s]")
    peak = peak_memory_mb(device)
    print(f"peak memory: {peak:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})")
    return results


if __name__ == "__main__":
    CLI(setup, as_positional=False)

"""Assembling the model of a (Q)LoRA run and merging the result back into a float Hugging Face model."""

from __future__ import annotations

from pathlib import Path

import torch

from fabric_quant.checkpoint import save_dir_atomically
from fabric_quant.nn.base import quantized_layers

_TASK_TYPE = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
_PEFT_PREFIX = "base_model.model."


def load_float_model(path: Path, task: str, labels: list[str] | None):
    """The Hugging Face model for ``task`` in fp32 (the quantization plugin decides what becomes low-bit)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task == "sequence-classification":
        return AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=torch.float32,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def head_names(model, task: str) -> list[str]:
    """The output head(s), kept in float: a 4-bit head breaks peft's modules_to_save and costs accuracy."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    if task == "sequence-classification":
        names = [name for name in SEQ_CLS_HEAD_NAMES if getattr(model, name, None) is not None]
    else:
        out = model.get_output_embeddings()
        names = [name for name, module in model.named_modules() if module is out][:1]
    if not names:
        raise ValueError(f"Could not find the output head of {type(model).__name__}; set model.ignore_modules")
    return names


def add_lora(model, task: str, lora, heads: list[str]):
    """Wrap with peft LoRA; a classification head is trained in full (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=_TASK_TYPE[task],
        modules_to_save=heads if task == "sequence-classification" else None,
    )
    return get_peft_model(model, config)


def base_name(peft_name: str) -> str:
    """Name of a layer in the plain model, from its name inside the peft wrapper."""
    return peft_name.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer")


def save_merged(peft_model, base_path: Path, task: str, labels, adapter_dir: Path, out: Path, dtype: torch.dtype):
    """LoRA merged into the *dequantized* base (the weights the adapter was trained against), saved as a plain
    Hugging Face model. Merging into the original float weights instead would not match training (peft #2321)."""
    from peft import PeftModel

    from fabric_quant.checkpoint import load_tensors

    for path in Path(adapter_dir).glob("*.safetensors"):
        load_tensors(path)  # the adapter's tensors against their checksums before anything is merged
    base = load_float_model(base_path, task, labels)
    with torch.no_grad():
        for name, layer in quantized_layers(peft_model):
            base.get_submodule(base_name(name)).weight.copy_(layer.dequantized_weight())
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(dtype)
    save_dir_atomically(out, lambda tmp: merged.save_pretrained(tmp, safe_serialization=True))
    return merged

"""Assembling the model of a (Q)LoRA run, and merging the result into a plain Hugging Face model layer by layer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from fabric_quant.checkpoint import save_dir_atomically, save_tensors
from fabric_quant.finetune.lean_activations import lean_activations_
from fabric_quant.finetune.lora_dropout import lean_lora_dropout_
from fabric_quant.hf import output_heads
from fabric_quant.loading import from_pretrained
from fabric_quant.nn.base import QuantizedLinear, set_whole

_TASK_TYPE = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def load_model(path: Path, task: str, labels: list[str] | None, mode: str | None, dtype: torch.dtype, device=None,
               ignore_modules=None, progress: bool = True, on_block_loaded=None, on_model_built=None):  # fmt: skip
    """The Hugging Face model for ``task``, quantized with ``mode`` while it loads (None: plain ``dtype``)."""
    kwargs = {}
    if task == "sequence-classification":
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {name: i for i, name in enumerate(labels)}}  # fmt: skip
    return from_pretrained(path, mode, task=task, dtype=dtype, device=device, ignore_modules=ignore_modules,
                           progress=progress, on_block_loaded=on_block_loaded, on_model_built=on_model_built,
                           **kwargs)  # fmt: skip


def head_names(model, task: str) -> list[str]:
    """The output head(s), kept in float: a 4-bit head breaks peft's modules_to_save and costs accuracy."""
    names = output_heads(model, task)
    if not names:
        raise ValueError(f"Could not find the output head of {type(model).__name__}; set model.ignore_modules")
    return names


def add_lora(model, task: str, lora, heads: list[str]):
    """Wrap with peft LoRA; a classification head is trained in full (modules_to_save). The adapters' dropout runs
    inside lora_A, keeping no mask or dropped copy for the backward (fabric_quant.finetune.lora_dropout); Llama-code
    norms and MLP products keep only their inputs (fabric_quant.finetune.lean_activations)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=_TASK_TYPE[task],
        modules_to_save=heads if task == "sequence-classification" else None,
    )
    peft_model = get_peft_model(model, config)
    lean_lora_dropout_(peft_model)
    lean_activations_(peft_model)
    return peft_model


def load_trained(path: Path, task: str, labels: list[str] | None, mode: str | None, dtype: torch.dtype, lora,
                 heads: list[str], trainable: dict[str, torch.Tensor], device=None, ignore_modules=None):  # fmt: skip
    """The trained PEFT model whole on this process: the base loaded again unsharded (quantized as it loads, as in
    training), the adapters added and set to ``trainable`` (every trained tensor, gathered from a sharded run by
    :func:`~fabric_quant.finetune.state.trainable_state`). Merging a sharded run needs it: :func:`merged_tensors`
    reads each whole base weight, which no rank of the sharded model holds."""
    model = add_lora(load_model(path, task, labels, mode, dtype, device, ignore_modules, progress=False), task, lora,
                     heads)  # fmt: skip
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            set_whole(params[name], value)
    return model


def merged_tensors(peft_model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The plain model's state, one tensor at a time: LoRA merged into the *dequantized* base weight (the weights
    the adapter was trained against; merging into the original float weights would not match training, peft
    #2321), trained copies of modules_to_save, everything else as it is. Float tensors in ``dtype``."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    model = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embed is not None and getattr(head, "weight", None) is embed.weight

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype) if t.is_floating_point() else t.detach()

    def weight_of(layer) -> torch.Tensor:
        return layer.dequantized_weight() if isinstance(layer, QuantizedLinear) else layer.weight.detach().float()

    skip = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue  # inside a wrapper already handled
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer | ModulesToSaveWrapper | QuantizedLinear):
            skip = prefix
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            yield f"{prefix}weight", cast(weight_of(base) + module.get_delta_weight(adapter).float())
            if base.bias is not None:
                yield f"{prefix}bias", cast(base.bias)
        elif isinstance(module, ModulesToSaveWrapper):
            for key, value in module.modules_to_save[adapter].state_dict().items():
                yield prefix + key, cast(value)
        elif isinstance(module, QuantizedLinear):
            yield f"{prefix}weight", cast(weight_of(module))
            if module.bias is not None:
                yield f"{prefix}bias", cast(module.bias)
        else:
            for key, value in module.named_parameters(recurse=False):
                if not (tied and module is head and key == "weight"):  # saved once, as the input embedding
                    yield prefix + key, cast(value)
            for key, value in module.named_buffers(recurse=False):
                if key not in module._non_persistent_buffers_set:
                    yield prefix + key, cast(value)


def save_merged(peft_model, out: Path, dtype: torch.dtype, max_shard_bytes: int = 1 << 30) -> Path:
    """Write :func:`merged_tensors` as sharded safetensors with their index and the model's config, a folder that
    ``transformers``' ``from_pretrained`` loads. Tensors stream out shard by shard: the extra memory is about one
    float layer plus one shard, never a float copy of the whole model."""
    model = peft_model.get_base_model()

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        shards, current, size, weight_map, total = [], {}, 0, {}, 0

        def flush() -> None:
            nonlocal current, size
            if current:
                name = f"part-{len(shards):05d}.safetensors"
                save_tensors(tmp / name, current, {"format": "pt"})
                shards.append((name, list(current)))
                current, size = {}, 0

        for key, tensor in merged_tensors(peft_model, dtype):
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                flush()
            current[key] = tensor.contiguous()
            size, total = size + nbytes, total + nbytes
        flush()
        for i, (name, keys) in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            (tmp / name).rename(tmp / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.dtype = dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)

    return save_dir_atomically(out, write)

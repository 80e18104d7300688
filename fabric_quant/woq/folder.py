"""The weight-only folder format: a causal LM whose Linear weights are quantized as its float tensors stream in
(:func:`build_woq`), written as a folder (:func:`save_woq`), recognised (:func:`is_woq_folder`) and reloaded in
one call (:func:`load_woq`). :func:`fabric_quant.finetune.export.export_woq` builds one from a QLoRA result.

The folder: ``model.safetensors`` (the quantized state, per-tensor checksums, the layer modes), ``config.json``,
the tokenizer files, ``generation_config.json`` when the source has one, and ``woq.json`` (mode, options, dtype,
where it came from). It is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fabric_quant.checkpoint import load_tensors, read_metadata, save_dir_atomically, save_quantized
from fabric_quant.hf import output_heads
from fabric_quant.modules import set_module
from fabric_quant.nn.base import quantized_layers
from fabric_quant.nn.woq import WOQLinear
from fabric_quant.woq.modes import WOQConfig, int8_embedding, quantize_woq, woq_targets

WOQ_FILE = "woq.json"
FORMAT = "fabric_quant.woq/1"
WEIGHTS = "model.safetensors"


def is_woq_folder(path: str | Path) -> bool:
    """True for a folder written by :func:`save_woq` (what ``export_woq`` writes)."""
    return (Path(path) / WOQ_FILE).is_file()


def save_woq(out_dir: str | Path, model: torch.nn.Module, tokenizer, record: dict[str, Any],
             copy_files: Iterable[Path] = ()) -> Path:
    """Write ``model`` (from :func:`build_woq`) with its tokenizer as a folder :func:`load_woq` reads; ``record``
    (mode, options, provenance) goes into ``woq.json`` and the weights' metadata, ``copy_files`` beside them.
    The folder appears whole or not at all (a previous one is replaced only once the new one is complete)."""
    record = {"format": FORMAT, **record}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_quantized(model, tmp / WEIGHTS, {"woq": json.dumps(record)})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for file in copy_files:
            shutil.copy(file, tmp / file.name)
        (tmp / WOQ_FILE).write_text(json.dumps(record, indent=1))

    return save_dir_atomically(out_dir, write)


def load_woq(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model of a folder written by :func:`save_woq`, on ``device``, in eval mode (tensors verified against
    their checksums; nothing is unpickled)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_woq_folder(path):
        raise FileNotFoundError(f"{str(path)!r} is not a weight-only quantized folder (no {WOQ_FILE})")
    record = json.loads((path / WOQ_FILE).read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path / WOQ_FILE}: format {record.get('format')!r}; this version reads {FORMAT!r}")
    config = WOQConfig.create(record["mode"], **record["options"])
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=config.dtype)
    quantize_woq(model, config.mode, **record["options"])  # empty shells of the saved layers
    saved = json.loads(read_metadata(path / WEIGHTS)["layer_modes"])
    mine = {name: layer.fq_mode for name, layer in quantized_layers(model)}
    if saved != mine:
        raise ValueError(
            f"{path}: the saved layers {sorted(saved)[:5]}... do not match the model's {sorted(mine)[:5]}..."
        )
    model.load_state_dict(load_tensors(path / WEIGHTS), strict=True, assign=True)
    model.tie_weights()
    _check_complete(model, path)
    return model.to(device).eval()


def build_woq(hf_config, config: WOQConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    """A causal LM built on meta from ``hf_config`` and filled from ``tensors`` (name, float tensor), each weight
    ``config`` selects quantized as it arrives."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM

    hf_config = hf_config.__class__.from_dict(hf_config.to_dict())  # a copy: the tie flag may change below
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=config.dtype)
    linears, embeddings = woq_targets(model, config)
    heads, embed = output_heads(model), model.get_input_embeddings()
    embed_name = next(name for name, module in model.named_modules() if module is embed)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False)) and bool(heads)
    split = tied and (heads[0] in linears or embed_name in embeddings)
    if split:  # the head gets weights of its own (quantized, or float beside an int8 table): no longer tied
        model.config.tie_word_embeddings = False
    names = set(model.state_dict())
    for key, tensor in tensors:
        if key not in names:
            raise ValueError(f"tensor {key!r} has no place in {type(model).__name__}")
        module_name, _, attr = key.rpartition(".")
        targets = [module_name] + (heads if split and module_name == embed_name and attr == "weight" else [])
        for name in targets:
            _place(
                model, name, attr, tensor, config, name in linears or name in embeddings, set_module_tensor_to_device
            )
    if not split:
        model.tie_weights()
    _check_complete(model, "the source")
    return model.eval()


def _place(model, name: str, attr: str, tensor: torch.Tensor, config: WOQConfig, quantize: bool, setter) -> None:
    module = model.get_submodule(name)
    if isinstance(module, WOQLinear) and attr == "bias":
        module.bias = torch.nn.Parameter(tensor.clone(), requires_grad=False)
        return
    setter(model, f"{name}.{attr}", "cpu", value=tensor.clone())  # a copy: not a view of a mapped file
    if not (quantize and attr == "weight"):
        return
    if isinstance(module, torch.nn.Linear):
        bias = module.bias
        new = WOQLinear.from_float(_with_cpu_bias(module), config.bits, config.group_size, config.scale_search)
        if bias is not None and bias.device.type == "meta":
            new.bias = bias  # still to come from the checkpoint
    else:
        new = int8_embedding(module, None)
    set_module(model, name, new)


def _with_cpu_bias(linear: torch.nn.Linear) -> torch.nn.Linear:
    if linear.bias is not None and linear.bias.device.type == "meta":
        linear.bias = None  # the real one comes later; WOQLinear.from_float must not copy a meta tensor
    return linear


def _check_complete(model: torch.nn.Module, what) -> None:
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"{what} has no values for {missing[:5]}{' ...' if len(missing) > 5 else ''}")

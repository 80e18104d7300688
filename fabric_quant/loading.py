"""Quantize while loading: a Hugging Face model built on the meta device and filled tensor by tensor from its
safetensors checkpoint, each Linear weight quantized on the target device as it arrives. The float model never
exists whole, on the host or on the device: peak memory is the quantized model plus about one float tensor."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fabric_quant.hf import output_heads, transformer_blocks
from fabric_quant.memory import release_freed_memory
from fabric_quant.modules import cast_float_rest
from fabric_quant.nn.base import QuantizedLinear
from fabric_quant.options import parse_dtype

TASKS = ("causal-lm", "sequence-classification")


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index lists, or its one file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path} holds no model.safetensors (or sharded index); only safetensors checkpoints load")


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, one at a time (memory-mapped: only the tensor being handled is resident)."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = list(f.keys())
        for key in keys:
            # one mapping per tensor: the tensor views the mapped file, and a mapping held for the whole shard
            # would keep every page the load has read resident until the shard ends (up to a shard's size)
            with safe_open(str(file), framework="pt", device="cpu") as f:
                yield key, f.get_tensor(key)


def from_pretrained(
    path: str | Path,
    mode: str | None = None,
    *,
    task: str = "causal-lm",
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    ignore_modules: Iterable[str] | None = None,
    progress: bool = True,
    on_block_loaded: Callable[[torch.nn.Module], None] | None = None,
    on_model_built: Callable[[torch.nn.Module], Any] | None = None,
    **config_kwargs: Any,
) -> torch.nn.Module:
    """The transformers model for ``task`` from a local folder, quantized with a bitsandbytes ``mode`` while loading.

    Args:
        path: a Hugging Face model folder with ``config.json`` and safetensors weights (one file or shards with
            their index; bf16, fp16 or fp32 on disk).
        mode: any bitsandbytes mode (``"nf4-dq"``...), or None for a plain model in ``dtype``.
        task: ``causal-lm`` or ``sequence-classification``.
        dtype: the dtype of everything not quantized (and the 4-bit layers' compute dtype).
        device: where the model lives (default: CUDA when available, else CPU).
        ignore_modules: Linear layers kept in float; default: the output head (``lm_head`` / the classifier).
        on_block_loaded: called with each transformer block as soon as all its tensors are loaded: e.g.
            ``fabric_quant.distributed.fsdp.shard_on_load(mesh)``, so that a rank never holds the whole model.
        on_model_built: called with the model on the meta device (its Linear layers replaced) before any tensor
            loads, e.g. ``fabric_quant.distributed.vocab_parallel.vocab_parallel_``; a module with a ``load_rows_``
            method (there, the vocabulary-parallel embedding) then takes its own part of each tensor it owns.
        config_kwargs: config overrides, e.g. ``num_labels``, ``id2label``, ``label2id``.
    The result equals quantizing the model loaded whole in ``dtype`` (``quantize_(model, mode, dtype=dtype,
    ignore_modules=...)``: same codes, same outputs; ``quantize_`` keeps a tied head float too, so with tied
    embeddings the head need not be named); tied weights are tied, buffers computed at construction (rotary
    tables) are kept, and weights missing from the checkpoint (a new classification head) are initialised as
    transformers does, with a warning naming them.
    """
    from fabric_quant.bnb import BnbConfig

    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported. Valid choices: {', '.join(TASKS)}")
    path, dtype = Path(path), parse_dtype(dtype, what="dtype")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a Hugging Face model folder (no config.json)")
    files = checkpoint_files(path)
    if mode is not None:
        BnbConfig.create(mode, dtype)  # validated before any work
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _meta_model(path, task, dtype, mode, ignore_modules, config_kwargs)
    if on_model_built is not None:
        on_model_built(model)
    names = set(model.state_dict())
    computed = {name for name, _ in model.named_buffers()} - names  # non-persistent buffers
    prefix = getattr(model, "base_model_prefix", "")
    unexpected = []
    total = sum(_count(file) for file in files) if progress else None
    bar = tqdm(total=total, desc=f"load {path.name}" + (f" as {mode}" if mode else ""), unit="tensor",
               disable=not progress, leave=False)  # fmt: skip
    pending = _groups(model, names) if on_block_loaded is not None else {}
    for key, tensor in iter_checkpoint(path):
        bar.update(1)
        name = _model_key(key, names, prefix)
        if name is None:
            if _model_key(key, computed, prefix) is None:  # not a table the model builds itself (old position_ids)
                unexpected.append(key)
            continue
        _place(model, name, tensor, dtype, device, f"{path}: {key}")
        _complete(pending, name, on_block_loaded)
    bar.close()
    model.tie_weights()
    _initialise_missing(model, device, dtype, path)
    if unexpected:
        warnings.warn(f"{path}: {len(unexpected)} checkpoint tensors the model does not use: {unexpected[:5]}",
                      stacklevel=2)  # fmt: skip
    model.to(device).eval()  # the buffers built on the host; quantized layers are already there
    cast_float_rest(model, dtype)
    release_freed_memory()
    return model


def _meta_model(path: Path, task: str, dtype: torch.dtype, mode: str | None, ignore_modules, config_kwargs: dict):
    """The model for ``task`` built on the meta device (buffers such as rotary tables computed), its Linear layers
    replaced by ``mode``'s, still empty; a quantized head tied to the input embedding is refused."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from fabric_quant.bnb import BnbConfig, replace_linear_layers

    config = AutoConfig.from_pretrained(path, **config_kwargs)
    auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) computed
        model = auto.from_config(config, dtype=dtype)
    if mode is not None:
        ignore = output_heads(model, task) if ignore_modules is None else ignore_modules
        replace_linear_layers(model, BnbConfig.create(mode, dtype, ignore))
        head = model.get_output_embeddings()
        if getattr(config, "tie_word_embeddings", False) and isinstance(head, QuantizedLinear):
            raise ValueError(f"{path}: the output head shares the input embedding's weight (tie_word_embeddings);"
                             " it cannot be quantized on its own: keep it in ignore_modules")  # fmt: skip
    return model


def _place(model: torch.nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device,
           where: str) -> None:  # fmt: skip
    """One checkpoint tensor into the model at ``name``: quantized, as this rank's rows, or as a copy."""
    from accelerate.utils import set_module_tensor_to_device

    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if hasattr(module, "load_rows_") and attr == "weight":
        module.load_rows_(tensor)  # this rank's rows only: the rest of the mapped tensor is never read
    elif isinstance(module, QuantizedLinear) and attr == "weight":
        module.quantize_(tensor.to(dtype), device)  # rounded to dtype first: equal to quantizing the loaded model
        if not module.statistics_finite():  # checked on the block statistics: cheaper than every weight
            raise ValueError(f"{where} holds non-finite values (NaN/inf): refusing to quantize it")
        release_freed_memory()  # the float temporaries of this layer, before the next one
    else:
        # a copy the model owns: a tensor viewing the memory-mapped file would keep the whole mapped file
        # (every page the quantization read) resident for as long as the model lives
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        value = value.clone() if value.data_ptr() == tensor.data_ptr() else value
        set_module_tensor_to_device(model, name, device, value=value)


def _groups(model: torch.nn.Module, names: set[str]) -> dict[int, tuple[torch.nn.Module, set[str]]]:
    """For ``on_block_loaded``: each transformer block with the state names it still waits for."""
    owners = {id(m): n for n, m in model.named_modules()}
    groups = {}
    for block in transformer_blocks(model):
        prefix = f"{owners[id(block)]}."
        groups[id(block)] = (block, {n for n in names if n.startswith(prefix)})
    return groups


def _complete(pending: dict, name: str, callback) -> None:
    for key, (block, wanted) in list(pending.items()):
        if name in wanted:
            wanted.discard(name)
            if not wanted:
                del pending[key]
                callback(block)
            return


def _count(file: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return len(list(f.keys()))


def _model_key(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for a checkpoint key: the same, or with the base model's prefix added or removed (a
    classification model loads the weights of its bare encoder, and the other way round)."""
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in names:
        return key[len(prefix) + 1 :]
    return None


def _initialise_missing(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, path: Path) -> None:
    """Weights the checkpoint did not have (after tying) are still on meta: create and initialise them as
    transformers does, and say which (a new classification head is expected; anything else is worth a look)."""
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if not missing:
        return
    owners = {name.rpartition(".")[0] for name in missing}
    for owner in sorted(owners):
        module = model.get_submodule(owner)
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{path}: the checkpoint has no weight for the quantized layer {owner}")
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            model._init_weights(module)
        for p in module.parameters(recurse=False):
            p.data = p.data.to(dtype)
    warnings.warn(f"{path}: newly initialised (not in the checkpoint): {missing}", stacklevel=3)

"""From fine-tuning to a fast CPU model in one call: :func:`export_woq` turns a QLoRA result (the merged folder, or
the base folder plus the PEFT adapter) into a weight-only quantized folder, and :func:`load_woq` reloads it.

The float model never exists whole: a transformers model is built on the meta device and its tensors stream in
one at a time (from the merged folder's safetensors, or from :func:`fabric_quant.finetune.model.merged_tensors`,
which merges LoRA into the *dequantized* base the adapter was trained against); each selected Linear weight is
quantized as it arrives and its float tensor dropped. Peak memory: the quantized model (plus, for an adapter, the
4-bit base it is merged from) and about one float layer.

The folder: ``model.safetensors`` (the quantized state, per-tensor checksums, the layer modes), ``config.json``,
the tokenizer files, ``generation_config.json`` when the source has one, and ``woq.json`` (mode, options, dtype,
where it came from). It is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from fabric_quant.checkpoint import load_tensors, read_metadata, save_dir_atomically, save_quantized
from fabric_quant.hf import output_heads
from fabric_quant.modules import set_module
from fabric_quant.nn.base import quantized_layers
from fabric_quant.nn.woq import WOQLinear
from fabric_quant.woq import WOQConfig, _int8_embedding, quantize_woq, refuse_gptq, woq_targets

WOQ_FILE = "woq.json"
FORMAT = "fabric_quant.woq/1"
WEIGHTS = "model.safetensors"


def is_woq_folder(path: str | Path) -> bool:
    """True for a folder written by :func:`export_woq`."""
    return (Path(path) / WOQ_FILE).is_file()


def export_woq(
    source: str | Path,
    out_dir: str | Path,
    mode: str = "woq-int4",
    *,
    adapter: str | Path | None = None,
    base_mode: str | None = "auto",
    dtype: torch.dtype | str = torch.bfloat16,
    progress: bool = True,
    **options: Any,
) -> Path:
    """Write a weight-only quantized causal LM folder that :func:`load_woq` reloads in one call.

    Args:
        source: a Hugging Face causal-LM folder (safetensors): the QLoRA recipe's ``final/merged``, or the base
            model the adapter was trained on.
        out_dir: the folder to write (replaced atomically if it exists).
        mode: ``woq-int4`` or ``woq-int8``.
        adapter: a PEFT LoRA adapter folder (e.g. ``final/adapter``) to merge into ``source`` first.
        base_mode: the mode the base was quantized with during fine-tuning (the adapter is merged into that
            dequantized base, the weights it was trained against): a bitsandbytes mode, None for a float base, or
            ``auto`` to read ``quantize`` from the QLoRA run's ``config.yaml`` (two folders above the adapter).
        dtype: dtype of what stays float (embeddings, norms, the head) and of the activations.
        options: the mode's options (:class:`fabric_quant.woq.WOQConfig`): ``group_size``, ``scale_search``,
            ``include_embeddings``, ``include_lm_head``, ``ignore_modules``.
    """
    from transformers import AutoConfig, AutoTokenizer

    config = WOQConfig.create(mode, **options, dtype=dtype)  # validated before any work
    refuse_gptq(config, "export_woq")
    source, out_dir = Path(source), Path(out_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"source={str(source)!r} is not a Hugging Face model folder (no config.json)")
    if adapter is not None:
        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"adapter={str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json)")
    tokenizer_dir = next((d for d in (adapter, source) if d is not None and (d / "tokenizer_config.json").is_file()),
                         None)  # fmt: skip
    if tokenizer_dir is None:
        where = str(source) if adapter is None else f"{source} or {adapter}"
        raise FileNotFoundError(f"no tokenizer files (tokenizer_config.json) in {where}: the exported folder needs"
                                " them (the QLoRA recipe writes them into final/merged and final/adapter)")  # fmt: skip
    if adapter is not None:
        base_ignore = None
        if base_mode == "auto":
            base_mode, base_ignore = _training_setup(adapter)
        peft_model = _adapter_model(source, adapter, base_mode, base_ignore, config.dtype, progress)
        hf_config = peft_model.get_base_model().config
        tensors = _merged(peft_model, config.dtype)
    else:
        hf_config = AutoConfig.from_pretrained(source)
        tensors = _checkpoint_tensors(source, config.dtype)
    model = build_woq(hf_config, config, tensors)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    record = {"format": FORMAT, "mode": config.mode, "options": config.options(), "source": str(source),
              "adapter": None if adapter is None else str(adapter),
              "base_mode": base_mode if adapter is not None else None}  # fmt: skip

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_quantized(model, tmp / WEIGHTS, {"woq": json.dumps(record)})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (source / "generation_config.json").is_file():
            shutil.copy(source / "generation_config.json", tmp / "generation_config.json")
        (tmp / WOQ_FILE).write_text(json.dumps(record, indent=1))

    return save_dir_atomically(out_dir, write)


def load_woq(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model of a folder written by :func:`export_woq`, on ``device``, in eval mode (tensors verified against
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
        new = _int8_embedding(module, None)
    set_module(model, name, new)


def _with_cpu_bias(linear: torch.nn.Linear) -> torch.nn.Linear:
    if linear.bias is not None and linear.bias.device.type == "meta":
        linear.bias = None  # the real one comes later; WOQLinear.from_float must not copy a meta tensor
    return linear


def _check_complete(model: torch.nn.Module, what) -> None:
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"{what} has no values for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _checkpoint_tensors(source: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from fabric_quant.loading import iter_checkpoint

    for key, tensor in iter_checkpoint(source):
        yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _merged(peft_model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from fabric_quant.finetune.model import merged_tensors

    with torch.no_grad():
        yield from merged_tensors(peft_model, dtype)


def _adapter_model(source: Path, adapter: Path, base_mode: str | None, base_ignore, dtype: torch.dtype,
                   progress: bool):  # fmt: skip
    from peft import PeftModel

    from fabric_quant.loading import from_pretrained

    for path in adapter.glob("*.safetensors"):
        load_tensors(path, require_checksums=False)  # checksums written by this package are verified
    base = from_pretrained(source, base_mode, dtype=dtype, device="cpu", ignore_modules=base_ignore, progress=progress)
    return PeftModel.from_pretrained(base, adapter).eval()


def _training_setup(adapter: Path) -> tuple[str | None, list[str] | None]:
    """The ``quantize`` and ``model.ignore_modules`` of the QLoRA run that wrote ``adapter``
    (``<out_dir>/final/adapter``): the base must be quantized as it was in training."""
    import yaml

    run_config = adapter.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ValueError(f"base_mode='auto' reads the QLoRA run's config.yaml, but {run_config} does not exist: pass"
                         " base_mode= (the mode the base was quantized with during fine-tuning, e.g. 'nf4-dq', or"
                         " None for a float base)")  # fmt: skip
    run = yaml.safe_load(run_config.read_text())
    return run.get("quantize"), (run.get("model") or {}).get("ignore_modules")

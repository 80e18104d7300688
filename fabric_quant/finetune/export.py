"""From fine-tuning to a fast CPU model in one call: :func:`export_woq` turns a QLoRA result (the merged folder, or
the base folder plus the PEFT adapter) into a weight-only quantized folder (:mod:`fabric_quant.woq.folder`), which
``fq.load_woq`` reloads.

The float model never exists whole: a transformers model is built on the meta device and its tensors stream in
one at a time (from the merged folder's safetensors, or from :func:`fabric_quant.finetune.model.merged_tensors`,
which merges LoRA into the *dequantized* base the adapter was trained against); each selected Linear weight is
quantized as it arrives and its float tensor dropped. Peak memory: the quantized model (plus, for an adapter, the
4-bit base it is merged from) and about one float layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fabric_quant.checkpoint import load_tensors
from fabric_quant.finetune.model import merged_tensors
from fabric_quant.loading import from_pretrained, iter_checkpoint
from fabric_quant.woq.folder import build_woq, save_woq
from fabric_quant.woq.modes import WOQConfig, refuse_gptq


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
    """Write a weight-only quantized causal LM folder that :func:`fabric_quant.woq.folder.load_woq` reloads in one call.

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
    record = {"mode": config.mode, "options": config.options(), "source": str(source),
              "adapter": None if adapter is None else str(adapter),
              "base_mode": base_mode if adapter is not None else None}  # fmt: skip
    extra = [f for f in [source / "generation_config.json"] if f.is_file()]
    return save_woq(out_dir, model, tokenizer, record, extra)




def _checkpoint_tensors(source: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in iter_checkpoint(source):
        yield key, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _merged(peft_model, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    with torch.no_grad():
        yield from merged_tensors(peft_model, dtype)


def _adapter_model(source: Path, adapter: Path, base_mode: str | None, base_ignore, dtype: torch.dtype,
                   progress: bool):  # fmt: skip
    from peft import PeftModel

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

"""The weight-only family: ``woq-int8`` (symmetric int8 per output channel) and ``woq-int4`` (asymmetric int4 in
groups of 32 / 64 / 128 / 256) Linear layers with float activations, on ATen's weight-only kernels
(:mod:`fabric_quant.nn.woq`). The LLM decoding regime: at batch 1 a layer's time is the time to read its weight.

:func:`quantize_woq` is the library function (``fabric_quant.quantize_(model, "woq-int4")`` calls it);
``fabric_quant.plugins.woq.WOQPrecision`` applies it inside Lightning. The output head (a causal LM's ``lm_head``)
and the input embeddings stay float unless asked for, as in the other families: the head is the layer whose error
reaches the logits unaveraged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fabric_quant.calibration import call_model
from fabric_quant.hf import output_heads
from fabric_quant.modules import (
    cast_float_rest,
    check_finite,
    check_ignore_modules,
    is_ignored,
    refuse_requantization,
    set_module,
)
from fabric_quant.nn.int8 import Int8Config, Int8Embedding
from fabric_quant.nn.woq import GROUP_SIZES, SCALE_SEARCHES, WOQLinear
from fabric_quant.numerics import gptq
from fabric_quant.options import check_flags, parse_dtype
from fabric_quant.registry import mode_spec, register_mode

FAMILY = "woq"
EMBEDDING_MODE = "woq-int8-embedding"
"""The ``fq_mode`` of an embedding table quantized by this family (int8 rows, one scale each)."""
OPTIONS = ("group_size", "scale_search", "include_embeddings", "include_lm_head", "ignore_modules", "dtype")


@dataclass(frozen=True)
class WOQConfig:
    """A weight-only mode with its options, validated.

    Args:
        mode: ``woq-int8`` or ``woq-int4``.
        group_size: int4: input elements per (scale, zero) pair, one of 32, 64, 128, 256 (default 128); int8 has
            one scale per output channel and takes none.
        scale_search: int4: ``none`` (min / max per group), ``mse`` (per group, the range-shrink ratio with the
            lowest reconstruction error; slower to quantize) or ``gptq`` (codes chosen against the layers' inputs,
            :mod:`fabric_quant.numerics.gptq`; needs ``calibration_data=`` batches of model inputs in
            :func:`quantize_woq`).
        include_embeddings: also store the input embedding tables as int8 rows (one scale per row).
        include_lm_head: also quantize the output head (``model.get_output_embeddings()``), kept float by default.
        ignore_modules: name prefixes of submodules kept in float.
        dtype: dtype of everything left in float (None: as it is).
    """

    mode: str
    bits: int
    group_size: int | None = None
    scale_search: str = "none"
    include_embeddings: bool = False
    include_lm_head: bool = False
    ignore_modules: frozenset[str] = frozenset()
    dtype: torch.dtype | None = None

    @classmethod
    def create(cls, mode: str, **options: Any) -> WOQConfig:
        mode = mode_spec(mode, family=FAMILY).name
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise TypeError(f"mode {mode!r} got unknown option(s) {unknown}. Valid options: {', '.join(OPTIONS)}")
        bits = mode_spec(mode).options["bits"]
        group_size, scale_search = options.get("group_size"), options.get("scale_search", "none")
        if bits == 4:
            group_size = 128 if group_size is None else group_size
            if group_size not in GROUP_SIZES:
                raise ValueError(
                    f"group_size={group_size!r} is not supported by {mode!r}. Valid choices: {GROUP_SIZES}"
                )
        elif group_size is not None:
            raise ValueError(
                f"{mode!r} has one scale per output channel: group_size={group_size!r} applies to woq-int4"
            )
        if scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search={scale_search!r} is not supported. Valid choices: {SCALE_SEARCHES}")
        if bits == 8 and scale_search != "none":
            raise ValueError(f"scale_search={scale_search!r} applies to woq-int4; {mode!r} uses the absmax scale")
        flags = {k: options.get(k, False) for k in ("include_embeddings", "include_lm_head")}
        check_flags(**flags)
        ignore = options.get("ignore_modules")
        if isinstance(ignore, str):
            raise TypeError(f"ignore_modules must be a collection of name prefixes, got the string {ignore!r}")
        dtype = options.get("dtype")
        dtype = None if dtype is None else parse_dtype(dtype, what=f"dtype for mode {mode!r}")
        return cls(mode, bits, group_size, scale_search, **flags, ignore_modules=frozenset(ignore or ()), dtype=dtype)

    def options(self) -> dict[str, Any]:
        """The options as JSON-friendly values (what an exported folder records)."""
        return {"group_size": self.group_size, "scale_search": self.scale_search,
                "include_embeddings": self.include_embeddings, "include_lm_head": self.include_lm_head,
                "ignore_modules": sorted(self.ignore_modules),
                "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch.")}  # fmt: skip


def woq_targets(model: torch.nn.Module, config: WOQConfig) -> tuple[list[str], list[str]]:
    """Names of the Linear layers and the Embedding tables ``config`` quantizes."""
    ignore = set(check_ignore_modules(model, config.ignore_modules))
    if not config.include_lm_head:
        ignore |= set(output_heads(model))
    linears, embeddings = [], []
    for name, child in model.named_modules():
        if not name or is_ignored(name, ignore):
            continue
        if type(child) is torch.nn.Linear:
            linears.append(name)
        elif type(child) is torch.nn.Embedding and config.include_embeddings:
            embeddings.append(name)
    return linears, embeddings


def quantize_woq(
    model: torch.nn.Module, mode: str = "woq-int4", *, device: torch.device | str | None = None, **options: Any
) -> torch.nn.Module:
    """Quantize ``model`` in place with a weight-only mode and return it: every ``torch.nn.Linear`` (outside
    ``ignore_modules``, the output head unless ``include_lm_head``) becomes a :class:`~fabric_quant.nn.woq.WOQLinear`
    on ``device`` (default: where its weight is), one layer at a time (each float weight is released once its
    layer is replaced). Layers on the meta device become empty shells of the right shape for a later
    ``load_state_dict(..., assign=True)``. Options: see :class:`WOQConfig`. A model already in ``mode`` is
    returned as it is; one in another mode is an error."""
    calibration_data = options.pop("calibration_data", None)
    progress = options.pop("progress", False)
    config = WOQConfig.create(mode, **options)
    batches = _check_calibration(config, calibration_data)
    if refuse_requantization(model, mode, allowed={mode, EMBEDDING_MODE}):
        return model
    linears, embeddings = woq_targets(model, config)
    if not linears:
        raise TypeError(
            f"mode {mode!r} quantizes torch.nn.Linear layers, but {type(model).__name__} has none to quantize"
        )
    check_finite(model, [*linears, *embeddings])  # before any change: a refusal leaves the model as it was
    hessians: dict[str, torch.Tensor] = {}
    passes = [linears]
    if batches is not None:
        passes = gptq.hessian_passes({n: model.get_submodule(n).in_features for n in linears})
    for names in passes:
        if batches is not None:  # the inputs of this pass's layers, the earlier passes' layers already quantized
            hessians = gptq.collect_hessians(model, names, batches, call_model, progress)
        for name in names:
            hessian = hessians.pop(name, None)  # released once its layer is quantized
            linear = model.get_submodule(name)
            set_module(model, name, WOQLinear.from_float(linear, config.bits, config.group_size, config.scale_search,
                                                         device, hessian))  # fmt: skip
    for name in embeddings:
        set_module(model, name, int8_embedding(model.get_submodule(name), device))
    if config.dtype is not None:
        cast_float_rest(model, config.dtype)
    return model


def refuse_gptq(config: WOQConfig, where: str) -> None:
    """``where`` (a plugin, the export) quantizes without running the model: GPTQ's calibration cannot happen there."""
    if config.scale_search == "gptq":
        valid = [s for s in SCALE_SEARCHES if s != "gptq"]
        raise ValueError(
            f"{where}: scale_search='gptq' runs calibration batches through the model, which {where} does not do."
            " Quantize the model with fq.quantize_(model, 'woq-int4', scale_search='gptq', calibration_data=...)"
            f" and save it with fq.save_quantized; valid scale_search here: {valid}"
        )


def _check_calibration(config: WOQConfig, calibration_data) -> list | None:
    """The calibration batches as a list (GPTQ may run them more than once), or None; refused where unused."""
    if config.scale_search != "gptq":
        if calibration_data is not None:
            raise ValueError(f"calibration_data is only used by scale_search='gptq' (got {config.scale_search!r})")
        return None
    if calibration_data is None:
        raise ValueError("scale_search='gptq' needs calibration_data: batches of model inputs (tensors, tuples or"
                         " dicts such as a tokenizer's output)")  # fmt: skip
    batches = list(calibration_data)
    if not batches:
        raise ValueError("calibration_data is empty: scale_search='gptq' needs at least one batch of inputs")
    return batches


def int8_embedding(emb: torch.nn.Embedding, device: torch.device | str | None) -> Int8Embedding:
    new = Int8Embedding.from_float(emb, Int8Config(bits=8, activations="none"))
    new.fq_mode = EMBEDDING_MODE
    new.out_dtype = emb.weight.dtype  # lookups return what the float table returned
    return new if device is None else new.to(device)


_PLUGIN = "fabric_quant.plugins.woq:WOQPrecision"
register_mode("woq-int8", family=FAMILY, quantize=quantize_woq, plugin=_PLUGIN, options={"bits": 8},
              description="weight-only int8 per output channel, float activations (oneDNN int8 GEMM)")  # fmt: skip
register_mode("woq-int4", family=FAMILY, quantize=quantize_woq, plugin=_PLUGIN, options={"bits": 4},
              description="weight-only int4, groups of 32-256 (default 128), GPTQ option, float act.")  # fmt: skip

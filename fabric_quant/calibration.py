"""The batch convention of everything that runs a model on calibration data (static PTQ's observers, GPTQ's
Hessians, the advisor's timings, the recipes): a batch is the model's input, as a tensor, a tuple or a mapping."""

from __future__ import annotations

import torch


def call_model(model: torch.nn.Module, batch):
    """A batch is the model's input: a tensor (``model(x)``), a tuple/list (``model(*batch)``) or a mapping
    (``model(**batch)``, e.g. a tokenizer's output)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


def check_finite_batch(batch, index: int) -> None:
    """Refuse a batch holding NaN or inf: one such value spoils every range an observer records from it."""
    tensors = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else [batch]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"calibration batch {index} holds non-finite values (NaN/inf): observers cannot use it")

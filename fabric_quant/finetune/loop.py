"""The small classification training loop the QAT and benchmark recipes share (the QLoRA recipe has its own, with
gradient accumulation, checkpoints and evaluation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm


def fit_classifier(
    fabric,
    model: torch.nn.Module,
    batches: Callable[[int], Iterable[tuple[Any, torch.Tensor]]],
    epochs: int,
    lr: float,
    *,
    call: Callable[[torch.nn.Module, Any], torch.Tensor],
    on_step: Callable[[int], None] | None = None,
    desc: str = "train",
) -> torch.nn.Module:
    """AdamW on the trainable parameters, cross-entropy on ``call(model, inputs)``, ``epochs`` passes over
    ``batches(epoch)``; ``on_step(step)`` runs before each step's forward (e.g. a QAT schedule). ``model`` is
    already set up by ``fabric``; returns it."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(params, lr=lr))
    step = 0
    bar = tqdm(desc=desc, unit="step", disable=fabric.global_rank != 0, leave=False)
    for epoch in range(epochs):
        model.train()
        for inputs, target in batches(epoch):
            if on_step is not None:
                on_step(step)
            loss = torch.nn.functional.cross_entropy(call(model, inputs), target)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return model

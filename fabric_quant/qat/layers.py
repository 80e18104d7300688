"""Fake-quantized Linear / Conv layers for QAT: the forward rounds weights (and activations) to the integer grid
and computes in float; gradients pass through the rounding with the straight-through estimator."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from fabric_quant.nn.int8 import ACTIVATIONS, Int8Config
from fabric_quant.numerics.fold import bn_scale, fold_bn
from fabric_quant.numerics.observers import OBSERVERS, make_observer
from fabric_quant.numerics.quant import (
    VALID_BITS,
    absmax_scale,
    fake_quant,
    fake_quant_per_token,
    fake_quant_weight,
    group_view,
    qrange,
)
from fabric_quant.options import check_flags


@dataclass(frozen=True)
class QATConfig:
    weight_bits: int = 8
    """4 or 8: symmetric integer weights."""
    group_size: int | None = None
    """None: one scale per output channel; else one scale per group of this many input elements."""
    per_channel: bool = True
    """False: one weight scale for the whole tensor (coarser; what older int8 backends took)."""
    activations: Literal["dynamic", "static", "none"] = "dynamic"
    """int8 activations: `dynamic` (a scale per token, computed on the fly), `static` (an observer calibrates one
    scale per layer input), or `none` (weight-only)."""
    observer: Literal["minmax", "moving_average", "percentile", "mse"] = "moving_average"
    """Observer of static activations."""
    learnable_scales: bool = False
    """LSQ: learn the weight scales and the static activation scale by gradient descent."""

    def __post_init__(self) -> None:
        check_flags(per_channel=self.per_channel, learnable_scales=self.learnable_scales)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)):
            raise TypeError(f"group_size={self.group_size!r} must be a positive integer or None")
        if self.weight_bits not in VALID_BITS:
            raise ValueError(f"weight_bits={self.weight_bits!r} is not supported. Valid choices: {VALID_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations={self.activations!r} is not supported. Valid choices: {ACTIVATIONS}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is not supported. Valid choices: {tuple(OBSERVERS)}")
        if not self.per_channel and self.group_size is not None:
            raise ValueError(f"per_channel=False (one scale per tensor) excludes group_size={self.group_size}")
        if self.learnable_scales and self.activations == "dynamic":
            raise ValueError(
                "learnable_scales=True needs activations='static' or 'none': dynamic activations compute their scale"
                " from each batch, so there is no activation range to learn"
            )

    def int8_config(self) -> Int8Config:
        """What the converted (real int8 / int4) layer stores: the weight grid and the activation treatment."""
        return Int8Config(self.weight_bits, self.group_size, self.per_channel, self.activations)


class FakeQuantLayer:
    """State and helpers shared by the QAT layers (mixed into Linear / Conv / Embedding modules)."""

    qat: QATConfig

    def _init_qat(self, config: QATConfig, weight: torch.Tensor) -> None:
        group_view(weight, config.group_size, config.per_channel)  # checks the group size divides the input dim
        self.qat = config
        self.fake_quant_enabled = True
        self.act_observer = make_observer(config.observer) if config.activations == "static" else None
        if config.learnable_scales:
            rows = group_view(weight.detach(), config.group_size, config.per_channel)
            self.weight_scale = torch.nn.Parameter(absmax_scale(rows, config.weight_bits).to(weight.dtype))
            self.act_scale = torch.nn.Parameter(torch.tensor(0.0)) if self.act_observer is not None else None

    def _fq_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return weight
        bits, group = self.qat.weight_bits, self.qat.group_size
        if not self.qat.learnable_scales:
            return fake_quant_weight(weight, bits, group, self.qat.per_channel)
        qmin, qmax = qrange(bits, symmetric=True)
        rows = group_view(weight, group, self.qat.per_channel)
        zero = torch.zeros_like(self.weight_scale)
        grad_factor = 1.0 / math.sqrt(rows.shape[1] * qmax)  # LSQ's step-size gradient scale
        out = torch._fake_quantize_learnable_per_channel_affine(
            rows, self.weight_scale, zero, 0, qmin, qmax, grad_factor
        )
        return out.reshape(weight.shape)

    def _fq_input(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.qat.activations
        if mode == "none":
            return x
        if mode == "static":
            self.act_observer(x)  # observes also before fake quantization starts: warm-up calibration
        if not self.fake_quant_enabled:
            return x
        if mode == "dynamic":
            return fake_quant_per_token(x)
        qmin, qmax = 0, 255
        scale, zero_point = self.act_observer.qparams()
        if not self.qat.learnable_scales:
            return fake_quant(x, scale, zero_point, qmin, qmax)
        if self.act_scale.item() == 0.0:  # LSQ scale starts from the calibrated range
            with torch.no_grad():
                self.act_scale.copy_(scale.reshape(()))
        grad_factor = 1.0 / math.sqrt(x.numel() * qmax)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.act_scale.reshape(1), zero_point.float().reshape(1), qmin, qmax, grad_factor
        )


class QATEmbedding(torch.nn.Embedding, FakeQuantLayer):
    """Embedding with fake-quantized rows (the lookup input is an index: no activation quantization)."""

    @classmethod
    def from_float(cls, emb: torch.nn.Embedding, config: QATConfig) -> QATEmbedding:
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QAT of an Embedding with max_norm or sparse gradients is not supported")
        new = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        new.weight = emb.weight
        new._init_qat(dataclasses.replace(config, activations="none", learnable_scales=False), emb.weight)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(x, self._fq_weight(self.weight), self.padding_idx)


class QATLinear(torch.nn.Linear, FakeQuantLayer):
    @classmethod
    def from_float(cls, linear: torch.nn.Linear, config: QATConfig, relu: bool = False) -> QATLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: optimizers keep working
        new._init_qat(config, linear.weight)
        new.relu = relu
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(self._fq_input(x), self._fq_weight(self.weight), self.bias)
        return torch.relu(out) if self.relu else out


def _conv_from_float(cls, conv, config: QATConfig):
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # fmt: skip
    new.weight, new.bias = conv.weight, conv.bias
    new._init_qat(config, conv.weight)
    return new


class QATConv1d(torch.nn.Conv1d, FakeQuantLayer):
    from_float = classmethod(_conv_from_float)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._fq_input(x), self._fq_weight(self.weight), self.bias)


class QATConv2d(torch.nn.Conv2d, FakeQuantLayer):
    from_float = classmethod(_conv_from_float)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._fq_input(x), self._fq_weight(self.weight), self.bias)


class QATConvBn2d(QATConv2d):
    """Conv2d + BatchNorm2d (+ ReLU) trained with the BatchNorm folded into the fake-quantized weight, so the model
    deploys as one quantized convolution. Until `freeze_bn()`, BatchNorm normalises with batch statistics and
    updates its running ones; afterwards it uses the running statistics, i.e. exactly the folded convolution."""

    @classmethod
    def from_float(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool, config: QATConfig):
        new = _conv_from_float(cls, conv, config)
        new.bn, new.relu, new.bn_frozen = bn, relu, False
        return new

    def freeze_bn(self) -> None:
        self.bn_frozen = True
        self.bn.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.train(mode and not self.bn_frozen)
        return self

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed (BatchNorm-folded) weight and bias, from the running statistics."""
        return fold_bn(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = bn_scale(self.bn).reshape(-1, 1, 1, 1)
        out = self._conv_forward(self._fq_input(x), self._fq_weight(self.weight * scale), None)
        out = out / scale.reshape(1, -1, 1, 1)  # undo the scale: BatchNorm below applies the real statistics
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1, 1)
        out = self.bn(out)
        return torch.relu(out) if self.relu else out

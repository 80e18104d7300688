"""Observers: track the range of the tensors they see, to calibrate static activation scales."""

from __future__ import annotations

import torch

from fabric_quant.numerics.quant import scale_zero_point


class MinMaxObserver(torch.nn.Module):
    """Running minimum and maximum over everything observed (per tensor)."""

    def __init__(self, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.enabled = True

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            lo, hi = x.detach().float().aminmax()
            self._update(lo, hi)
        return x

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.min_val)) and bool(torch.isfinite(self.max_val))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} has seen no data: run calibration batches first")
        return scale_zero_point(self.min_val, self.max_val, self.bits, self.symmetric)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (robust to outlier batches during QAT)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, averaging_constant: float = 0.01) -> None:
        super().__init__(bits, symmetric)
        if not 0 < averaging_constant <= 1:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.averaging_constant = averaging_constant

    def _update(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not self.calibrated:  # the first batch initialises the averages
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            return
        c = self.averaging_constant
        self.min_val.mul_(1 - c).add_(c * lo)
        self.max_val.mul_(1 - c).add_(c * hi)


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver}


def make_observer(name: str, bits: int = 8, symmetric: bool = False) -> MinMaxObserver:
    if name not in OBSERVERS:
        raise ValueError(f"Unknown observer {name!r}. Valid choices: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits=bits, symmetric=symmetric)

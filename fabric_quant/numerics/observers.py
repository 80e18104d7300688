"""Observers: track the range of the tensors they see, to calibrate static activation scales."""

from __future__ import annotations

import torch

from fabric_quant.numerics.quant import qrange, scale_zero_point


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

    def _check_calibrated(self) -> None:
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} has seen no data: run calibration batches first")

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_calibrated()
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


class _SampleObserver(MinMaxObserver):
    """Keeps a bounded random sample of the observed values (besides min/max) to choose a clipping range."""

    max_samples = 1 << 20

    def __init__(self, bits: int = 8, symmetric: bool = False) -> None:
        super().__init__(bits, symmetric)
        self.samples: list[torch.Tensor] = []
        self.seen = 0

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            super().forward(x)
            flat = x.detach().float().reshape(-1)
            keep = max(1, self.max_samples // 64)  # per batch: enough for the tails, bounded memory
            if flat.numel() > keep:
                gen = torch.Generator(device=flat.device).manual_seed(self.seen)
                flat = flat[torch.randint(flat.numel(), (keep,), generator=gen, device=flat.device)]
            self.samples.append(flat.cpu())
            self.seen += 1
            if sum(t.numel() for t in self.samples) > self.max_samples:
                self.samples = [torch.cat(self.samples)[-self.max_samples :]]
        return x

    def _sample(self) -> torch.Tensor:
        self._check_calibrated()
        return torch.cat(self.samples)


class PercentileObserver(_SampleObserver):
    """Range from the 0.01 % and 99.99 % quantiles of the sample: clips rare outliers (TensorRT-style)."""

    def __init__(self, bits: int = 8, symmetric: bool = False, percentile: float = 99.99) -> None:
        super().__init__(bits, symmetric)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self._sample()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(sample, q)
        return scale_zero_point(lo, hi, self.bits, self.symmetric)


class MSEObserver(_SampleObserver):
    """Range that minimises the quantization mean squared error of the sample, searched over 100 clipping ratios of
    the observed min/max (the histogram observer's L2 criterion, on a sample)."""

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self._sample()
        qmin, qmax = qrange(self.bits, self.symmetric)
        best, best_err = None, float("inf")
        for ratio in torch.linspace(0.2, 1.0, 100).tolist():
            scale, zero_point = scale_zero_point(self.min_val * ratio, self.max_val * ratio, self.bits, self.symmetric)
            err = (torch.fake_quantize_per_tensor_affine(sample, scale, zero_point, qmin, qmax) - sample).pow(2).mean()
            if err < best_err:
                best, best_err = (scale, zero_point), float(err)
        return best


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, bits: int = 8, symmetric: bool = False) -> MinMaxObserver:
    if name not in OBSERVERS:
        raise ValueError(f"Unknown observer {name!r}. Valid choices: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits=bits, symmetric=symmetric)

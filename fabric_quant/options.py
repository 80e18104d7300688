"""Validation of user options shared by every family and recipe: compute dtypes (with device-appropriate
defaults), boolean flags and numeric ranges. Each error names the option, the value and what is valid."""

from __future__ import annotations

import math

import torch

_ALIASES = {
    "float32": torch.float32, "fp32": torch.float32, "32": torch.float32, "32-true": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "16": torch.float16, "16-true": torch.float16,
}  # fmt: skip
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def parse_dtype(value: torch.dtype | str, *, what: str = "dtype") -> torch.dtype:
    """Accept a ``torch.dtype`` or a name such as ``"bf16"``; anything else raises ``ValueError``."""
    dtype = _ALIASES.get(value.removeprefix("torch.")) if isinstance(value, str) else value
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d) for d in COMPUTE_DTYPES)
        raise ValueError(f"Unsupported {what} {value!r}. Valid choices: {names} (or the names {sorted(_ALIASES)})")
    return dtype


def cpu_supports_bf16() -> bool:
    # oneDNN reports whether the CPU has native bf16 (AVX512-BF16 / AMX); without it bf16 matmuls are emulated.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_compute_dtype() -> torch.dtype:
    """bf16 where the hardware runs it natively, else fp16 on CUDA and fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def check_flags(**flags: object) -> None:
    """Boolean options must be booleans: a CLI's 'false' is a truthy string, so it is refused, not guessed."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}={value!r} must be True or False")


def check_range(name: str, value, low: float, high: float | None = None, *, integer: bool = True, none: bool = False,
                low_open: bool = False) -> None:
    """``value`` must be a number in [low, high] (``low_open``: (low, high]), an integer where ``integer``, or
    None where ``none``; the error names the option, the value and the valid range."""
    if value is None and none:
        return
    kind = "an integer" if integer else "a number"
    valid = f"{kind} {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
    valid += " (or null)" if none else ""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    if not ok or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is out of range: valid values are {valid}")

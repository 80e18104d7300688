"""Compute-dtype parsing and device-appropriate defaults."""

from __future__ import annotations

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

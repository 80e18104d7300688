"""What this CPU's int8 kernels can do, decided once per process from the ISA flags (no timing at import).

Why it matters: oneDNN's int8 GEMM (``torch.ops.onednn.qlinear_pointwise``) has a fast kernel for signed int8
activations only where the CPU has AMX. On AVX512-VNNI (AMD EPYC Zen 4, Intel before Sapphire Rapids) and AVX2 it
runs its reference loop (``ref_int8`` in ``ONEDNN_VERBOSE``): 88 ms for one 1 x 1024 @ 1024 x 4096 product against
0.10 ms with unsigned activations, measured on AMD EPYC Zen 4 (1 thread). VNNI multiplies u8 x s8, so there the
signed codes are shifted into uint8 with zero point 128: ``q + 128`` with ``zp = 128`` gives the same int32 sums
to the bit (oneDNN subtracts ``zp * rowsum(W)``), so every CPU computes the same numbers.

``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps what oneDNN may use; torch's own AMX probe ignores it, so the
cap is read here too.
"""

from __future__ import annotations

import functools
import os
import platform

import torch


def cpu_features() -> dict[str, bool]:
    """The CPU's int8-relevant features, as torch sees them (not capped by ``ONEDNN_MAX_CPU_ISA``)."""
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "vnni": "_is_vnni_supported",
              "amx": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}  # fmt: skip
    return {name: bool(getattr(torch.cpu, fn, lambda: False)()) for name, fn in probes.items()}


def onednn_isa_cap() -> str | None:
    """The ISA cap oneDNN runs under (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``), upper case; None: no cap."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.upper() if cap else None


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


_NO_VNNI_CAPS = ("SSE41", "AVX", "AVX2", "AVX512_CORE")
"""oneDNN ISA caps below VNNI. There its int8 kernels multiply with ``vpmaddubsw``, whose int16 pair sums saturate
(255 * 127 * 2 > 32767): wrong numbers, not only slow ones. Measured under ``ONEDNN_MAX_CPU_ISA=AVX2`` on AMD EPYC
Zen 4: ``torch._int_mm`` (oneDNN's s8s8s32 gemm) off by up to 1.1e5 on exact sums of 1e6; the u8 qlinear 0.13 off on
outputs of 0.6. CPUs without VNNI (AMD Zen 2/3, Intel before Cascade Lake) therefore run no int8 GEMM at all."""


@functools.cache
def int8_gemm() -> str:
    """The int8 x int8 GEMM this CPU runs exactly and fast, decided from its ISA and oneDNN's cap:

    - ``onednn-s8``: oneDNN's int8 GEMM on signed activations (AMX);
    - ``onednn-u8``: the same GEMM on activations shifted to uint8 with zero point 128 (AVX512-VNNI: its signed
      kernel is a reference loop there);
    - ``float``: no exact int8 GEMM (no VNNI: :data:`_NO_VNNI_CAPS`); layers compute in float on the dequantized
      weight, with the same activation rounding (the same numbers up to float rounding).
    """
    cap = onednn_isa_cap()
    uncapped = cap is None or cap in ("ALL", "DEFAULT")
    features = cpu_features()
    if features["amx"] and (uncapped or "AMX" in cap):
        return "onednn-s8"
    if features["vnni"] and (uncapped or cap not in _NO_VNNI_CAPS):
        return "onednn-u8"
    return "float"


def signed_activations() -> bool:
    """Whether oneDNN's int8 GEMM takes signed int8 activations at speed here (AMX, not capped away). With VNNI
    the codes go in as uint8 with zero point 128 (:func:`kernel_codes`); without, no int8 GEMM runs."""
    return int8_gemm() == "onednn-s8"


def activation_encoding() -> tuple[str, str]:
    """``("s8" | "u8+128" | "float", why)``: how int8 activations enter the int8 GEMM on this CPU, and why."""
    kind, cap = int8_gemm(), onednn_isa_cap()
    capped = f" (ONEDNN_MAX_CPU_ISA={cap})" if cap else ""
    if kind == "onednn-s8":
        return "s8", "AMX: oneDNN's signed int8 GEMM runs its AMX kernel" + capped
    if kind == "onednn-u8":
        return "u8+128", "VNNI, no AMX" + capped + ": oneDNN's s8 x s8 GEMM is a reference loop, u8 x s8 is fast"
    return "float", "no VNNI" + capped + ": oneDNN's int8 kernels (torch._int_mm too) saturate int16 sums"


def kernel_codes(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Signed int8 codes ``q`` (a fresh tensor: shifted in place) as oneDNN's GEMM wants them here, and their zero
    point: ``(q, 0)`` with AMX, else ``(q + 128 as uint8, 128)`` (flipping the sign bit is adding 128 mod 256)."""
    if signed_activations():
        return q, 0
    return q.view(torch.uint8).bitwise_xor_(0x80), 128

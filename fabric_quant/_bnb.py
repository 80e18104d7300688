"""Lazy, quiet import of bitsandbytes (an optional backend: importing the package must not need it)."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType


def quiet_bitsandbytes_logs() -> None:
    """Filter two bitsandbytes log lines that are not user errors; every other bitsandbytes message still shows.

    Installed when this module is imported (fabric_quant imports it first), because transformers, peft or the
    package itself may import bitsandbytes, which logs the first one while it imports.
    """
    # The optional `kernels` package (a hub download) is missing: bitsandbytes then uses its own CPU kernel.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    # LLM.int8() quantizes activations from fp16 by design; bitsandbytes logs this on every call.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(
        lambda record: "to float16 during quantization" not in record.getMessage()
    )


quiet_bitsandbytes_logs()


@functools.lru_cache(maxsize=1)
def import_bitsandbytes() -> ModuleType:
    try:
        os.environ.setdefault("BITSANDBYTES_NOWELCOME", "1")
        import bitsandbytes
    except ImportError as err:
        raise ModuleNotFoundError(
            "fabric_quant's bitsandbytes modes need `bitsandbytes>=0.48` (it has a CPU backend):"
            " pip install bitsandbytes"
        ) from err
    return bitsandbytes

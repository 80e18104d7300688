"""The weight-only family: the ``woq-int8`` / ``woq-int4`` modes (``modes.py``: :class:`WOQConfig`,
:func:`quantize_woq`) and the folder format a weight-only causal LM is saved in (``folder.py``: build, save, load,
detect). Importing it registers the modes."""

from fabric_quant.woq.folder import build_woq, is_woq_folder, load_woq, save_woq
from fabric_quant.woq.modes import EMBEDDING_MODE, WOQConfig, quantize_woq, refuse_gptq, woq_targets

__all__ = [
    "EMBEDDING_MODE",
    "WOQConfig",
    "build_woq",
    "is_woq_folder",
    "load_woq",
    "quantize_woq",
    "refuse_gptq",
    "save_woq",
    "woq_targets",
]

"""Lightning precision plugins: thin adapters over the library functions, each accepted by both
``lightning.fabric.Fabric(plugins=...)`` and ``lightning.pytorch.Trainer(plugins=...)``."""

from fabric_quant.plugins.bnb import BnbPrecision, bnb_plugin
from fabric_quant.plugins.ptq import PTQPrecision
from fabric_quant.plugins.qat import QATPrecision
from fabric_quant.plugins.woq import WOQPrecision

__all__ = ["BnbPrecision", "PTQPrecision", "QATPrecision", "WOQPrecision", "bnb_plugin"]

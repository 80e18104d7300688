"""Fabric precision plugins; importing this package registers every mode in the registry."""

from fabric_quant.plugins.bnb import BnbPrecision
from fabric_quant.plugins.ptq import PTQPrecision
from fabric_quant.plugins.qat import QATPrecision

__all__ = ["BnbPrecision", "PTQPrecision", "QATPrecision"]

"""Fabric precision plugins; importing this package registers every mode in the registry."""

from fabric_quant.plugins.bnb import BnbPrecision

__all__ = ["BnbPrecision"]

"""Adapter methods. Importing this package registers the built-in ones."""

from . import bottleneck, ia3, lora, mtl_lora, prefix, prompt, reft, union  # noqa: F401
from .base import AdapterConfig, Method, method_for, preset, preset_names, register_method, register_preset

__all__ = [
    "AdapterConfig",
    "Method",
    "method_for",
    "preset",
    "preset_names",
    "register_method",
    "register_preset",
]

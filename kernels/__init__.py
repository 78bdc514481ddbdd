"""Fused Triton kernels for adapters (installed as ``fxadapt.kernels``).

Public API (documented in ``docs/kernels.md``):

* :func:`bottleneck` — ``y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu)``
* :func:`lora_linear` — ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``
* :func:`bottleneck_multi`, :func:`lora_multi` — one adapter per row (or per sequence) from a weight bank
* :func:`can_use_triton` — ``(ok, reason)``: would the Triton kernels serve this call?
* :func:`backend` / :func:`force_triton` — choose the backend (also env ``FXADAPT_KERNELS``)
* :mod:`reference` — the plain-PyTorch math of every op

Every op is a ``torch.library.custom_op`` in the ``fxadapt`` namespace that dispatches internally (Triton on CUDA,
reference elsewhere). Importing this package does not import Triton.
"""

from . import reference
from ._common import ACTIVATIONS, BACKENDS, MAX_RANK, backend, backend_mode, can_use_triton, force_triton
from .bottleneck import bottleneck
from .lora import lora_linear
from .multi import bottleneck_multi, lora_multi

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "MAX_RANK",
    "backend",
    "backend_mode",
    "bottleneck",
    "bottleneck_multi",
    "can_use_triton",
    "force_triton",
    "lora_linear",
    "lora_multi",
    "reference",
]

"""Fused Triton kernels for adapters (installed as ``fxadapt.kernels``).

Public API (documented in ``docs/kernels.md``):

* :func:`bottleneck` — ``y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu)``
* :func:`lora_linear` — ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``
* :func:`bottleneck_multi`, :func:`lora_multi` — one adapter per row (or per sequence) from a weight bank
* :func:`validate_ids` — exact adapter-id range check (for ids made on the host)
* :func:`can_use_triton` — ``(ok, reason)``: would the Triton kernels serve this call?
* :func:`backend` / :func:`force_triton` — choose the backend (also env ``FXADAPT_KERNELS``)
* :mod:`reference` — the plain-PyTorch math of every op

Every op is a ``torch.library.custom_op`` in the ``fxadapt`` namespace that dispatches internally (Triton on CUDA,
reference elsewhere). Importing this package does not import Triton.
"""

import sys as _sys

if __name__ != "fxadapt.kernels":  # pragma: no cover - only with the repository root on sys.path
    # Imported as a top-level ``kernels``: transformers imports its hub ``kernels`` package by that name (a
    # dependency of transformers >= 5.25). Where that package is installed, load it in this module's place; else
    # be fxadapt.kernels itself rather than a second copy that would register the ops twice and split the backend.
    import importlib as _importlib
    import importlib.machinery as _machinery
    import importlib.util as _util
    from pathlib import Path as _Path

    _root = (
        _Path(__file__).resolve().parent.parent
    )  # the repository root, where this directory shadows the hub's
    _spec = _machinery.PathFinder.find_spec(
        __name__, [p for p in _sys.path if _Path(p or ".").resolve() != _root]
    )
    if (
        _spec is not None
        and _spec.loader is not None
        and _spec.origin
        and _Path(_spec.origin).resolve() != _Path(__file__).resolve()
    ):
        _hub = _util.module_from_spec(_spec)
        _sys.modules[__name__] = _hub
        _spec.loader.exec_module(_hub)
    else:
        _sys.modules[__name__] = _importlib.import_module("fxadapt.kernels")
else:
    from . import reference
    from ._common import (
        ACTIVATIONS,
        BACKENDS,
        MAX_RANK,
        backend,
        backend_mode,
        can_use_triton,
        force_triton,
        validate_ids,
    )
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
    "validate_ids",
]

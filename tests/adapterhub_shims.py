"""Stand-ins that let AdapterHub ``adapters`` 1.3.0 run features whose dependency the peer venv cannot load.

AdapterHub's drop path (``BnConfig(stochastic_depth=p)``, AdapterPlus) builds ``torchvision.ops.StochasticDepth(p,
"row")``. The only torchvision wheels on this machine are CUDA builds that do not load against the CPU torch, so
:func:`torchvision_stochastic_depth` registers a ``torchvision.ops.stochastic_depth`` module holding a transcription
of torchvision 0.28's ``stochastic_depth`` (the same checks, the same single ``bernoulli_`` draw of shape
``[batch, 1, ...]`` from the global generator, the same division) and makes AdapterHub believe torchvision is there.
It is written from torchvision's source, not from fxadapt's code, so comparing the two stays a real check.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    if p < 0.0 or p > 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ["batch", "row"]:
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _stochastic_depth(input, self.p, self.mode, self.training)


@contextmanager
def torchvision_stochastic_depth() -> Iterator[None]:
    """While active, ``adapters`` can build drop-path adapters."""
    import adapters.methods.modeling as modeling

    names = ("torchvision", "torchvision.ops", "torchvision.ops.stochastic_depth")
    saved = {n: sys.modules.get(n) for n in names}
    modules = {n: types.ModuleType(n) for n in names}
    modules["torchvision.ops.stochastic_depth"].StochasticDepth = StochasticDepth
    modules["torchvision.ops"].stochastic_depth = modules["torchvision.ops.stochastic_depth"]
    modules["torchvision"].ops = modules["torchvision.ops"]
    available = modeling.is_torchvision_available
    sys.modules.update(modules)
    modeling.is_torchvision_available = lambda: True
    try:
        yield
    finally:
        modeling.is_torchvision_available = available
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m

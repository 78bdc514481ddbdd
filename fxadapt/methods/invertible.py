"""Invertible adapters (MAD-X, Pfeiffer et al., 2020): a NICE coupling block on the embedding output, and its
inverse on the input of the output embeddings, as AdapterHub's ``inv_adapter`` (``BottleneckConfig(inv_adapter=
"nice")``; presets ``seq_bn_inv``, ``double_seq_bn_inv``).

With the hidden vector split ``x = [x₁ | x₂]`` (``x₁``: the first ``d // 2`` features) and two small MLPs
``F: x₂ → x₁``, ``G: x₁ → x₂`` (``Linear(d_in, d_in // r) → act → Linear(d_in // r, d_out)``, ``r =
inv_adapter_reduction_factor``, ``act`` the adapter's ``non_linearity``):

    forward:   y₁ = x₁ + F(x₂);   y₂ = x₂ + G(y₁)
    inverse:   x₂ = y₂ − G(y₁);   x₁ = y₁ − F(x₂)

Where AdapterHub applies them: the forward on the output of the module that feeds the first layer (BERT's
``embeddings``, GPT-2's ``drop``, LLaMA's ``embed_tokens``; fxadapt's ``embed`` site), the inverse right before the
output embeddings (the vocabulary projection of an LM head). Only the *first* adapter of the active setup counts
(AdapterHub's ``invertible_adapters_forward``). Both are model parts applied by hooks (``methods/base.py``): the
block is kept as ``embed_inv`` in the first layer's container.

AdapterHub's other block type, ``"glow"``, is refused: its GLOW coupling block (1.3.0) slices the sequence axis and
returns a list, so it runs on no ``[batch, sequence, hidden]`` input and defines nothing to reproduce.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

__all__ = ["INV_PART", "NICECouplingBlock", "invertible_hooks"]

INV_PART = "embed.inv"
INV_TYPES = ("nice",)


def _subnet(d_in: int, d_out: int, non_linearity: str, reduction_factor: float) -> nn.Sequential:
    from .bottleneck import activation

    width = int(d_in // reduction_factor)
    return nn.Sequential(nn.Linear(d_in, width), activation(non_linearity), nn.Linear(width, d_out))


class NICECouplingBlock(nn.Module):
    """The NICE coupling block (AdapterHub's parameter names ``F.0``, ``F.2``, ``G.0``, ``G.2``)."""

    def __init__(self, hidden: int, non_linearity: str, reduction_factor: float):
        super().__init__()
        self.split1 = hidden // 2
        split2 = hidden - self.split1
        self.F = _subnet(split2, self.split1, non_linearity, reduction_factor)
        self.G = _subnet(self.split1, split2, non_linearity, reduction_factor)
        with torch.no_grad():  # AdapterHub's init_bert_weights
            for lin in (self.F[0], self.F[2], self.G[0], self.G[2]):
                lin.weight.normal_(mean=0.0, std=0.02)
                lin.bias.zero_()

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., : self.split1], x[..., self.split1 :]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


def _first_active(model: nn.Module) -> NICECouplingBlock | None:
    """The invertible block of the active setup's first adapter (None: it has none)."""
    from ..model import get_state
    from ..parts import active_parts

    state = get_state(model)
    if state is None or state.active is None:
        return None
    first = state.active.first()
    return next((m for name, m in active_parts(model, INV_PART) if name == first), None)


def _forward_hook(model: nn.Module, module: nn.Module, args: Any, output: Any) -> Any:
    block = _first_active(model)
    if block is None:
        return None
    if isinstance(output, torch.Tensor):
        return block(output)
    return (block(output[0]), *output[1:])


def _inverse_hook(model: nn.Module, module: nn.Module, args: tuple) -> Any:
    block = _first_active(model)
    if block is None or not args or not isinstance(args[0], torch.Tensor):
        return None
    return (block(args[0], rev=True), *args[1:])


class _Handles:
    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def invertible_hooks(embed: nn.Module, output_embeddings: nn.Module | None):
    """``install(model)`` for the forward hook on ``embed`` and the inverse on ``output_embeddings``."""

    def install(model: nn.Module) -> _Handles:
        handles = [embed.register_forward_hook(functools.partial(_forward_hook, model))]
        if output_embeddings is not None:
            handles.append(
                output_embeddings.register_forward_pre_hook(functools.partial(_inverse_hook, model))
            )
        return _Handles(handles)

    return install

"""A layer may call a module object that is not one of its registered submodules: transformers >= 5.25 keeps its
hub-kernel function wrappers (``apply_rotary_pos_emb`` in the LLaMA family) as per-instance modules in a
``__dict__``. Tracing cannot make such a call a ``call_module`` node; its code is traced inline instead."""

from __future__ import annotations

import copy

import torch

import fxadapt
from fxadapt.install import layer_state
from fxadapt.model import layers_of


class _Rotate(torch.nn.Module):  # no parameters, like a kernel-function wrapper
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)
        self.__dict__["rotate"] = _Rotate()  # reachable, but not a submodule

    def forward(self, x):
        return x + self.out(self.__dict__["rotate"](self.inner(x)))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_unregistered_module_is_traced_inline():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    model = _Net().eval()
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(sites=("linear:out",))}, example_inputs=(x,))
    assert all(layer_state(layer).traced for layer in layers_of(model)[1])  # captured, not left eager
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # LoRA starts at zero: the base model's output, bit for bit
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        assert not torch.equal(model(x), base(x))  # and the adapter is in the code that runs

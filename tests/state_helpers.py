"""Helpers proving that a failed call changed nothing: model (weights, buffers, classes, adapters, setup, heads,
outputs) and files on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import main_output

import fxadapt


class ModelSnapshot:
    """Everything about a model a failed call must leave as it was."""

    def __init__(self, model, inputs=None):
        self.model = model
        self.inputs = inputs
        self.state = {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()}
        self.names = [n for n, _ in model.named_modules()]
        self.classes = [type(m) for m in model.modules()]
        self.adapters = dict(fxadapt.list_adapters(model))
        self.setup = fxadapt.active_setup(model)
        self.requires_grad = [p.requires_grad for p in model.parameters()]
        heads = model._modules.get("heads")
        self.heads = {n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in (heads or {}).items()}
        self.active_head = model.__dict__.get("active_head")
        self.training = model.training
        self.output = self._run() if inputs is not None else None

    def _run(self):
        with torch.no_grad():
            return main_output(self.model(**self.inputs)).clone()

    def assert_unchanged(self):
        model = self.model
        state = model.state_dict()
        assert list(state) == list(self.state), "state_dict keys changed"
        changed = [k for k, v in self.state.items() if not torch.equal(state[k], v)]
        assert not changed, f"weights or buffers changed: {changed[:5]}"
        assert [n for n, _ in model.named_modules()] == self.names, "submodules changed"
        assert [type(m) for m in model.modules()] == self.classes, "module classes changed"
        assert fxadapt.list_adapters(model) == self.adapters
        assert fxadapt.active_setup(model) == self.setup
        assert [p.requires_grad for p in model.parameters()] == self.requires_grad
        heads = model._modules.get("heads")
        now = {n: {k: v.clone() for k, v in h.state_dict().items()} for n, h in (heads or {}).items()}
        assert now.keys() == self.heads.keys(), "heads changed"
        for n, tensors in self.heads.items():
            assert all(torch.equal(now[n][k], v) for k, v in tensors.items()), f"head {n!r} changed"
        assert model.__dict__.get("active_head") == self.active_head
        assert model.training == self.training
        if self.output is not None:
            assert torch.equal(self._run(), self.output), "outputs changed"


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

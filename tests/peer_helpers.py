"""Helpers shared by the side-by-side tests with AdapterHub (``tests/peer/``, run in .venv-peer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def train_adapterhub(
    model: Any,
    inputs: dict,
    name: str,
    *,
    steps: int = 3,
    lr: float = 0.5,
    extra: Callable[[str], bool] = lambda n: False,
    out: Callable[[Any], torch.Tensor] = lambda o: o[0],
    seed: int = 7,
    noise: float = 0.2,
) -> Any:
    """Perturb adapter ``name``'s weights (and those ``extra`` selects), then a few SGD steps with a high learning
    rate on random targets in ``adapters``' own training mode, so that every weight ends non-trivial."""
    gen = torch.Generator().manual_seed(seed)

    def ours(n: str) -> bool:
        return f".{name}." in f".{n}" or extra(n)

    with torch.no_grad():
        for n, p in model.named_parameters():
            # an orthogonal parametrization's "original" holds a factored form: noise there breaks it (the
            # weight collapses to 0); training moves it through the parametrization instead
            if ours(n) and p.is_floating_point() and "parametrizations" not in n:
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    model.train_adapter(name)
    for n, p in model.named_parameters():
        if extra(n):
            p.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr)
    for _ in range(steps):
        result = out(model(**inputs))
        loss = (result - torch.randn(result.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.set_active_adapters(name)
    return model.eval()


def two_classifiers(model: Any, adapter_key: str) -> None:
    """Adapters ``a`` and ``b`` (``seq_bn``) with classification heads of 3 and 2 labels, on a model with
    AdapterHub's API (its ``BertAdapterModel`` or ``fxadapt.compat.AdapterModel``); adapters and heads perturbed
    (seed 2). ``adapter_key``: the part of an adapter parameter's name (``.adapters.`` / ``.fxadapt.``)."""
    for name, labels in (("a", 3), ("b", 2)):
        model.add_adapter(name, config="seq_bn")
        model.add_classification_head(name, num_labels=labels)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if adapter_key in n or n.startswith("heads."):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)

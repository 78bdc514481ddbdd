"""Per-row adapter routing: each batch row runs its own adapter (or none) in one forward.

``fxadapt.activate(model, PerRow("a", "b", "c"))`` compiles every site into one batched multi-adapter op
(:func:`fxadapt.kernels.bottleneck_multi`: a fused Triton kernel on CUDA, the PyTorch reference elsewhere); the
rows' adapter indices are passed with the call, ``model(**batch, adapter_ids=ids)`` (``ids[i]`` indexes the
``PerRow`` names, ``-1`` = no adapter), or set around calls that don't take extra keyword arguments (``generate``)::

    with fxadapt.adapter_ids(model, ids):
        model.generate(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .errors import CompositionError

__all__ = ["adapter_ids", "current_ids", "install_routing_hook"]

_IDS: ContextVar[torch.Tensor | None] = ContextVar("fxadapt_adapter_ids", default=None)
_HOOK = "_fxadapt_routing_hook"


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: torch.Tensor | list[int]) -> Iterator[None]:
    """Route the rows of every call inside the block: row ``i`` uses adapter ``ids[i]`` of the active PerRow."""
    token = _IDS.set(torch.as_tensor(ids, dtype=torch.long))
    try:
        yield
    finally:
        _IDS.reset(token)


def current_ids(device: torch.device) -> torch.Tensor:
    """The routing of the current call (read by generated code at PerRow sites)."""
    ids = _IDS.get()
    if ids is None:
        raise CompositionError(
            "a PerRow setup is active, but no adapter_ids were given: call model(..., adapter_ids=ids) or use "
            "`with fxadapt.adapter_ids(model, ids):`"
        )
    return ids.to(device)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    ids = kwargs.pop("adapter_ids", None)
    if ids is not None:
        module.__dict__["_fxadapt_ids_token"] = _IDS.set(torch.as_tensor(ids, dtype=torch.long))
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    token = module.__dict__.pop("_fxadapt_ids_token", None)
    if token is not None:
        _IDS.reset(token)


def install_routing_hook(model: nn.Module) -> None:
    """Let ``model(..., adapter_ids=ids)`` work: the hook takes the argument out before the model sees it."""
    if _HOOK in model.__dict__:
        return
    pre = model.register_forward_pre_hook(_pre_hook, with_kwargs=True, prepend=True)
    post = model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    model.__dict__[_HOOK] = (pre, post)


def remove_routing_hook(model: nn.Module) -> None:
    handles = model.__dict__.pop(_HOOK, None)
    if handles:
        for h in handles:
            h.remove()

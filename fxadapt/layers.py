"""Finding a model's repeating layers and recording the call each one receives."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .graphs import is_norm
from .guards import _CONSTANT_TYPES, _MISSING, flatten_call, unflatten_call

__all__ = ["find_layer_lists", "record_layer_calls"]


def find_layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's repeating layers: ``ModuleList``s of same-class custom blocks, in module order.

    The unit is the innermost list of *blocks*: a list whose elements merely wrap other block lists (ALBERT's
    layer groups, Swin's stages holding blocks) is replaced by those inner lists, when the inner blocks hold
    most of the wrapper's weights and contain norms (which lists of experts or heads do not)."""
    found: list[tuple[str, nn.ModuleList]] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.ModuleList) and _is_layer_list(child):
                if all(_wraps_blocks(element) for element in child):
                    for i, element in enumerate(child):
                        visit(element, f"{path}.{i}")
                else:
                    found.append((path, child))
                continue  # other nested lists inside a layer belong to that layer
            visit(child, path)

    visit(model, "")
    return found


def _is_layer_list(ml: nn.ModuleList) -> bool:
    if len(ml) == 0:
        return False
    cls = type(ml[0])
    # one class, or classes made per instance by a wrapper library (same module and name: AdapterHub's)
    if any(
        type(m) is not cls
        and (type(m).__module__, type(m).__qualname__) != (cls.__module__, cls.__qualname__)
        for m in ml
    ):
        return False
    if cls.__module__.startswith("torch.nn"):  # lists of plain Linear/Conv heads are not transformer layers
        return False
    first = ml[0]
    return any(True for _ in first.children()) and any(True for _ in first.parameters())


def _wraps_blocks(element: nn.Module) -> bool:
    inner = [
        m
        for m in element.modules()
        if m is not element
        and isinstance(m, nn.ModuleList)
        and _is_layer_list(m)
        and all(any(is_norm(x) for x in block.modules()) for block in m)
    ]
    if not inner:
        return False
    total = sum(p.numel() for p in element.parameters())
    ids = {id(p) for m in inner for p in m.parameters()}
    held = sum(p.numel() for p in element.parameters() if id(p) in ids)
    return total > 0 and held * 3 >= total * 2


def record_layer_calls(
    model: nn.Module,
    layers: list[nn.Module],
    run: Callable[[], Any],
    outputs: dict[int, Any] | None = None,
    seed: Callable[[tuple], None] | None = None,
    until: set[int] | None = None,
) -> dict[int, tuple[tuple, dict]]:
    """Run ``run()`` once and return, per layer (by ``id``), the (args, kwargs) of its first call.

    Calls are recorded at the layer's ``forward`` (an instance attribute for the duration), so a parent that
    calls ``layer.forward(...)`` directly (SqueezeBERT) is seen as well as ``layer(...)``. With ``outputs``, the
    first call of each layer runs right after ``seed(args)`` and its output (tensors copied) is stored there:
    the eager reference a capture of that call is verified against, without running the layer again. With
    ``until`` (layer ids), the forward stops once those layers have been called: the rest of it is not needed."""
    calls: dict[int, tuple[tuple, dict]] = {}
    waiting = set(until) if until is not None else None
    saved: list[tuple[nn.Module, Any]] = []
    me = threading.get_ident()

    def recorder(layer: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def forward_and_record(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != me or id(layer) in calls:  # serve: not another thread's call
                return forward(*args, **kwargs)
            calls[id(layer)] = _snapshot(args, dict(kwargs))
            if outputs is not None and seed is not None:
                seed(args)
            out = forward(*args, **kwargs)
            if outputs is not None:
                outputs[id(layer)] = pytree.tree_map_only(torch.Tensor, torch.clone, out)
            if waiting is not None:
                waiting.discard(id(layer))
                if not waiting:
                    raise _Enough
            return out

        return forward_and_record

    with _RECORDING:  # one recording at a time: the recorders are instance attributes, restored in order
        try:
            for layer in layers:
                saved.append((layer, layer.__dict__.get("forward", _MISSING)))
                layer.__dict__["forward"] = recorder(layer, layer.forward)
            with torch.no_grad(), contextlib.suppress(_Enough):
                run()
        finally:
            for layer, previous in reversed(saved):
                if previous is _MISSING:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.__dict__["forward"] = previous
    return calls


_RECORDING = threading.RLock()


class _Enough(BaseException):
    """Raised out of a recording forward once every layer it waits for was called (a BaseException, so that a
    model's own ``except Exception`` lets it pass; never seen by users)."""


def _snapshot(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call as it was made: opaque arguments (a KV cache the rest of the forward keeps filling) are copied
    at call time; tensors and constants are kept as they are."""
    leaves, spec = flatten_call(args, kwargs)
    copied = []
    for value in leaves:
        if not isinstance(value, (torch.Tensor, *_CONSTANT_TYPES)):
            with contextlib.suppress(Exception):  # uncopyable: the later trace sees its final state
                value = copy.deepcopy(value)
        copied.append(value)
    return unflatten_call(copied, spec)

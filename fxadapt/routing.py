"""Per-row adapter routing: each batch row runs its own adapter (or none) in one forward.

``fxadapt.activate(model, PerRow("a", "b", "c"))`` (or ``with fxadapt.using(model, PerRow(...))``) compiles every
site into one batched multi-adapter op — :func:`fxadapt.kernels.bottleneck_multi` for bottleneck adapters, a
grouped gather + ``bmm`` (``lora_multi`` on CUDA) for LoRA, a gathered scale for (IA)^3. The rows' adapter
indices are passed with the call, ``model(**batch, adapter_ids=ids)`` (``ids[i]`` indexes the ``PerRow`` names,
``-1`` = no adapter), or set around calls that don't take extra keyword arguments (``generate``)::

    with fxadapt.adapter_ids(model, ids):
        model.generate(...)

The ids belong to the call's context (thread / asyncio task), never to the model: concurrent calls with different
ids do not see each other's, and a call without ids never reuses an earlier call's. They are checked where they
are given — an integer tensor (floats are refused, not truncated) of values in ``[-1, len(PerRow))`` — and, at the
first layer, against the batch: one id per row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from .calls import HookScope, effective_setup
from .compose import PerRow
from .errors import AdapterIdsError, CompositionError

__all__ = ["adapter_ids", "current_ids", "install_routing_hook", "remove_routing_hook", "sync_routing_hook"]


class _Routing:
    """Validated ids on the CPU, and their copies per device (made once per call, not once per site)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        self._on: dict[torch.device, torch.Tensor] = {ids.device: ids}

    def on(self, device: torch.device) -> torch.Tensor:
        out = self._on.get(device)
        if out is None:
            out = self._on[device] = self.ids.to(device)
        return out


_SCOPED: ContextVar[_Routing | None] = ContextVar("fxadapt_adapter_ids", default=None)
_CALL = HookScope("fxadapt_call_adapter_ids")  # given as model(..., adapter_ids=ids): this call only
_HOOK = "_fxadapt_routing_hook"
_STICKY = "_fxadapt_routing_sticky"


def _validated(model: nn.Module, ids: Any) -> _Routing:
    setup = effective_setup(model)
    if not isinstance(setup, PerRow):
        raise AdapterIdsError(
            f"adapter_ids were given, but the setup of this call is {setup!r}, not a PerRow; activate one first "
            "(fxadapt.activate(model, fxadapt.PerRow('a', 'b')) or `with fxadapt.using(model, PerRow(...))`)"
        )
    names = list(setup.children)
    if isinstance(ids, torch.Tensor):
        tensor = ids.detach()
    else:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise AdapterIdsError(
                f"adapter_ids={ids!r} is not a sequence of integers: {exc}; expected one index into {names} per row "
                "(-1 = no adapter)"
            ) from exc
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise AdapterIdsError(
            f"adapter_ids has dtype {tensor.dtype}; expected an integer tensor (e.g. torch.long) of indices into "
            f"{names}: ids are not rounded or truncated (use ids.long() if they are whole numbers)"
        )
    if tensor.dim() != 1:
        raise AdapterIdsError(
            f"adapter_ids has shape {tuple(tensor.shape)}; expected one id per batch row, shape [batch]"
            + (f" (did you mean ids.reshape(-1), {tensor.numel()} ids?)" if tensor.numel() else "")
        )
    tensor = tensor.to("cpu", torch.long)
    if tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < -1 or high >= len(names):
            bad = low if low < -1 else high
            raise AdapterIdsError(
                f"adapter_ids holds {bad}, outside [-1, {len(names)}): ids index PerRow{tuple(names)} "
                f"(0 = {names[0]!r}, ..., {len(names) - 1} = {names[-1]!r}; -1 = no adapter); the nearest valid "
                f"id is {max(-1, min(bad, len(names) - 1))}"
            )
    return _Routing(tensor)


@contextlib.contextmanager
def adapter_ids(model: nn.Module, ids: torch.Tensor | list[int]) -> Iterator[None]:
    """Route the rows of every call inside the block: row ``i`` uses adapter ``ids[i]`` of the PerRow setup
    (the active one, or that of an enclosing ``fxadapt.using``)."""
    token = _SCOPED.set(_validated(model, ids))
    try:
        yield
    finally:
        _SCOPED.reset(token)


def current_ids(where: torch.device | torch.Tensor) -> torch.Tensor:
    """The routing of the current call (read by generated code at PerRow sites). Given the site's input tensor,
    the ids are also checked against its batch size."""
    routing = _CALL.get() or _SCOPED.get()
    if routing is None:
        raise CompositionError(
            "a PerRow setup is active, but no adapter_ids were given: call model(..., adapter_ids=ids) or use "
            "`with fxadapt.adapter_ids(model, ids):`"
        )
    if isinstance(where, torch.Tensor):
        if where.dim() and where.shape[0] != routing.ids.shape[0]:
            raise AdapterIdsError(
                f"adapter_ids has {routing.ids.shape[0]} entries, but this call's batch has {where.shape[0]} rows; "
                "give one id per row (for beam search or several return sequences, repeat each row's id: "
                "ids.repeat_interleave(k))"
            )
        return routing.on(where.device)
    return routing.on(where)


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    ids = kwargs.pop("adapter_ids", None)
    routing = None
    try:
        if ids is not None:
            routing = _validated(module, ids)
    finally:
        _CALL.enter(routing)  # on every call (None without ids): a call never sees an earlier call's ids
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    _CALL.exit()


def sync_routing_hook(model: nn.Module, state: Any) -> None:
    """Install the routing hook while a PerRow setup may run: the active one is PerRow, or a ``using`` block has
    run one on this model (then the hook stays until the last adapter is removed). Other models have no hook, so
    ``torch.compile`` sees no context variables."""
    if (
        state is not None
        and state.adapters
        and (isinstance(state.active, PerRow) or _STICKY in model.__dict__)
    ):
        install_routing_hook(model)
    else:
        model.__dict__.pop(_STICKY, None)
        remove_routing_hook(model)


def install_routing_hook(model: nn.Module, *, sticky: bool = False) -> None:
    """Let ``model(..., adapter_ids=ids)`` work: the hook takes the argument out before the model sees it."""
    if sticky:
        model.__dict__[_STICKY] = True
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

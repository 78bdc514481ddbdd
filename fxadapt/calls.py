"""Per-call setups: the adapters a call uses, carried by the call's context, never written into the model.

Design note
-----------
``fxadapt.activate(model, setup)`` changes the model: every later call, in every thread, uses the setup. A server
answering requests for different adapters at once needs the setup to belong to the *request* instead::

    with fxadapt.using(model, "sst-2"):          # this thread / asyncio task only
        logits = model(**batch).logits

The setup lives in a :class:`~contextvars.ContextVar` (one value per thread and per asyncio task). Entering
``using`` computes the plan of every layer for that setup (cached per setup, checked like ``activate``) and the
compiled code for it (each layer keeps code per plan in ``LayerState.compiled``); each layer's dispatch then picks
the plan of the current context (:func:`current_plan`) instead of the model's active one. Nothing is mutated, so
any number of threads may call one model with different setups; the active setup is the default where no
``using`` is in effect. The compat ``model(..., adapter_names=...)`` and prompt tuning go through the same
context, as do per-row ids (``routing.py``).

:class:`HookScope` carries a value from a model's forward pre-hook to its post-hook in the same context (a token
kept on the module, as before, is shared by all threads: another thread's post-hook then resets it, which raises
``ValueError: <Token> was created in a different Context`` and leaves a stale value behind).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar, Token
from typing import Any

from torch import nn

from .compose import Block, PerRow, parallel_channels, parse_setup, validate
from .errors import CompositionError

__all__ = ["HookScope", "current_plan", "effective_setup", "using"]

# id(LayerState) -> (plan, compiled code for it) for the layers of models inside a ``using`` block
_PLANS: ContextVar[dict[int, tuple[Any, dict]] | None] = ContextVar("fxadapt_call_plans", default=None)
# id(ModelState) -> setup, for what reads the setup rather than the plans (prompt tuning, per-row ids, heads)
_SETUPS: ContextVar[dict[int, Block | None] | None] = ContextVar("fxadapt_call_setups", default=None)

_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, tuple[Any, dict[int, tuple[Any, dict]]]]] = (
    weakref.WeakKeyDictionary()
)
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 32  # setups remembered per model


# ``using`` blocks open in any thread. While none is, the dispatch never reads the context variable: torch.compile
# cannot trace ``ContextVar.get`` (a graph break), but it can guard on this number.
_OPEN = 0
_OPEN_LOCK = threading.Lock()


def current_plan(lstate: Any) -> tuple[Any, dict]:
    """The plan (and its compiled code) a layer runs in this call: a ``using`` block's, else the active one."""
    if _OPEN:
        plans = _PLANS.get()
        if plans is not None:
            entry = plans.get(id(lstate))
            if entry is not None:
                return entry
    return lstate.active or (lstate.plan, lstate.runners)


def effective_setup(model: nn.Module, state: Any = None) -> Block | None:
    """The setup a call of ``model`` uses in this context: the innermost ``using`` block's, else the active one."""
    if state is None:
        from .model import get_state

        state = get_state(model)
    if state is None:
        return None
    setups = _SETUPS.get() if _OPEN else None
    if setups is not None and id(state) in setups:
        return setups[id(state)]
    return state.active


def _normalise(setup: Any) -> Block | None:
    if setup is None or (isinstance(setup, (list, tuple)) and not setup):
        return None
    return parse_setup(setup)


def _signature(state: Any) -> tuple:
    """What the layers' plans and code depend on besides the setup (a change invalidates cached plans)."""
    from .kernels import backend_mode

    return (
        backend_mode(),  # lowering to fused kernels depends on the kernel backend
        tuple((n, r.merged, id(r.config)) for n, r in state.adapters.items()),
        tuple((n, id(r)) for n, r in state.fusions.items()),
        tuple(state.layer_paths),
    )


def _check(state: Any, setup: Block) -> None:
    """The checks ``activate`` makes (names, nestings, fusion layers present)."""
    from .model import _fuse_blocks

    for name in setup.names():
        state.record(name)  # AdapterNotFoundError with the known names
    validate(setup, state.adapters)
    for fuse in _fuse_blocks(setup):
        if fuse.name not in state.fusions:
            raise CompositionError(
                f"{fuse!r} has no fusion layers; add them with fxadapt.add_fusion(model, {fuse!r}) first"
            )


def _plans_for(model: nn.Module, state: Any, setup: Block | None) -> dict[int, tuple[Any, dict]]:
    from .install import layer_state
    from .model import layers_of, plan_for
    from .tracing import serialized

    signature = _signature(state)
    with _CACHE_LOCK:
        cached = _CACHE.setdefault(model, {}).get(setup)
    if cached is not None and cached[0] == signature:
        return cached[1]
    if setup is not None:
        _check(state, setup)
    view = dataclasses.replace(state, active=setup)
    _, layers = layers_of(model)
    plans: dict[int, tuple[Any, dict]] = {}
    with serialized():  # compiled code is built under the tracing lock, like a lazy build
        for index, layer in enumerate(layers):
            lstate = layer_state(layer)
            if lstate is None:
                continue
            plan = plan_for(view, index)
            runners = lstate.runners_for(plan)
            lstate.warm(layer, plan, runners)  # an invalid setup fails here, on entry
            plans[id(lstate)] = (plan, runners)
    with _CACHE_LOCK:
        per_model = _CACHE.setdefault(model, {})
        if setup not in per_model and len(per_model) >= _CACHE_SIZE:
            per_model.pop(next(iter(per_model)), None)
        per_model[setup] = (signature, plans)
    return plans


@contextlib.contextmanager
def using(model: nn.Module, setup: str | Sequence[Any] | Block | None) -> Iterator[Block | None]:
    """Run the calls inside the block with ``setup`` (a name, a list = ``Stack``, a block, or ``None`` for the base
    model), in this thread / asyncio task only; the model's active setup is not changed.

    Raises what :func:`fxadapt.activate` raises for an invalid setup, on entry.
    """
    from .model import get_state

    wanted = _normalise(setup)
    state = get_state(model)
    if state is None:
        if wanted is not None:
            from .api import _no_adapters

            raise _no_adapters(model)
        yield None
        return
    global _OPEN
    plans = _plans_for(model, state, wanted)
    if isinstance(wanted, PerRow):
        from .routing import install_routing_hook

        install_routing_hook(model, sticky=True)  # model(..., adapter_ids=ids) inside the block
    elif wanted is not None and parallel_channels(wanted) > 1:
        from .parallel_inputs import install_parallel_hooks

        install_parallel_hooks(model, state.layer_paths, sticky=True)  # a decoder's encoder-side inputs
    outer_plans, outer_setups = _PLANS.get() or {}, _SETUPS.get() or {}
    t1 = _PLANS.set({**outer_plans, **plans})
    t2 = _SETUPS.set({**outer_setups, id(state): wanted})
    with _OPEN_LOCK:
        _OPEN += 1
    try:
        yield wanted
    finally:
        with _OPEN_LOCK:
            _OPEN -= 1
        _SETUPS.reset(t2)
        _PLANS.reset(t1)


class HookScope:
    """A value set by a forward pre-hook and reset by the matching forward post-hook, per thread / task.

    Every :meth:`enter` must be matched by one :meth:`exit` (register the post-hook with ``always_call=True``).
    """

    def __init__(self, name: str, default: Any = None):
        self.var: ContextVar[Any] = ContextVar(name, default=default)
        self._tokens: ContextVar[tuple[Token, ...]] = ContextVar(f"{name}_tokens", default=())

    def get(self) -> Any:
        return self.var.get()

    def enter(self, value: Any) -> None:
        self._tokens.set((*self._tokens.get(), self.var.set(value)))

    def exit(self) -> None:
        tokens = self._tokens.get()
        if tokens:
            self._tokens.set(tokens[:-1])
            self.var.reset(tokens[-1])

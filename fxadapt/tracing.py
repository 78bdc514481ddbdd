"""Thread-safe tracing: one capture at a time, and no patch visible to any other thread or left behind.

Design note
-----------
Tracing patches process-wide state. torch.fx's ``Tracer.trace`` replaces ``nn.Module.__call__`` and
``nn.Module.__getattr__``, the ``math`` functions and functions registered with ``torch.fx.wrap``, and sets the
module-global "fx is tracing" flag; fxadapt's ``_TracePatches`` (capture.py) replaces ``torch.tensor`` /
``zeros`` / ... , the Hugging Face attention-interface lookup and TorchScript functions, and ``_shadow_copy``
replaces ``Tensor.__deepcopy__``. Two threads tracing at once interleave those patches (one restores what the
other installed: ``CURRENT_PATCHER is None``, a leaked ``torch.zeros`` wrapper), and a thread that merely runs a
model while another traces calls the patched ``nn.Module.__call__`` and is traced into the wrong graph.

Three rules make that impossible:

- **One capture at a time.** :func:`serialized` holds a re-entrant process-wide lock. Lazy builds (a new guard
  key at run time), ``inject`` and the other mutating verbs, per-call plans and :func:`prepare` take it; a
  thread that needs a capture another thread is making waits for it and then finds it built (the build re-checks
  under the lock). Calls whose code is built never take the lock.
- **Patches are gated to the tracing thread.** Inside :func:`tracing_scope` every patch is installed through
  :func:`gate`: the installed function runs the patch only in the thread that traces and the original everywhere
  else. fx's own patches go through the same gate: the scope substitutes a :class:`_GatedPatcher` for fx's
  ``_Patcher`` for the duration, and keeps fx's global tracing flag down (its readers, ``torch.compile``'s
  frame evaluation and nested tensors, run in every thread).
- **Nothing survives the scope.** On exit, whether the trace succeeded or raised, every attribute the scope knows
  (``nn.Module.__call__``/``__getattr__``, the torch factories, ``math``, ``Tensor.__deepcopy__``, the attention
  interface, fx's patcher and flag) is compared with what it was on entry and restored if it differs.

:func:`prepare` runs a server's expected call variants once, ahead of time, so that no request pays for a capture.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx._symbolic_trace as fx_trace
from torch import nn

__all__ = ["gate", "prepare", "serialized", "traced", "tracing_scope", "unpatched"]

logger = logging.getLogger("fxadapt")

_LOCK = threading.RLock()
_OWNER: int | None = None  # the thread inside tracing_scope (one at a time: the lock)
_DEPTH = 0
_EVALUATING = 0  # >0 while the tracing thread runs real ops (tracer: shadow values): gated patches step aside


@contextmanager
def serialized() -> Iterator[None]:
    """Hold fxadapt's tracing lock (re-entrant) for the enclosed block."""
    with _LOCK:
        yield


def _tracing_here() -> bool:
    return _OWNER is not None and threading.get_ident() == _OWNER


def gate(patched: Callable[..., Any], original: Any) -> Callable[..., Any]:
    """A function running ``patched`` in the tracing thread and ``original`` in every other thread."""
    if original is None or not callable(original):
        return patched

    @functools.wraps(original)
    def gated(*args: Any, **kwargs: Any) -> Any:
        if _OWNER is not None and not _EVALUATING and threading.get_ident() == _OWNER:
            return patched(*args, **kwargs)
        return original(*args, **kwargs)

    gated.__fxadapt_gated__ = (patched, original)  # type: ignore[attr-defined]
    return gated


class _GatedPatcher(fx_trace._Patcher):
    """fx's patcher, installing every patch through :func:`gate` (used while :func:`tracing_scope` is open).

    fx creates it inside ``Tracer.trace`` right after raising its module-global "tracing" flag: the flag is put
    down again here, for every thread (its readers, ``torch.compile``'s frame evaluation and nested tensors, would
    otherwise change what other threads run)."""

    def __init__(self) -> None:
        super().__init__()
        if _tracing_here():
            fx_trace._is_fx_tracing_flag = False

    def patch(
        self, frame_dict: dict[str, Any], name: str, new_fn: Callable[..., Any], deduplicate: bool = True
    ):  # type: ignore[override]
        import builtins

        current = frame_dict.get(name, getattr(builtins, name, None))
        if getattr(current, "__fx_already_patched", False):
            return super().patch(frame_dict, name, new_fn, deduplicate)  # fx returns early: already patched
        super().patch(frame_dict, name, gate(new_fn, current), deduplicate)

    def patch_method(self, cls: type, name: str, new_fn: Callable[..., Any], deduplicate: bool = True):  # type: ignore[override]
        current = getattr(cls, name)
        if getattr(current, "__fx_already_patched", False):
            return super().patch_method(cls, name, new_fn, deduplicate)
        super().patch_method(cls, name, gate(new_fn, current), deduplicate)


@contextmanager
def unpatched() -> Iterator[None]:
    """Run the enclosed block with fx's patches out of the way, in the tracing thread: by switching the gates
    when every patch in place is gated (no class or module attribute is written: rewriting ``nn.Module.__call__``
    invalidates the type caches of every module class, ~0.2 ms a time), else by fx's own revert and reapply."""
    global _EVALUATING
    patcher = fx_trace.CURRENT_PATCHER
    if patcher is not None and not _all_gated(patcher):
        with fx_trace._maybe_revert_all_patches():
            yield
        return
    _EVALUATING += 1
    try:
        yield
    finally:
        _EVALUATING -= 1


def _all_gated(patcher: Any) -> bool:
    """Whether every patch ``patcher`` made so far is gated (memoised on it by patch count: asked per traced op)."""
    made = patcher.patches_made
    memo = patcher.__dict__.get("_fxadapt_all_gated")
    if memo is None or memo[0] != len(made):
        memo = patcher._fxadapt_all_gated = (
            len(made),
            all(hasattr(p.new_fn, "__fxadapt_gated__") for p in made),
        )
    return memo[1]


def _attention_classes() -> list[type]:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover
        return []
    return [type(ALL_ATTENTION_FUNCTIONS)]


_FACTORIES = ("tensor", "as_tensor", "full", "zeros", "ones", "empty")


def _watched() -> list[tuple[Any, str, bool]]:
    """(owner, attribute, in its __dict__?) of everything a trace may patch that the scope checks on exit."""
    out: list[tuple[Any, str, bool]] = [
        (nn.Module, "__call__", True),
        (nn.Module, "__getattr__", True),
        (torch.Tensor, "__deepcopy__", True),
        (fx_trace, "_Patcher", True),
        (fx_trace, "_is_fx_tracing_flag", True),
        (fx_trace, "CURRENT_PATCHER", True),
    ]
    out += [(torch, name, True) for name in _FACTORIES]
    out += [(math, name, True) for name, value in vars(math).items() if callable(value)]
    for cls in _attention_classes():
        out += [(cls, name, name in vars(cls)) for name in ("get_interface", "__getitem__")]
    return out


def _snapshot() -> list[tuple[Any, str, Any]]:
    missing = object()
    return [(owner, name, vars(owner).get(name, missing)) for owner, name, _ in _watched()] + [
        (None, "", missing)
    ]


def _restore(snapshot: list[tuple[Any, str, Any]]) -> list[str]:
    missing = snapshot[-1][2]
    fixed = []
    for owner, name, value in snapshot[:-1]:
        now = vars(owner).get(name, missing)
        if now is value:
            continue
        fixed.append(f"{getattr(owner, '__name__', owner)}.{name}")
        if value is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, value)
    return fixed


@contextmanager
def tracing_scope() -> Iterator[None]:
    """Hold the tracing lock and make this thread the only one that sees tracing patches (module docstring).

    Re-entrant. On the outermost exit everything tracing may patch is as it was on entry.
    """
    global _OWNER, _DEPTH
    with _LOCK:
        if _DEPTH:
            _DEPTH += 1
            try:
                yield
            finally:
                _DEPTH -= 1
            return
        snapshot = _snapshot()
        patcher = fx_trace._Patcher
        _OWNER, _DEPTH = threading.get_ident(), 1
        fx_trace._Patcher = _GatedPatcher  # type: ignore[misc]
        try:
            yield
        finally:
            _DEPTH = 0
            _OWNER = None
            fx_trace._Patcher = patcher  # type: ignore[misc]
            fixed = _restore(snapshot)
            if fixed:
                logger.warning("fxadapt: restored %s left patched by an interrupted trace", ", ".join(fixed))


def traced(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: run ``fn`` inside :func:`tracing_scope`."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with tracing_scope():
            return fn(*args, **kwargs)

    return run


# ------------------------------------------------------------------------------------------------------------
# prepare


def _batch_size(inputs: Any) -> int | None:
    values = (
        inputs.values()
        if isinstance(inputs, dict)
        else inputs
        if isinstance(inputs, (list, tuple))
        else [inputs]
    )
    return next((v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.dim()), None)


def _track(items: list[Any], desc: str) -> Iterable[Any]:
    try:
        from .progress import track  # the progress bars of fxadapt.progress, where present
    except ImportError:
        return items
    return track(items, desc=desc, total=len(items))


def prepare(
    model: nn.Module,
    example_inputs: Sequence[Any],
    *,
    setups: Sequence[Any] | None = None,
) -> dict[str, int]:
    """Capture and compile, ahead of time, the kinds of call a server will make, so no request pays for tracing.

    Args:
        model: a model with fxadapt adapters.
        example_inputs: one small batch per kind of call (a dict of model kwargs, a tuple of positional args, or a
            tensor): padded and unpadded, with and without ``token_type_ids``, train or eval mode as it is now, ...
            Sizes do not matter (captures are size-generic); structure, dtypes and flags do.
        setups: the setups the calls will use (``fxadapt.using``); default: the active one. ``PerRow`` setups run
            with every row on the first adapter unless the inputs carry ``adapter_ids``.

    Returns ``{"captures": new captures made, "calls": example calls run}``. Buffers (BatchNorm statistics) and the
    random number generators are left as they were.
    """
    from .calls import using
    from .compose import PerRow
    from .errors import ConfigError
    from .install import layer_state
    from .model import _call, get_state, layers_of
    from .rollback import preserved_buffers
    from .routing import adapter_ids

    state = get_state(model)
    if state is None:
        from .api import _no_adapters

        raise _no_adapters(model)
    if isinstance(example_inputs, (dict, torch.Tensor)) or not isinstance(example_inputs, Sequence):
        raise ConfigError(
            f"prepare: example_inputs must be a list of example calls (e.g. [batch_padded, batch_unpadded]), got "
            f"{type(example_inputs).__name__}; wrap a single batch in a list: example_inputs=[batch]"
        )
    wanted = [state.active] if setups is None else list(setups)
    _, layers = layers_of(model)

    def captures() -> int:
        return sum(len(v) for layer in layers if (s := layer_state(layer)) for v in s.traced.values())

    before = captures()
    work = [(setup, inputs) for setup in wanted for inputs in example_inputs]
    with serialized(), preserved_buffers(model), torch.random.fork_rng(devices=[]), torch.no_grad():
        for setup, inputs in _track(work, "fxadapt prepare"):
            with using(model, setup) as entered:
                if isinstance(entered, PerRow) and not (isinstance(inputs, dict) and "adapter_ids" in inputs):
                    with adapter_ids(model, torch.zeros(_batch_size(inputs) or 1, dtype=torch.long)):
                        _call(model, inputs)
                else:
                    _call(model, inputs)
    return {"captures": captures() - before, "calls": len(work)}

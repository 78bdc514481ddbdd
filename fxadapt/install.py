"""Install: bind generated code into a layer without changing what the layer *is*.

Replacing a layer with a GraphModule breaks Hugging Face (hidden-state recording, gradient checkpointing,
chunked feed-forward). Instead each layer's class is swapped for a subclass of it (one per original class,
same name) whose ``forward`` dispatches on the guard key to generated code. ``isinstance`` checks, HF's
``GradientCheckpointingLayer.__call__``, hooks and ``state_dict`` keys keep working. Pickling and deepcopy
rebuild the subclass from the original class, and drop generated code, which is re-traced lazily.

A layer with no active adapter runs its original eager ``forward``, so an un-activated model is bit-identical
to the untouched one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import Capture, SizeGuardMiss, flatten_call, guard_key, trace_layer
from .rewrite import LayerPlan, build_runner
from .sites import SiteReport, find_sites

__all__ = ["LayerState", "install", "is_installed", "layer_state", "uninstall"]

_STATE = "_fxadapt_layer"
_SUBCLASSES: dict[type, type] = {}


@dataclass
class Traced:
    capture: Capture
    report: SiteReport


@dataclass
class LayerState:
    """Per-layer compiler state, kept in the layer's ``__dict__``."""

    orig_class: type
    index: int
    model_type: str | None = None  # the HF config's, for find_sites' peer-placement rows
    plan: LayerPlan = field(default_factory=LayerPlan)
    # guard key -> captures for it (several only when captures also differ in baked branch flags)
    traced: dict[tuple, list[Traced]] = field(default_factory=dict)
    runners: dict[tuple, list[tuple[Capture, Callable[[nn.Module, list[Any]], Any], str]]] = field(
        default_factory=dict
    )

    notes: list[str] = field(default_factory=list)  # lowering notes of the last compiled specialisation
    # compiled code per plan seen (a few): switching back to a setup reuses its code
    compiled: dict[Any, dict] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        # generated code and graphs are cheap to rebuild and not picklable: drop them
        return {
            "orig_class": self.orig_class,
            "index": self.index,
            "model_type": self.model_type,
            "plan": self.plan,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __deepcopy__(self, memo: dict) -> LayerState:
        import copy

        return LayerState(self.orig_class, self.index, self.model_type, copy.deepcopy(self.plan, memo))

    def set_plan(self, plan: LayerPlan) -> None:
        if plan == self.plan and plan:
            return
        self.plan = plan
        from .kernels import backend_mode

        try:
            key: Any = hash(plan) and plan
        except TypeError:  # a config with a mapping field: key by its text
            key = repr(plan)
        key = (key, backend_mode())  # lowering to fused kernels depends on the kernel backend
        if key not in self.compiled and len(self.compiled) >= 16:
            self.compiled.pop(next(iter(self.compiled)))
        self.runners = self.compiled.setdefault(key, {})

    def add_traced(self, key: tuple, traced: Traced) -> None:
        self.traced.setdefault(key, []).append(traced)

    def find_traced(
        self, layer: nn.Module, key: tuple, leaves: list[Any], exclude: tuple[Capture, ...] = ()
    ) -> Traced | None:
        for traced in self.traced.get(key, ()):
            if traced.capture not in exclude and traced.capture.guards_hold(layer, leaves):
                return traced
        return None

    def trace(
        self,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        key: tuple,
        leaves: list[Any],
        exclude: tuple[Capture, ...] = (),
    ) -> Traced:
        traced = self.find_traced(layer, key, leaves, exclude)
        if traced is None:
            # a new kind of call at run time: verified against the values computed while tracing it
            capture = trace_layer(layer, self.orig_class.forward, args, kwargs, verify="shadow")
            traced = Traced(capture, find_sites(layer, capture.graph, self.model_type))
            self.add_traced(key, traced)
        return traced

    def run(self, layer: nn.Module, args: tuple, kwargs: dict, key: tuple, leaves: list[Any]) -> Any:
        """Run the generated code for this call, building it first if this kind of call is new. Captures that
        baked a branch on sizes raise :class:`SizeGuardMiss` for a call taking the other branch: the next
        capture is tried, or a new one traced."""
        missed: list[Capture] = []
        entries = self.runners.get(key, ())
        for i, (capture, runner, _) in enumerate(entries):
            if capture.value_guards and not capture.guards_hold(layer, leaves):
                continue
            if not capture.size_guards:
                return runner(layer, leaves)
            try:
                out = runner(layer, leaves)
            except SizeGuardMiss:
                missed.append(capture)
                continue
            if i:  # most recently used first: alternating branches cost one miss, not many
                entries.insert(0, entries.pop(i))
            return out
        runner = self.build(layer, args, kwargs, key, leaves, tuple(missed))
        return runner(layer, leaves)

    @torch.compiler.disable
    def build(
        self,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        key: tuple,
        leaves: list[Any],
        exclude: tuple[Capture, ...] = (),
    ):
        traced = self.trace(layer, args, kwargs, key, leaves, exclude)
        notes: list[str] = []
        runner, source = build_runner(layer, traced.capture, traced.report, self.plan, notes)
        self.runners.setdefault(key, []).append((traced.capture, runner, source))
        self.notes = notes
        return runner

    def warm(self, layer: nn.Module) -> None:
        """Compile the plan for every known capture now: an invalid plan fails at activation time, and a compiled
        model (torch.compile) finds generated code ready after a setup switch instead of building it mid-graph."""
        if not self.plan:
            return
        for key, traced_list in self.traced.items():
            for traced in traced_list:
                if any(capture is traced.capture for capture, _, _ in self.runners.get(key, ())):
                    continue
                notes: list[str] = []
                runner, source = build_runner(layer, traced.capture, traced.report, self.plan, notes)
                self.runners.setdefault(key, []).append((traced.capture, runner, source))
                self.notes = notes

    def sources(self) -> list[str]:
        """Generated code of every compiled specialisation (for ``explain`` and debugging)."""
        return [src for entries in self.runners.values() for _, _, src in entries]


def layer_state(layer: nn.Module) -> LayerState | None:
    return layer.__dict__.get(_STATE)


def is_installed(layer: nn.Module) -> bool:
    return _STATE in layer.__dict__


def _dispatch_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: LayerState = self.__dict__[_STATE]
    if not state.plan:
        return state.orig_class.forward(self, *args, **kwargs)
    leaves, spec = flatten_call(args, kwargs)
    key = guard_key(self, leaves, spec)
    return state.run(self, args, kwargs, key, leaves)


def _rebuild(orig_class: type) -> nn.Module:
    obj = orig_class.__new__(orig_class)
    obj.__class__ = fxadapt_class(orig_class)
    return obj


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    state = self.__dict__[_STATE]
    return (_rebuild, (state.orig_class,), self.__getstate__())


def fxadapt_class(orig: type) -> type:
    """The registered subclass of ``orig`` that dispatches to generated code (same name and module)."""
    sub = _SUBCLASSES.get(orig)
    if sub is None:
        sub = type(
            orig.__name__,
            (orig,),
            {
                "forward": _dispatch_forward,
                "__reduce_ex__": _reduce_ex,
                "__module__": orig.__module__,
                "__qualname__": orig.__qualname__,
                "_fxadapt_orig_class": orig,
            },
        )
        _SUBCLASSES[orig] = sub
    return sub


def install(layer: nn.Module, index: int, model_type: str | None = None) -> LayerState:
    """Swap ``layer``'s class for its fxadapt subclass (idempotent) and return its state."""
    state = layer_state(layer)
    if state is None:
        orig = type(layer)
        state = LayerState(orig, index, model_type)
        layer.__dict__[_STATE] = state
        layer.__class__ = fxadapt_class(orig)
    return state


def uninstall(layer: nn.Module) -> None:
    """Restore the layer's original class and drop all compiler state."""
    state = layer.__dict__.pop(_STATE, None)
    if state is not None:
        layer.__class__ = state.orig_class

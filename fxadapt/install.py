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

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calls import current_plan
from .capture import (
    Capture,
    SizeGuardMiss,
    layer_signature,
    trace_layer,
    verify_shared,
)
from .errors import CaptureError
from .guards import _NONE_META, call_key, hook_count, hook_dicts
from .rewrite import LayerPlan, build_runner, replicated_call
from .rollback import preserved_buffers
from .sites import SiteReport, find_sites
from .tracing import serialized

__all__ = [
    "LayerState",
    "Siblings",
    "Traced",
    "install",
    "is_installed",
    "layer_state",
    "plan_key",
    "uninstall",
]

_STATE = "_fxadapt_layer"
_ORDER = threading.Lock()  # reordering a layer's runners (most recently used first)
_SUBCLASSES: dict[type, type] = {}


@dataclass(eq=False)
class Traced:
    """A capture with its sites, and its generated code per plan (shared by every sibling layer using it)."""

    capture: Capture
    report: SiteReport
    compiled: dict[Any, tuple[Callable[..., Any], str, list[str]]] = field(default_factory=dict)

    def runner(
        self, layer: nn.Module, plan: LayerPlan, key: Any = None
    ) -> tuple[Callable[..., Any], str, list[str]]:
        """``(runner, source, lowering notes)`` of ``plan`` on this capture, built once for all layers sharing it
        (the generated code names modules by their path inside the layer, so siblings run the same code).
        ``key``: ``plan_key(plan)`` when the caller has it already."""
        key = plan_key(plan) if key is None else key
        entry = self.compiled.get(key)
        if entry is None:
            notes: list[str] = []
            runner, source = build_runner(layer, self.capture, self.report, plan, notes)
            entry = self.compiled[key] = (runner, source, notes)
        return entry


def plan_key(plan: LayerPlan) -> Any:
    """A dict key for ``plan`` under the current kernel backend (lowering to fused kernels depends on it)."""
    from .kernels import backend_mode

    try:
        key: Any = hash(plan) and plan
    except TypeError:  # a config with a mapping field: key by its text
        key = repr(plan)
    return (key, backend_mode())


def _memoised(memo: dict[int, Any] | None, layer: nn.Module, compute: Callable[[nn.Module], Any]) -> Any:
    """``compute(layer)``, kept in ``memo`` by layer identity while one is open (None: computed every time)."""
    if memo is None:
        return compute(layer)
    value = memo.get(id(layer))
    if value is None:
        value = memo[id(layer)] = compute(layer)
    return value


class Siblings:
    """The captures of one model's layers by (layer class, guard key): a layer whose structure and read attributes
    match an existing capture (``Capture.fits``) reuses it after checking it against its own eager call."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, list[Traced]] = {}
        self.origin: dict[int, int] = {}  # id(traced) -> id(the layer it was traced on)
        # id(layer) -> id(the layer whose capture it was verified to share on its first call, or its own)
        self.group: dict[int, int] = {}
        # the priming call's recorded layer calls and outputs (model.prime): its other-mode variant reuses them
        self.recorded: tuple[dict, dict] | None = None
        # (id(traced), training) of captures verified to serve the other mode as well (reuse: one trace, two modes)
        self.any_mode: set[tuple[int, bool]] = set()
        # id(layer) -> layer_signature, while priming (model.prime*): the layers' structure does not change then
        self.signatures: dict[int, tuple] | None = None
        self.hook_memo: dict[int, tuple[dict, ...]] | None = None  # id(layer) -> hook_dicts, likewise

    def signature(self, layer: nn.Module) -> tuple:
        """``layer_signature(layer)``, computed once per layer while priming."""
        return _memoised(self.signatures, layer, layer_signature)

    def hooks(self, layer: nn.Module) -> int:
        """How many hooks ``layer``'s traced-through submodules have (``guards.hook_dicts`` found once per layer
        while priming)."""
        return hook_count(_memoised(self.hook_memo, layer, hook_dicts))

    def add(self, orig: type, key: tuple, traced: Traced, layer: nn.Module | None = None) -> None:
        entries = self.by_key.setdefault((orig, key), [])
        if all(t is not traced for t in entries):
            entries.append(traced)
        if layer is not None and id(traced) not in self.origin:
            self.origin[id(traced)] = id(layer)
            self.group.setdefault(id(layer), id(layer))

    def shared(self, layer: nn.Module, traced: Traced) -> None:
        """``layer`` was verified bit-exactly to compute what ``traced``'s origin layer computes."""
        origin = self.origin.get(id(traced))
        if origin is not None:
            self.group.setdefault(id(layer), origin)

    def trusted(self, layer: nn.Module, traced: Traced) -> bool:
        """Whether ``layer`` already shares a verified capture with the layer ``traced`` was traced on (for another
        kind of call): the same structure, attributes and code, checked once; no second eager check needed."""
        origin = self.origin.get(id(traced))
        return origin is not None and self.group.get(id(layer)) == origin

    def representatives(self, layers: list[nn.Module]) -> set[int]:
        """Ids of the layers whose calls stand for their group's: each group's origin and every ungrouped layer."""
        return {id(layer) for layer in layers if self.group.get(id(layer), id(layer)) == id(layer)}

    def takes(self, layer: nn.Module, key: tuple, traced: Traced) -> bool:
        """Whether ``layer``, not called itself, may share ``traced`` (its group's capture of a call with guard key
        ``key``): trusted, and the capture fits it (an attribute read only on that call's path may still differ)."""
        if not self.trusted(layer, traced):
            return False
        # trusted: its structure was found equal to the group's when it joined, so only the reads are compared
        return traced.capture.fits(layer, traced.capture.signature, self._any_mode(key, traced))

    def _any_mode(self, key: tuple, traced: Traced) -> bool:
        training = key[2]  # the guard key's training flag (guards.guard_key)
        return (id(traced), training) in self.any_mode

    def reuse(
        self,
        orig: type,
        key: tuple,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        leaves: list[Any],
        expected: Any = None,
        exclude: tuple[Capture, ...] = (),
    ) -> Traced | None:
        """A sibling's capture for this call of ``layer``, if one fits and (unless the layer is already trusted to
        share it) reproduces this layer's eager output bit for bit: ``expected`` when that output was recorded,
        else a fresh eager call. None: the layer needs its own capture."""
        traced = self.find(orig, key, layer, leaves)
        if traced is not None and any(c is traced.capture for c in exclude):
            return None
        if traced is None:
            found = self._other_mode(orig, key, layer, args, kwargs, leaves, expected, exclude)
            return found or self._none_for_tensor(orig, key, layer, args, kwargs, leaves, expected, exclude)
        if self.trusted(layer, traced):
            return traced
        try:
            verify_shared(layer, orig.forward, traced.capture, args, kwargs, expected)
        except CaptureError:  # a difference the structure does not show
            return None
        self.shared(layer, traced)
        return traced

    def _other_mode(
        self,
        orig: type,
        key: tuple,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        leaves: list[Any],
        expected: Any,
        exclude: tuple[Capture, ...],
    ) -> Traced | None:
        """The same kind of call's capture in the other mode (train/eval), if it reproduces this call bit for bit:
        where nothing on the traced path depends on the mode (no dropout there, or dropout of probability 0; leaf
        modules such as ``nn.Dropout`` follow their own flag at run time), one trace serves both modes. A baked
        difference (an attention dropout probability chosen by ``self.training``) fails the check."""
        flipped = (*key[:2], not key[2], *key[3:])
        signature = self.signature(layer)
        for traced in self.by_key.get((orig, flipped), ()):
            capture = traced.capture
            if any(c is capture for c in exclude) or not capture.fits(layer, signature, any_mode=True):
                continue
            if _dropout_not_called(layer, capture):  # would fail the check: don't pay for it
                continue
            if not capture.guards_hold(layer, leaves):
                continue
            if self._share_if_exact(
                orig, key, layer, traced, args, kwargs, expected, (CaptureError, SizeGuardMiss)
            ):
                self.any_mode.add((id(traced), key[2]))
                return traced
        return None

    def _none_for_tensor(
        self,
        orig: type,
        key: tuple,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        leaves: list[Any],
        expected: Any,
        exclude: tuple[Capture, ...],
    ) -> Traced | None:
        """The capture of the same kind of call with a tensor where this call passes None, if it reproduces this
        call bit for bit. A batch without padding reaches the layers with no attention mask; where the traced
        path only hands the mask to an op that reads None as "no mask" (``scaled_dot_product_attention``), the
        padded batch's capture serves it too. A Python branch on ``mask is None`` (``is_causal`` chosen by it, a
        mask added to the scores) fails the check: the generated code cannot take it."""
        spec, metas, rest = key[0], key[1], key[2:]
        if _NONE_META not in metas:
            return None
        signature = self.signature(layer)
        for (other_orig, other), entries in list(self.by_key.items()):
            if other_orig is not orig or other[0] != spec or other[2:] != rest or len(other[1]) != len(metas):
                continue
            swapped = [i for i, (a, b) in enumerate(zip(metas, other[1])) if a != b]
            if not swapped or any(metas[i] != _NONE_META or other[1][i][0] != "T" for i in swapped):
                continue  # not the same call with tensors for some of its Nones
            for traced in entries:
                capture = traced.capture
                if (
                    any(c is capture for c in exclude)
                    or capture.value_guards  # flags read from inputs: not evaluated on a None
                    or not all(i in capture.dynamic for i in swapped)
                    or not capture.fits(layer, signature, self._any_mode(other, traced))
                ):
                    continue
                # any error: the traced path does not take None there (an op on it); other[2:] == key[2:], so a
                # capture serving both modes under ``other`` does so under ``key`` too (the same any_mode entry)
                if self._share_if_exact(orig, key, layer, traced, args, kwargs, expected, Exception):
                    return traced
        return None

    def _share_if_exact(
        self,
        orig: type,
        key: tuple,
        layer: nn.Module,
        traced: Traced,
        args: tuple,
        kwargs: dict,
        expected: Any,
        errors: type[BaseException] | tuple[type[BaseException], ...],
    ) -> bool:
        """Check ``traced`` bit for bit against this call of ``layer`` (``errors``: what counts as a failed
        check); if it holds, register it for ``key`` and put ``layer`` in its origin's group."""
        try:
            verify_shared(layer, orig.forward, traced.capture, args, kwargs, expected)
        except errors:
            return False
        self.add(orig, key, traced)
        self.shared(layer, traced)
        return True

    def find(self, orig: type, key: tuple, layer: nn.Module, leaves: list[Any]) -> Traced | None:
        entries = self.by_key.get((orig, key), ())
        if not entries:
            return None
        signature = self.signature(layer)
        for traced in entries:
            if traced.capture.fits(
                layer, signature, self._any_mode(key, traced)
            ) and traced.capture.guards_hold(layer, leaves):
                return traced
        return None


def _dropout_not_called(layer: nn.Module, capture: Capture) -> bool:
    """Whether ``layer`` holds an active dropout module its capture never calls: its probability is then used
    another way in the other mode (``dropout_p=self.dropout.p if self.training else 0.0``), so one capture cannot
    serve both modes. Only a shortcut: the bit-exact check decides."""
    called = {str(n.target) for n in capture.graph.nodes if n.op == "call_module"}
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd)
        and m.p > 0
        and path not in called
        and path.split(".", 1)[0] != "fxadapt"  # the adapter container (an adapter's own dropout)
        for path, m in layer.named_modules()
    )


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
    # serve: (plan, runners) as one value, so a call racing activate() never pairs one plan with another's code
    active: tuple[LayerPlan, dict] | None = None
    siblings: Siblings = field(default_factory=Siblings)  # shared by the model's layers (install)
    _hooks: tuple[dict, ...] | None = None
    # (runners, key, entries) of the last dispatched call: the next call of that kind, whose generated keyer
    # returns the very same key object (guards.call_key), finds its code by identity, without hashing its key
    hot: tuple = (None, None, None)

    def hooks(self, layer: nn.Module) -> int:
        """How many hooks the traced-through submodules have now (their hook dicts are found once)."""
        if self._hooks is None:
            self._hooks = hook_dicts(layer)
        return hook_count(self._hooks)

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

        siblings = memo.setdefault(id(self.siblings), Siblings())  # shared by the copied model's layers
        return LayerState(
            self.orig_class, self.index, self.model_type, copy.deepcopy(self.plan, memo), siblings=siblings
        )

    def set_plan(self, plan: LayerPlan) -> None:
        if plan == self.plan and plan:
            return
        runners = self.runners_for(plan)
        self.plan, self.runners = plan, runners
        self.active = (plan, runners)

    def runners_for(self, plan: LayerPlan) -> dict:
        """The compiled code of ``plan`` (shared by the active setup and per-call setups, ``calls.py``)."""
        key = plan_key(plan)
        if key not in self.compiled and len(self.compiled) >= 16:
            self.compiled.pop(next(iter(self.compiled)), None)
        return self.compiled.setdefault(key, {})

    def add_traced(self, layer: nn.Module, key: tuple, traced: Traced) -> None:
        traced.capture.adopt(layer)
        entries = self.traced.setdefault(key, [])
        if all(t is not traced for t in entries):
            entries.append(traced)
        self.siblings.add(self.orig_class, key, traced, layer)

    def find_traced(
        self, layer: nn.Module, key: tuple, leaves: list[Any], exclude: tuple[Capture, ...] = ()
    ) -> Traced | None:
        for traced in self.traced.get(key, ()):
            if not any(c is traced.capture for c in exclude) and traced.capture.guards_hold(layer, leaves):
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
            # a new kind of call at run time: a sibling's capture if one fits (checked against this layer's eager
            # call), else traced and verified against the values computed while tracing it
            # serve: tracing and verification must not advance BatchNorm statistics
            with preserved_buffers(layer):
                traced = self.siblings.reuse(
                    self.orig_class, key, layer, args, kwargs, leaves, exclude=exclude
                )
                if traced is None:
                    capture = trace_layer(layer, self.orig_class.forward, args, kwargs, verify="shadow")
                    traced = Traced(capture, find_sites(layer, capture.graph, self.model_type))
            self.add_traced(layer, key, traced)
        return traced

    def runner_for(
        self,
        layer: nn.Module,
        key: tuple,
        leaves: list[Any],
        runners: dict | None = None,
        exclude: tuple[Capture, ...] = (),
    ) -> Callable[..., Any] | None:
        for capture, runner, _ in (self.runners if runners is None else runners).get(key, ()):
            if any(c is capture for c in exclude):
                continue
            if not capture.value_guards or capture.guards_hold(layer, leaves):
                return runner
        return None

    def run(
        self, layer: nn.Module, args: tuple, kwargs: dict, key: tuple, leaves: list[Any], plan, runners
    ) -> Any:
        """Run the generated code for this call, building it first if this kind of call is new. Captures that
        baked a branch on sizes raise :class:`SizeGuardMiss` for a call taking the other branch: the next
        capture is tried, or a new one traced."""
        missed: list[Capture] = []
        entries = runners.get(key, ())
        for i, (capture, runner, _) in enumerate(list(entries)):
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
                with _ORDER:
                    if entries and i < len(entries) and entries[i][0] is capture:
                        entries.insert(0, entries.pop(i))
            return out
        runner = self.build(layer, args, kwargs, key, leaves, plan, runners, tuple(missed))
        return runner(layer, leaves)

    @torch.compiler.disable
    def build(
        self,
        layer: nn.Module,
        args: tuple,
        kwargs: dict,
        key: tuple,
        leaves: list[Any],
        plan: LayerPlan | None = None,
        runners: dict | None = None,
        exclude: tuple[Capture, ...] = (),
    ):
        plan, runners = (self.plan, self.runners) if plan is None else (plan, runners)
        with serialized():  # serve: one capture per new guard key; concurrent callers wait for it
            runner = self.runner_for(layer, key, leaves, runners, exclude)
            if runner is not None:  # another thread built it while this one waited
                return runner
            # under Parallel the base layer is traced on its inputs as the generated code replicates them
            traced = self.trace(layer, *replicated_call(plan, args, kwargs), key, leaves, exclude)
            runner, source, notes = traced.runner(layer, plan)
            runners.setdefault(key, []).append((traced.capture, runner, source))
            self.notes = notes
        return runner

    def warm(self, layer: nn.Module, plan: LayerPlan | None = None, runners: dict | None = None) -> None:
        """Compile the plan for every known capture now: an invalid plan fails at activation time, and a compiled
        model (torch.compile) finds generated code ready after a setup switch instead of building it mid-graph."""
        plan, runners = (self.plan, self.runners) if plan is None else (plan, runners)
        if not plan:
            return
        pkey = plan_key(plan)  # once for all of this layer's captures
        for key, traced_list in list(self.traced.items()):
            for traced in traced_list:
                if any(capture is traced.capture for capture, _, _ in runners.get(key, ())):
                    continue
                runner, source, notes = traced.runner(layer, plan, pkey)
                runners.setdefault(key, []).append((traced.capture, runner, source))
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
    plan, runners = current_plan(state)  # serve: a per-call setup (fxadapt.using) wins over the active one
    if not plan.sites:
        return state.orig_class.forward(self, *args, **kwargs)
    leaves, _, key = call_key(self, args, kwargs, state.hooks(self))
    hot = state.hot
    if hot[1] is key and hot[0] is runners:
        entries = hot[2]
    else:
        entries = runners.get(key)
        if entries:  # runners only ever append to an entry list: it stays this key's list
            state.hot = (runners, key, entries)
    if entries:  # the usual case, inline: one capture for this key and no guards to check
        capture, runner, _ = entries[0]
        if not capture.value_guards and not capture.size_guards:
            return runner(self, leaves)
    return state.run(self, args, kwargs, key, leaves, plan, runners)


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


def install(
    layer: nn.Module, index: int, model_type: str | None = None, siblings: Siblings | None = None
) -> LayerState:
    """Swap ``layer``'s class for its fxadapt subclass (idempotent) and return its state. Layers of one model
    share ``siblings`` (their captures by class and guard key)."""
    state = layer_state(layer)
    if state is None:
        orig = type(layer)
        state = LayerState(orig, index, model_type, siblings=siblings if siblings is not None else Siblings())
        layer.__dict__[_STATE] = state
        layer.__class__ = fxadapt_class(orig)
    return state


def uninstall(layer: nn.Module) -> None:
    """Restore the layer's original class and drop all compiler state."""
    state = layer.__dict__.pop(_STATE, None)
    if state is not None:
        layer.__class__ = state.orig_class

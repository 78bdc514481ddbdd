"""The tracer: torch.fx with *shadow* values, leaf attention functions and proxy-friendly patches.

Every proxy carries a shadow: the real value its op produced on the recorded call. Shadows answer the questions
Python control flow asks (dtype, rank, ``isinstance`` of tuples and caches) concretely while sizes stay symbolic.
Hugging Face attention functions and TorchScript functions are leaf calls; torch factories accept proxy
arguments; in-place arithmetic on tensors stays in place; module attribute writes of traced values are replayed
at run time. A question that depends on tensor data raises :class:`CaptureFailure`, and the caller retries with
the failing submodule as a leaf.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _orig_module_call
from torch.utils import _pytree as pytree

from .graphs import ATTENTION_FLAG, replay_forward_hooks
from .guards import (
    _MISSING,
    SHADOW,
    CaptureFailure,
    _depends_only_on_objects,
    _depends_only_on_sizes,
    _first_side_effect,
    check_size_assumption,
    check_size_guard,
    check_value_guard,
    hoistable_before,
)
from .reads import plain_int
from .tracing import gate, unpatched

_STATIC_ATTRS = frozenset(
    {
        "dtype",
        "device",
        "ndim",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_mps",
        "layout",
    }
)
_STATIC_METHODS = frozenset(
    {"dim", "ndimension", "is_floating_point", "is_complex", "element_size", "get_device", "is_signed"}
)
_STATIC_FUNCTIONS = frozenset({torch.is_floating_point, torch.is_complex, torch.is_tensor})
# Python values that become constants of a capture (and part of its guard key); anything else is a graph input.
# --------------------------------------------------------------------------------------------------------------
# Shadow proxies


class ShadowProxy(fx.Proxy):
    """An fx proxy that also knows the real value its node produced on the recorded call."""

    @property
    def _shadow(self) -> Any:
        return self.node.meta.get(SHADOW, _MISSING)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance(proxy, tuple / Cache) answers like the real value
        # Never for tensors: torch's C++ argument parser trusts ``isinstance(obj, Tensor)`` and would read the
        # proxy as a tensor (a segfault in ``torch.clamp(t, 0, proxy)``); tensor code paths see a Proxy, as in fx.
        shadow = self._shadow
        return type(self) if shadow is _MISSING or isinstance(shadow, torch.Tensor) else type(shadow)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        shadow = self._shadow
        if isinstance(shadow, torch.Tensor):
            if name.startswith("_"):  # private tensor flags (``_is_param``...) are never graph values
                raise AttributeError(name)
            if name in _STATIC_ATTRS:
                return getattr(shadow, name)
            if name in _STATIC_METHODS:
                return getattr(shadow, name)
        return ShadowAttribute(self, name)

    @property
    def keys(
        self,
    ) -> Any:  # fx's Proxy.keys() is for ** unpacking; HF caches have a ``.keys`` tensor attribute
        return ShadowAttribute(self, "keys")

    # In-place arithmetic on tensors stays in place (``h *= noise`` in a router mutates the caller's tensor in
    # eager; Python's fallback to ``h = h * noise`` would not).
    def __iadd__(self, other: Any) -> Any:
        return self._inplace(operator.iadd, operator.add, other)

    def __isub__(self, other: Any) -> Any:
        return self._inplace(operator.isub, operator.sub, other)

    def __imul__(self, other: Any) -> Any:
        return self._inplace(operator.imul, operator.mul, other)

    def __itruediv__(self, other: Any) -> Any:
        return self._inplace(operator.itruediv, operator.truediv, other)

    def _inplace(self, inplace: Any, plain: Any, other: Any) -> Any:
        target = inplace if isinstance(self._shadow, torch.Tensor) else plain
        return self.tracer.create_proxy("call_function", target, (self, other), {})

    def __setitem__(self, key: Any, value: Any) -> None:  # ``cache.is_updated[i] = True``
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __len__(self) -> int:
        shadow = self._shadow
        if isinstance(shadow, torch.Tensor):
            raise CaptureFailure("len() of a tensor depends on its size", self.tracer._where())
        if shadow is _MISSING or not hasattr(shadow, "__len__"):
            raise CaptureFailure("len() of a value without a known length", self.tracer._where())
        return len(shadow)

    def __iter__(self) -> Iterator[Any]:
        shadow = self._shadow
        if isinstance(shadow, (tuple, list, torch.Size)):
            return iter([self[i] for i in range(len(shadow))])
        raise CaptureFailure(
            f"iteration over a traced value of type {type(shadow).__name__}", self.tracer._where()
        )

    @classmethod
    def __torch_function__(cls, orig_method, types, args=(), kwargs=None):  # type: ignore[override]
        if orig_method in _STATIC_FUNCTIONS:
            args = pytree.tree_map_only(ShadowProxy, lambda p: p._shadow, args)
            return orig_method(*args, **(kwargs or {}))
        return super().__torch_function__(orig_method, types, args, kwargs)


class ShadowAttribute(ShadowProxy, fx.proxy.Attribute):
    """Attribute access on a proxy; becomes a ``getattr`` node on use, or a method call when called."""


# --------------------------------------------------------------------------------------------------------------
# Leaf attention functions


class _LeafFunction:
    """Wraps an attention function so that a call with proxies becomes one ``call_function`` node."""

    def __init__(self, fn: Callable[..., Any], attention: bool = True):
        self.fn = fn
        self.attention = attention
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return self.fn(*args, **kwargs)
        out = proxy.tracer.create_proxy("call_function", self.fn, args, kwargs)
        if self.attention:
            out.node.meta[ATTENTION_FLAG] = True
        return out


def _attention_interface_classes() -> list[type]:
    classes = []
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        classes.append(type(ALL_ATTENTION_FUNCTIONS))
    except ImportError:  # pragma: no cover - transformers always present in practice
        pass
    return classes


# torch factories that don't dispatch ``__torch_function__`` for proxy sizes/scalars: wrapped while tracing so a
# call with a proxy argument becomes one graph node (``torch.tensor(x.size(-1))`` in DeBERTa, for example).
_WRAPPED_TORCH_FUNCTIONS = ("tensor", "as_tensor", "full", "zeros", "ones", "empty")


def _wrap_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxy = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return wrapper


class _TracePatches:
    """While tracing: HF attention functions and TorchScript functions are leaf calls, and torch factories accept
    proxy arguments."""

    def __init__(self, script_functions: list[tuple[Any, str, Any]] = ()):  # type: ignore[assignment]
        self.script_functions = script_functions

    def __enter__(self) -> _TracePatches:
        self._saved: list[tuple[Any, str, Any]] = []
        # serve: every patch goes through tracing.gate: other threads keep calling the originals
        for module, name, fn in self.script_functions:
            self._saved.append((module, name, fn))
            setattr(module, name, gate(_LeafFunction(_python_caller(fn), attention=False), fn))
        for name in _WRAPPED_TORCH_FUNCTIONS:
            orig = getattr(torch, name)
            self._saved.append((torch, name, orig))
            setattr(torch, name, gate(_wrap_factory(orig), orig))
        for cls in _attention_interface_classes():
            for name in ("get_interface", "__getitem__"):
                orig = cls.__dict__.get(name)
                if orig is None:
                    orig = getattr(cls, name, None)
                    if orig is None:
                        continue
                    self._saved.append((cls, name, _MISSING))
                else:
                    self._saved.append((cls, name, orig))

                def patched(self_, *a: Any, _orig: Any = orig, **kw: Any) -> Any:
                    fn = _orig(self_, *a, **kw)
                    return _LeafFunction(fn) if callable(fn) and not isinstance(fn, _LeafFunction) else fn

                setattr(cls, name, gate(patched, orig if orig is not _MISSING else getattr(cls, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in reversed(self._saved):
            if orig is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, orig)


# --------------------------------------------------------------------------------------------------------------
# The tracer


def _script_functions(layer: nn.Module) -> list[tuple[Any, str, Any]]:
    """(module, name, fn) of TorchScript functions in the modelling modules of ``layer``. Called with a proxy,
    one would crash in C++; while tracing they are leaf calls (DeBERTa's ``scaled_size_sqrt`` in transformers 4.x)."""
    import sys

    found = []
    for module_name in sorted({type(m).__module__ for m in layer.modules()}):
        module = sys.modules.get(module_name)
        for name, value in list(getattr(module, "__dict__", {}).items()):
            if isinstance(value, torch.jit.ScriptFunction):
                found.append((module, name, value))
    return found


def _python_caller(fn: Any) -> Callable[..., Any]:
    """A plain Python function calling ``fn``: a graph target fx can name, generate code for and copy."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = str(getattr(fn, "name", "script_function"))
    return call


class _LayerTracer(fx.Tracer):
    def __init__(self, forced_leaves: set[str]):
        super().__init__(autowrap_modules=(math,))
        # buffers read in the forward become graph values: a buffer sliced with a symbolic size (GPT-Neo's
        # ``self.bias[:, :, k - q : k]``) is then a graph op instead of a real tensor indexed by a proxy
        self.proxy_buffer_attributes = True
        self.forced_leaves = forced_leaves
        self.traced_stack: list[str] = []
        self.value_guards: list[tuple[fx.Node, bool]] = []
        self.size_guards = 0
        self._inputs: list[tuple[str, Any]] = []
        self._fn: Callable[..., Any] | None = None

    # fx hooks -------------------------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShadowProxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.forced_leaves:
            return True
        if m._forward_pre_hooks:  # pre-hooks may rewrite inputs: keep the real call
            return True
        if next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            # a module object outside the layer's tree (not a registered submodule), e.g. transformers' hub-kernel
            # function wrappers kept in a module's __dict__ (apply_rotary_pos_emb, transformers >= 5.25): it cannot
            # be a call_module node; its code is traced inline as part of the caller's
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)

        def traced_forward(*a: Any, **kw: Any) -> Any:
            # Call forward directly: hooks must not fire on proxies; they are replayed below at run time.
            out = m.forward(*a, **kw)
            if m._forward_hooks:
                out = self.create_proxy(
                    "call_function", replay_forward_hooks, (m, a, kw, out), {}, name=f"{path}_hooks"
                )
            return out

        self.traced_stack.append(path)
        try:
            return super().call_module(m, traced_forward, args, kwargs)
        finally:
            self.traced_stack.pop()

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, fx.Proxy):  # before fx's Tensor checks: shadow proxies claim their shadow's class
            return a.node
        return super().create_arg(a)

    def to_bool(self, obj: fx.Proxy) -> bool:
        node = obj.node
        value = node.meta.get(SHADOW, _MISSING)
        if value is _MISSING:
            raise CaptureFailure("control flow depends on a traced value of unknown value", self._where())
        flag = bool(value)
        if _depends_only_on_objects(node):
            # A flag read from an opaque input (``cache.is_updated.get(i)``): bake the branch, guard on the value.
            self.value_guards.append((node, flag))
            self.create_proxy("call_function", check_value_guard, (obj, flag), {})
            return flag
        if _depends_only_on_sizes(node):
            # A branch on sizes (``if k.size(-2) != q.size(-2)``, ``max(0, bias.size(1) - q_len)``): bake it and
            # check it where it was taken; a call that takes the other branch re-dispatches (install.py). That
            # re-run must not repeat side effects, so this is allowed only before any.
            effect = _first_side_effect(self.root, self.graph)
            self.size_guards += 1
            moved = None if effect is None else hoistable_before(self.graph, node, effect)
            if effect is None:
                self.create_proxy("call_function", check_size_guard, (obj, flag), {})
            elif moved is not None:  # sizes known before the side effect: checked there, re-dispatchable
                for n in moved:
                    effect.prepend(n)
                with self.graph.inserting_before(effect):
                    self.create_proxy("call_function", check_size_guard, (obj, flag), {})
            else:  # a re-run would repeat the side effect: a call taking the other branch is an error
                self.create_proxy(
                    "call_function", check_size_assumption, (obj, flag, effect.format_node()), {}
                )
            return flag
        raise CaptureFailure("control flow depends on tensor data", self._where())

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        raise CaptureFailure("iteration over a traced value of unknown length", self._where())

    def keys(self, obj: fx.Proxy) -> Any:
        raise CaptureFailure("** unpacking of a traced value", self._where())

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind in ("placeholder", "output"):
            return proxy
        node.meta[SHADOW] = self._evaluate(node)
        return proxy

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):  # type: ignore[override]
        placeholders = []
        for name, shadow in self._inputs:
            p = self.create_proxy("placeholder", name, (), {})
            p.node.meta[SHADOW] = shadow
            placeholders.append(p)
        return self._fn, [self.root, *placeholders]

    # helpers --------------------------------------------------------------------------------------------------
    def _where(self) -> str:
        return self.traced_stack[-1] if self.traced_stack else ""

    def _evaluate(self, node: fx.Node) -> Any:
        def shadow_of(n: fx.Node) -> Any:
            value = n.meta.get(SHADOW, _MISSING)
            if value is _MISSING and n.op == "get_attr":  # constants fx registered itself (tensor literals)
                value = n.meta[SHADOW] = _fetch_attr(self.root, str(n.target))
            if value is _MISSING:
                raise CaptureFailure(f"no value known for {n.format_node()}", self._where())
            return value

        # tracked attributes evaluate as the plain ints they are: an op using one is not a Python use of it
        args = fx.node.map_arg(fx.node.map_aggregate(node.args, plain_int), shadow_of)
        kwargs = fx.node.map_arg(fx.node.map_aggregate(node.kwargs, plain_int), shadow_of)
        try:
            with unpatched():
                if node.op == "get_attr":
                    return _fetch_attr(self.root, str(node.target))
                if node.op == "call_module":
                    return _orig_module_call(self.root.get_submodule(str(node.target)), *args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                if node.target is store_attribute:
                    return None  # only replayed at run time
                # hooks run on the real values too (node.target below): one that changes the module's output
                # changes every value computed after it, which verification compares against
                return node.target(*args, **kwargs)  # type: ignore[operator]
        except CaptureFailure:
            raise
        except Exception as exc:
            raise CaptureFailure(f"{node.format_node()} failed on real values: {exc}", self._where()) from exc


def _value_kind(value: Any) -> str:
    """'tensor', 'size' (ints, shapes, integer scalars such as DeBERTa's attention span: no data flow) or
    'object' (tuples of tensors, caches, ...)."""
    if isinstance(value, torch.Tensor):
        integer = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        return "size" if value.dim() == 0 and integer else "tensor"
    if isinstance(value, (bool, int, float, torch.Size)) or (
        isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value)
    ):
        return "size"
    return "object"


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def store_attribute(module: nn.Module, name: str, value: Any) -> None:
    """Run-time replay of a module attribute write seen while tracing (see ``_module_state.record_writes``)."""
    setattr(module, name, value)


class _module_state:
    """Tracing runs the layer's Python code, which may assign attributes (``self.expert_capacity = ceil(n)``):
    attributes a trace set to traced values get their old value back (no proxy survives in module state)."""

    def __init__(self, layer: nn.Module):
        self.paths = [path for path, _ in layer.named_modules()]
        self.modules = [m for _, m in layer.named_modules()]

    def __enter__(self) -> None:
        self.saved = [dict(m.__dict__) for m in self.modules]

    def record_writes(self, tracer: fx.Tracer) -> None:
        """Replay, at the end of the generated code, the attribute writes of traced values (NLLB-MoE's router
        stores ``self.expert_capacity = ceil(n_tokens * f)`` in eval mode): the state a call leaves behind is the
        one eager leaves. Reads within the call were traced to the value already."""
        for path, module, saved in zip(self.paths, self.modules, self.saved):
            for key, value in list(module.__dict__.items()):
                if not path or saved.get(key, _MISSING) is value:
                    continue
                if any(isinstance(v, fx.Proxy) for v in pytree.tree_leaves(value)):
                    owner = tracer.create_proxy("get_attr", path, (), {})
                    tracer.create_proxy("call_function", store_attribute, (owner, key, value), {})

    def __exit__(self, *exc: Any) -> None:
        for module, saved in zip(self.modules, self.saved):
            for key, value in list(module.__dict__.items()):
                if saved.get(key, _MISSING) is value:
                    continue
                if any(isinstance(v, fx.Proxy) for v in pytree.tree_leaves(value)):
                    if key in saved:
                        module.__dict__[key] = saved[key]
                    else:
                        del module.__dict__[key]

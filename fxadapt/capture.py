"""Capture: a Hugging Face model's repeating layers as torch.fx graphs, one per distinct call.

Design note
-----------
Whole-model tracing fails on transformers 5 (mask helpers, ``**kwargs``, caches). The unit of capture is
therefore each element of the model's repeating layer lists (``encoder.layer.N``, ``layers.N``, ``h.N``...),
found structurally: outermost ``ModuleList``s whose elements are instances of one custom block class.

A layer is traced *specialised to the call it actually receives*: the call is flattened with pytree; tensors
and opaque objects (caches) become graph inputs, everything else (``None``, flags, ints, strings, dtypes) is
baked in as a constant. The call's structure, input dtypes/ranks/devices, ``training`` and the hook state form
the **guard key**; a call with a new key is traced lazily. Sizes stay symbolic, so a new batch or sequence
length does not re-trace.

Every proxy carries a *shadow*: the real value the op produced on the recorded inputs. Shadows answer the
questions Python control flow asks (``x.dtype == torch.float16``, ``x.dim()``, ``len(x.shape)``,
``isinstance(out, tuple)``) concretely, while shape sizes remain graph values. A question that depends on data
or sizes (``bool(proxy)``) cannot be answered safely: the submodule being traced becomes a *leaf* (an opaque
call in the graph) and tracing retries. Hugging Face attention functions (``ALL_ATTENTION_FUNCTIONS``, eager or
sdpa) are always leaf calls, so attention modules are traced through and their q/k/v/o projections stay visible.
Hooks on traced-through submodules are not fired on proxies; they are replayed at run time by a graph node.

Each capture is verified bit-exactly before use: captures made by ``inject`` against a fresh eager call of the layer
(same RNG seed), captures made lazily for a new kind of call against the values its ops produced while tracing
(one forward cheaper). A capture that would change the model's numerics is never installed.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx._symbolic_trace import _maybe_revert_all_patches, _orig_module_call
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .graphs import ATTENTION_FLAG, is_norm, replay_forward_hooks
from .provenance import annotate_features

__all__ = [
    "Capture",
    "CaptureFailure",
    "find_layer_lists",
    "guard_key",
    "record_layer_calls",
    "trace_layer",
]

SHADOW = "fxadapt_shadow"
_MISSING = object()

# Tensor attributes and methods whose answer depends only on dtype/rank/device, all of which are in the guard key.
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
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


class CaptureFailure(Exception):
    """Tracing could not continue; ``module_path`` is the innermost traced-through module when it happened."""

    def __init__(self, message: str, module_path: str = ""):
        super().__init__(message)
        self.module_path = module_path


# --------------------------------------------------------------------------------------------------------------
# Finding layers and recording their calls


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
    model: nn.Module, layers: list[nn.Module], run: Callable[[], Any]
) -> dict[int, tuple[tuple, dict]]:
    """Run ``run()`` once and return, per layer (by ``id``), the (args, kwargs) of its first call.

    Calls are recorded at the layer's ``forward`` (an instance attribute for the duration), so a parent that
    calls ``layer.forward(...)`` directly (SqueezeBERT) is seen as well as ``layer(...)``."""
    calls: dict[int, tuple[tuple, dict]] = {}
    saved: list[tuple[nn.Module, Any]] = []

    def recorder(layer: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def forward_and_record(*args: Any, **kwargs: Any) -> Any:
            calls.setdefault(id(layer), (args, dict(kwargs)))
            return forward(*args, **kwargs)

        return forward_and_record

    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward", _MISSING)))
            layer.__dict__["forward"] = recorder(layer, layer.forward)
        with torch.no_grad():
            run()
    finally:
        for layer, previous in saved:
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.__dict__["forward"] = previous
    return calls


# --------------------------------------------------------------------------------------------------------------
# Guard keys


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], tuple]:
    """Flatten a call into leaves and a structure key (plain nested tuples: hashable, also under torch.compile)."""
    leaves: list[Any] = []

    def walk(value: Any) -> Any:
        if type(value) in (tuple, list):
            return (type(value).__name__, tuple(walk(v) for v in value))
        if type(value) is dict:
            keys = tuple(value)
            return ("dict", keys, tuple(walk(value[k]) for k in keys))
        leaves.append(value)
        return None

    structure = (walk(tuple(args)), walk(dict(kwargs)))
    return leaves, structure


def unflatten_call(leaves: list[Any], structure: tuple) -> tuple[tuple, dict]:
    """Inverse of :func:`flatten_call`."""
    it = iter(leaves)

    def build(node: Any) -> Any:
        if node is None:
            return next(it)
        if node[0] == "dict":
            return {k: build(v) for k, v in zip(node[1], node[2])}
        items = [build(v) for v in node[1]]
        return tuple(items) if node[0] == "tuple" else items

    args, kwargs = build(structure[0]), build(structure[1])
    return tuple(args), kwargs


def _leaf_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, value.dim(), value.device)
    if isinstance(value, _CONSTANT_TYPES):
        return ("C", type(value), value)
    return ("O", type(value))


def _hook_state(layer: nn.Module) -> int:
    # The layer's own hooks run in its __call__, outside the generated code; only submodules' hooks are traced.
    n = 0
    for m in layer.modules():
        if m is not layer:
            n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return n


def guard_key(layer: nn.Module, leaves: list[Any], spec: tuple) -> tuple:
    """Everything a capture was specialised to: call structure, leaf dtypes/ranks/devices/constants, mode."""
    return (
        spec,
        tuple(_leaf_meta(v) for v in leaves),
        layer.training,
        _hook_state(layer),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
    )


def _is_dynamic(value: Any) -> bool:
    return not isinstance(value, _CONSTANT_TYPES)


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
        for module, name, fn in self.script_functions:
            self._saved.append((module, name, fn))
            setattr(module, name, _LeafFunction(_python_caller(fn), attention=False))
        for name in _WRAPPED_TORCH_FUNCTIONS:
            orig = getattr(torch, name)
            self._saved.append((torch, name, orig))
            setattr(torch, name, _wrap_factory(orig))
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

                setattr(cls, name, patched)
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
        path = self.path_of_module(m)
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
            if effect is None:
                self.create_proxy("call_function", check_size_guard, (obj, flag), {})
            else:  # a re-run would repeat the side effect: a call taking the other branch is an error
                self.create_proxy("call_function", check_size_assumption, (obj, flag, effect), {})
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

        args = fx.node.map_arg(node.args, shadow_of)
        kwargs = fx.node.map_arg(node.kwargs, shadow_of)
        try:
            with _maybe_revert_all_patches():
                if node.op == "get_attr":
                    return _fetch_attr(self.root, str(node.target))
                if node.op == "call_module":
                    return _orig_module_call(self.root.get_submodule(str(node.target)), *args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                if node.target is store_attribute:
                    return None  # only replayed at run time
                if node.target is replay_forward_hooks:
                    return args[3]  # hooks observe; their effect is only replayed at run time
                return node.target(*args, **kwargs)  # type: ignore[operator]
        except CaptureFailure:
            raise
        except Exception as exc:
            raise CaptureFailure(f"{node.format_node()} failed on real values: {exc}", self._where()) from exc


def check_value_guard(value: Any, expected: bool) -> None:
    """Run-time check of a branch baked in while tracing (see ``_LayerTracer.to_bool``)."""
    if bool(value) != expected:
        raise CaptureError(
            f"a captured branch assumed a flag was {expected}, but it is {bool(value)} now; this call should have "
            "been dispatched to another capture (please report this with the model type)"
        )


def _depends_only_on_objects(node: fx.Node) -> bool:
    """True if ``node`` is computed from opaque (non-tensor) inputs only: no tensor data, sizes or parameters."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        shadow = n.meta.get(SHADOW, _MISSING)
        if isinstance(shadow, (torch.Tensor, torch.Size)) or n.op in ("get_attr", "call_module"):
            return False
        if n.op == "placeholder":
            continue
        todo.extend(n.all_input_nodes)
    return True


_SHAPE_READS = {"size", "dim", "ndimension", "numel"}


def _depends_only_on_sizes(node: fx.Node) -> bool:
    """True if ``node`` is computed from tensor *sizes* only (shapes, ``size()``, ints), never tensor data."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape":
            continue  # a shape read: the tensor's values do not matter
        if n.op == "call_method" and n.target in _SHAPE_READS:
            todo.extend(a for a in n.all_input_nodes[1:])
            continue
        shadow = n.meta.get(SHADOW, _MISSING)
        if isinstance(shadow, torch.Tensor) or n.op in ("get_attr", "call_module", "placeholder"):
            return False
        todo.extend(n.all_input_nodes)
    return True


_RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.bernoulli, torch.multinomial, torch.normal}


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _first_side_effect(root: nn.Module, graph: fx.Graph) -> str | None:
    """The first op so far that a second run of the layer would repeat visibly: a mutation of an input or an
    opaque object (cache updates), a random draw, a hook replay."""
    for n in graph.nodes:
        if n.op == "call_method" and (n.target == "update" or str(n.target).endswith("_")):
            target = n.args[0] if n.args else None
            if isinstance(target, fx.Node) and (
                target.op == "placeholder" or _depends_only_on_objects(target)
            ):
                return n.format_node()
        if n.op == "call_function" and n.target is operator.setitem:
            return n.format_node()
        inplace = n.op == "call_function" and n.target in _INPLACE_OPERATORS
        if inplace and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder":
            return n.format_node()
        if n.op == "call_function" and (n.target in _RANDOM_FUNCTIONS or n.target is replay_forward_hooks):
            return n.format_node()
        if n.op == "call_function" and n.target in (torch.nn.functional.dropout, torch.dropout):
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            if training and p:
                return n.format_node()
        if n.op == "call_module":
            module = root.get_submodule(str(n.target))
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                return n.format_node()
    return None


class SizeGuardMiss(Exception):
    """Raised by generated code when a call takes another branch on sizes than the capture baked in."""


def check_size_assumption(value: Any, expected: bool, effect: str) -> None:
    """Like :func:`check_size_guard` for a branch taken after a side effect (a cache update): that call cannot be
    re-run on another capture, so taking the other branch is a clear error instead."""
    if bool(value) != expected:
        raise CaptureError(
            f"this call took another size-dependent branch ({bool(value)}) than the one fxadapt captured "
            f"({expected}) after a side effect ({effect}) it cannot repeat; capture this kind of call first with "
            "fxadapt.inject(..., example_inputs=...) of the same shapes, or report the model type"
        )


def check_size_guard(value: Any, expected: bool) -> None:
    """Run-time check of a branch on sizes baked in while tracing (see ``_LayerTracer.to_bool``)."""
    if bool(value) != expected:
        raise SizeGuardMiss()


def _guard_function(graph: fx.Graph, node: fx.Node) -> Callable[..., Any]:
    """Code computing ``node`` from the graph's inputs alone: evaluated before dispatch to pick a capture."""
    needed: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(n.all_input_nodes)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in needed:
            env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[node])
    return compile_graph(sub)


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


# --------------------------------------------------------------------------------------------------------------
# Captures


@dataclass
class Capture:
    """One traced specialisation of a layer: its graph plus how to call it."""

    graph: fx.Graph
    in_spec: tuple  # structure from flatten_call
    dynamic: tuple[int, ...]  # which flattened call leaves are graph inputs (the rest are baked constants)
    out_spec: pytree.TreeSpec
    out_slots: tuple[int | None, ...]  # per output leaf: index into the graph's outputs, or None = constant
    out_constants: tuple[Any, ...]
    leaves: tuple[str, ...]  # modules made leaves because tracing through them failed
    leaf_reasons: dict[str, str] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    value_guards: tuple[tuple[Callable[..., Any], bool], ...] = ()
    size_guards: int = 0  # branches on sizes checked inside the generated code (SizeGuardMiss on the other)
    has_opaque_inputs: bool = False  # a cache or other object is among the inputs
    device: torch.device | None = None  # of the first tensor input
    dtype: torch.dtype | None = None

    def guards_hold(self, layer: nn.Module, leaves: list[Any]) -> bool:
        """Whether the branch flags this capture baked in hold for this call."""
        dynamic = self.dynamic
        for fn, expected in self.value_guards:
            if bool(fn(layer, *[leaves[i] for i in dynamic])) != expected:
                return False
        return True

    def bind(self, code: Callable[..., Any]) -> Callable[[nn.Module, list[Any]], Any]:
        """A runner ``(layer, flat_call_leaves) -> output`` for generated code of this capture's signature."""
        dynamic, slots, consts, out_spec = self.dynamic, self.out_slots, self.out_constants, self.out_spec

        def run(layer: nn.Module, leaves: list[Any]) -> Any:
            outs = code(layer, *[leaves[i] for i in dynamic])
            values = [consts[j] if s is None else outs[s] for j, s in enumerate(slots)]
            return pytree.tree_unflatten(values, out_spec)

        return run


def _input_names(orig_forward: Callable[..., Any], args: tuple, kwargs: dict) -> list[str]:
    """Readable names for the flattened call leaves (``hidden_states``, ``position_embeddings_0``, ...)."""
    try:
        params = [p for p in inspect.signature(orig_forward).parameters if p != "self"]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        params = []
    named: dict[str, Any] = {}
    for i, a in enumerate(args):
        named[params[i] if i < len(params) else f"arg{i}"] = a
    named.update(kwargs)
    names = []
    for path, _ in pytree.tree_flatten_with_path(named)[0]:
        raw = "_".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        names.append("".join(c if c.isalnum() or c == "_" else "_" for c in raw) or "input")
    return names


def _shadow_copy(value: Any) -> Any:
    """An independent copy to trace or verify on (caches are mutated by the layer; tensors may carry grad)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _CONSTANT_TYPES):
        return value
    # Deep-copy opaque objects (caches); tensors inside may be non-leaf, which Tensor.__deepcopy__ refuses.
    orig = torch.Tensor.__deepcopy__
    torch.Tensor.__deepcopy__ = lambda self, memo: self.detach().clone()  # type: ignore[method-assign]
    try:
        return copy.deepcopy(value)
    finally:
        torch.Tensor.__deepcopy__ = orig  # type: ignore[method-assign]


def trace_layer(
    layer: nn.Module,
    orig_forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    *,
    max_retries: int = 8,
    verify: str | None = "eager",
) -> Capture:
    """Trace ``orig_forward(layer, *args, **kwargs)`` into a :class:`Capture`, verified against eager.

    Raises :class:`CaptureError` when the layer cannot be captured (even with leaves) or verification fails.
    """
    leaves, in_spec = flatten_call(args, kwargs)
    dynamic = tuple(i for i, v in enumerate(leaves) if _is_dynamic(v))
    names = _input_names(orig_forward, args, kwargs)
    forced: set[str] = set()
    reasons: dict[str, str] = {}
    last_error: CaptureFailure | None = None

    script_functions = _script_functions(layer)
    for _ in range(max_retries + 1):
        tracer = _LayerTracer(forced)
        tracer._inputs = [(names[i], _shadow_copy(leaves[i])) for i in dynamic]
        out_info: dict[str, Any] = {}

        state = _module_state(layer)

        def fn(
            root: nn.Module, *inputs: Any, _out: dict[str, Any] = out_info, _state=state, _tr=tracer
        ) -> Any:
            flat = list(leaves)
            for i, p in zip(dynamic, inputs):
                flat[i] = p
            a, kw = unflatten_call(flat, in_spec)
            out = orig_forward(root, *a, **kw)
            _state.record_writes(_tr)
            out_leaves, out_spec = pytree.tree_flatten(out)
            _out["spec"] = out_spec
            _out["leaves"] = out_leaves
            return tuple(v for v in out_leaves if isinstance(v, fx.Proxy))

        tracer._fn = fn
        try:
            with _TracePatches(script_functions), torch.no_grad(), _preserved_rng(args), state:
                torch.manual_seed(_VERIFY_SEED)  # shadows draw dropout masks as the verification run will
                graph = tracer.trace(layer)
        except CaptureFailure as failure:
            last_error = failure
            if not failure.module_path or failure.module_path in forced:
                break
            forced.add(failure.module_path)
            reasons[failure.module_path] = str(failure)
            continue

        out_slots: list[int | None] = []
        consts: list[Any] = []
        k = 0
        for v in out_info["leaves"]:
            if isinstance(v, fx.Proxy):
                out_slots.append(k)
                consts.append(None)
                k += 1
            else:
                out_slots.append(None)
                consts.append(v)
        guards = tuple((_guard_function(graph, node), flag) for node, flag in tracer.value_guards)
        annotate_features(layer, graph, SHADOW)
        traced_out = [v.node.meta.get(SHADOW) if isinstance(v, fx.Proxy) else v for v in out_info["leaves"]]
        for node in graph.nodes:  # shadows are only needed while tracing; don't keep real tensors alive
            shadow = node.meta.pop(SHADOW, None)
            node.meta["fxadapt_kind"] = _value_kind(shadow)
            if isinstance(shadow, torch.Tensor):
                node.meta["fxadapt_meta"] = (shadow.dtype, tuple(shadow.shape))
        graph.lint()
        capture = Capture(
            graph=graph,
            in_spec=in_spec,
            dynamic=dynamic,
            out_spec=out_info["spec"],
            out_slots=tuple(out_slots),
            out_constants=tuple(consts),
            leaves=tuple(sorted(forced)),
            leaf_reasons=reasons,
            input_names=tuple(names[i] for i in dynamic),
            value_guards=guards,
            size_guards=tracer.size_guards,
            has_opaque_inputs=any(not isinstance(leaves[i], torch.Tensor) for i in dynamic),
            device=next((leaves[i].device for i in dynamic if isinstance(leaves[i], torch.Tensor)), None),
            dtype=next((leaves[i].dtype for i in dynamic if isinstance(leaves[i], torch.Tensor)), None),
        )
        if verify:
            shadow_out = None if verify == "eager" else pytree.tree_unflatten(traced_out, out_info["spec"])
            _verify(layer, orig_forward, capture, leaves, args, kwargs, shadow_out)
        return capture

    where = f" in submodule {last_error.module_path!r}" if last_error and last_error.module_path else ""
    raise CaptureError(
        f"could not capture layer {type(layer).__name__}{where}: {last_error}. "
        f"Submodules made opaque so far: {sorted(forced) or 'none'}."
    )


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


class _preserved_rng:
    """Tracing and verification run ops that draw random numbers (dropout): leave the user's RNG untouched."""

    def __init__(self, args: Any):
        self.devices = sorted(
            {
                t.device.index or 0
                for t in pytree.tree_leaves(args)
                if isinstance(t, torch.Tensor) and t.device.type == "cuda"
            }
        )

    def __enter__(self) -> None:
        self._ctx = torch.random.fork_rng(devices=self.devices)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """Python code for ``graph`` as a function ``(layer, *inputs) -> tuple(outputs)``."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fxadapt {id(graph):x}>", "exec"), namespace)
    fn = namespace["forward"]
    fn.__fxadapt_src__ = code.src
    return fn


_VERIFY_SEED = 1234


def _verify(layer, orig_forward, capture: Capture, leaves, args, kwargs, expected: Any = None) -> None:
    """The generated code must reproduce, bit for bit, the layer's output on the call it was traced from: from a
    fresh eager call (``expected=None``) or from the real values computed op by op while tracing (cheaper: used
    for captures made lazily at run time)."""
    run = capture.bind(compile_graph(capture.graph))
    seed = _VERIFY_SEED
    with torch.no_grad(), _preserved_rng(args):
        if expected is None:
            torch.manual_seed(seed)
            call_leaves, structure = flatten_call(args, kwargs)
            eager_args, eager_kwargs = unflatten_call([_shadow_copy(v) for v in call_leaves], structure)
            expected = orig_forward(layer, *eager_args, **eager_kwargs)
        torch.manual_seed(seed)
        flat = [_shadow_copy(v) if i in capture.dynamic else v for i, v in enumerate(leaves)]
        got = run(layer, flat)
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if exp_spec != got_spec:
        raise CaptureError(f"captured {type(layer).__name__} returns {got_spec}, eager returns {exp_spec}")
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if isinstance(e, torch.Tensor):
            if not (isinstance(g, torch.Tensor) and e.shape == g.shape and e.dtype == g.dtype):
                raise CaptureError(
                    f"captured {type(layer).__name__} output {i} differs in shape/dtype from eager"
                )
            if not torch.equal(e, g) and not (
                e.isnan().any() and torch.equal(e.nan_to_num(), g.nan_to_num())
            ):
                diff = (e.double() - g.double()).abs().max().item()
                raise CaptureError(
                    f"captured {type(layer).__name__} output {i} differs from eager (max abs diff {diff:.3g})"
                )

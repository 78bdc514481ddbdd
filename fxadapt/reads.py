"""Attribute reads: which plain module attributes a trace baked in, and which ints it only looked up.

While a layer is traced its modules' classes are swapped for recording subclasses, so every read of a plain
scalar attribute (``self.sliding_window``, ``self.is_causal``) is noted: a sibling layer may share the capture only
where those values are equal. Int attributes are handed out as :class:`TrackedInt`; one only passed to graph ops
(``cache.update(k, v, self.layer_idx)``) becomes a run-time attribute lookup and does not constrain sharing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = ["ANY_INT", "TrackedInt", "attribute_reads", "plain_int"]


_SCALARS = (bool, int, float, str, type(None), torch.dtype)
_RECORDERS: dict[type, type] = {}
_READS = threading.local()


def _recording_class(cls: type) -> type:
    """A subclass of ``cls`` (same name and module, so fx still sees torch.nn leaves as leaves) whose attribute
    reads of plain scalar attributes are recorded while a trace runs in this thread."""
    sub = _RECORDERS.get(cls)
    if sub is None:
        get = object.__getattribute__

        def __getattribute__(self: Any, name: str) -> Any:
            value = get(self, name)
            reads = getattr(_READS, "value", None)
            if (
                reads is not None
                and name[:1] != "_"
                and name in get(self, "__dict__")
                and (
                    isinstance(value, _SCALARS)
                    or (type(value) is tuple and all(isinstance(v, _SCALARS) for v in value))
                )
            ):
                reads.setdefault((id(self), name), value)
            return value

        sub = type(
            cls.__name__,
            (cls,),
            {
                "__getattribute__": __getattribute__,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            },
        )
        _RECORDERS[cls] = sub
    return sub


class TrackedInt(int):
    """A module's int attribute (``self.layer_idx``) as the traced code sees it. Passed to a graph op, it becomes
    an attribute lookup at run time, so layers that differ only in it share one capture; used in Python while
    tracing (arithmetic, comparison, indexing a real list, hashing, formatting) it is baked like any constant and
    marked ``strict``: then sibling layers must have the same value."""

    def __new__(cls, value: int, key: tuple[str, str]) -> TrackedInt:
        obj = int.__new__(cls, value)
        obj.key, obj.strict = key, False
        return obj


def _python_use(name: str) -> Callable[..., Any]:
    base = getattr(int, name)

    def method(self: TrackedInt, *args: Any) -> Any:
        self.strict = True
        return base(int.__int__(self), *(plain_int(a) for a in args))

    method.__name__ = name
    return method


for _name in (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__floordiv__", "__rfloordiv__",
    "__truediv__", "__rtruediv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__",
    "__and__", "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rshift__", "__invert__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__", "__index__", "__int__",
    "__float__", "__str__", "__repr__", "__format__", "__round__", "__trunc__", "__floor__", "__ceil__",
    "__divmod__", "__rdivmod__", "bit_length", "to_bytes", "conjugate", "as_integer_ratio",
):  # fmt: skip
    setattr(TrackedInt, _name, _python_use(_name))


class _AnyInt:
    """Stands for "any int" in a capture's recorded reads (an attribute read only as a run-time lookup)."""

    def __eq__(self, other: object) -> bool:
        return type(other) is int

    def __ne__(self, other: object) -> bool:
        return type(other) is not int

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<any int>"


ANY_INT = _AnyInt()


def plain_int(value: Any) -> Any:
    return int.__int__(value) if isinstance(value, TrackedInt) else value


class attribute_reads:
    """While tracing ``layer``: record the plain scalar attributes (``self.sliding_window``, ``self.is_causal``) of
    its modules that the trace reads, as ``{(module path, name): value}``. Such values are baked into the graph as
    constants; a sibling layer may share the capture only where they are equal. Int attributes are handed out as
    :class:`TrackedInt`: those only passed to graph ops (``cache.update(k, v, self.layer_idx)``) become run-time
    attribute lookups (:meth:`parametrize`) and do not constrain sharing."""

    def __init__(self, layer: nn.Module):
        self.modules = list(layer.named_modules())
        self.reads: dict[tuple[str, str], Any] = {}
        self.tracked: dict[tuple[str, str], TrackedInt] = {}

    def __enter__(self) -> attribute_reads:
        self._raw: dict[tuple[int, str], Any] = {}
        self._classes = [(m, type(m)) for _, m in self.modules]
        for m, cls in self._classes:
            m.__class__ = _recording_class(cls)
        for path, m in self.modules:
            if path.split(".", 1)[0] == "fxadapt":
                continue
            for name, value in list(m.__dict__.items()):
                if type(value) is int and name[:1] != "_":
                    tracked = TrackedInt(value, (path, name))
                    self.tracked[(path, name)] = tracked
                    m.__dict__[name] = tracked
        self._previous = getattr(_READS, "value", None)
        _READS.value = self._raw
        return self

    def __exit__(self, *exc: Any) -> None:
        _READS.value = self._previous
        for m, cls in self._classes:
            m.__class__ = cls
        modules = dict(self.modules)
        for (path, name), tracked in self.tracked.items():
            m = modules[path]
            if m.__dict__.get(name) is tracked:
                m.__dict__[name] = int.__int__(tracked)
        paths = {id(m): path for path, m in self.modules}
        reads = {}
        for (i, name), v in self._raw.items():
            if i not in paths:
                continue
            key = (paths[i], name)
            if isinstance(v, fx.Proxy):
                continue  # the trace's own value, written to the module earlier in this forward (replayed)
            if isinstance(v, TrackedInt):
                # only passed to graph ops: a run-time lookup (parametrize); a sibling needs an int there too
                # (``is None`` tests on it are baked branches), of any value
                v = int.__int__(v) if v.strict else ANY_INT
            reads[key] = v
        self.reads = reads

    def parametrize(self, graph: fx.Graph, shadow_key: str) -> None:
        """Replace every :class:`TrackedInt` argument of the graph's nodes by a ``get_attr`` of its attribute, so
        that the generated code reads it from the layer it runs on. A tracked int that was also used in Python is
        a baked constant instead (and a strict read)."""
        lookups: dict[tuple[str, str], fx.Node] = {}
        first = next(iter(graph.nodes))

        def lookup(value: Any) -> Any:
            if not isinstance(value, TrackedInt):
                return value
            if value.strict:
                return int.__int__(value)
            node = lookups.get(value.key)
            if node is None:
                path, name = value.key
                with graph.inserting_before(
                    first if first.op != "placeholder" else _after_placeholders(graph)
                ):
                    node = graph.get_attr(f"{path}.{name}" if path else name)
                node.meta[shadow_key] = int.__int__(value)
                lookups[value.key] = node
            return node

        for node in list(graph.nodes):
            if node.op in ("call_function", "call_method", "call_module"):
                node.args = fx.node.map_aggregate(node.args, lookup)
                node.kwargs = fx.node.map_aggregate(node.kwargs, lookup)


def _after_placeholders(graph: fx.Graph) -> fx.Node:
    """The first node after the graph's inputs (new nodes go before it)."""
    return next(n for n in graph.nodes if n.op != "placeholder")

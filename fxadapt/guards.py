"""Guard keys and guards: what a capture was specialised to, and the run-time checks of what it assumed.

A call is flattened with pytree into leaves and a structure; tensors and opaque objects are graph inputs, the rest
constants. The **guard key** (structure, leaf dtypes/ranks/devices, constants, mode, hooks, autocast) picks a
capture. Branches a trace took on values it could not keep symbolic are *guards*: flags read from opaque inputs
(``cache.is_updated``) are checked before dispatch; branches on sizes (``if k.size(-2) != q.size(-2)``) are
checked where they were taken, in the generated code, and a call taking the other branch re-dispatches.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import CaptureError
from .graphs import replay_forward_hooks

__all__ = [
    "CaptureFailure",
    "SizeGuardMiss",
    "call_key",
    "compile_graph",
    "flatten_call",
    "guard_key",
    "hook_count",
    "hook_dicts",
    "unflatten_call",
]

SHADOW = "fxadapt_shadow"
_MISSING = object()

# Tensor attributes and methods whose answer depends only on dtype/rank/device, all of which are in the guard key.
_CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


class CaptureFailure(Exception):
    """Tracing could not continue; ``module_path`` is the innermost traced-through module when it happened."""

    def __init__(self, message: str, module_path: str = ""):
        super().__init__(message)
        self.module_path = module_path


# --------------------------------------------------------------------------------------------------------------
# Guard keys


def flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], tuple]:
    """Flatten a call into leaves and a structure key (plain nested tuples: hashable, also under torch.compile).

    Dispatch runs this on every layer call: one pass over the arguments, a walk only into containers, and one
    structure object per kind of call (so guard keys compare by identity first)."""
    leaves: list[Any] = []
    shapes: list[Any] = []
    nested = False
    for v in (*args, *kwargs.values()):
        t = type(v)
        if t is tuple or t is list or t is dict:
            nested = True
            shapes.append(_walk(v, leaves))
        else:
            leaves.append(v)
            shapes.append(None)
    names = tuple(kwargs)
    signature = (len(args), names, tuple(shapes)) if nested else (len(args), names)
    spec = _SPECS.get(signature)
    if spec is None:
        n = len(args)
        spec = (("tuple", tuple(shapes[:n])), ("dict", names, tuple(shapes[n:])))
        if len(_SPECS) < 1024:
            _SPECS[signature] = spec
    return leaves, spec


_SPECS: dict[tuple, tuple] = {}  # (positional count, keyword names[, nested shapes]) -> structure


def _walk(value: Any, leaves: list[Any]) -> Any:
    t = type(value)
    if t is dict:
        keys = tuple(value)
        return ("dict", keys, tuple([_walk(value[k], leaves) for k in keys]))
    if t is tuple or t is list:
        return (t.__name__, tuple([_walk(v, leaves) for v in value]))
    leaves.append(value)
    return None


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


_NONE_META = ("C", type(None), None)


def _leaf_meta(value: Any) -> Any:
    if value is None:  # most leaves of a layer call (unused optional arguments)
        return _NONE_META
    if isinstance(value, torch.Tensor):
        return ("T", value.dtype, value.dim(), value.device)
    if isinstance(value, _CONSTANT_TYPES):
        return ("C", type(value), value)
    return ("O", type(value))


def hook_dicts(layer: nn.Module) -> tuple[dict, ...]:
    """The hook dicts that matter to a capture: those of the submodules generated code traces through. The layer's
    own hooks run in its ``__call__``, outside the generated code. A module without children, like each of
    fxadapt's adapter modules, is always a leaf call of the generated code (``tracer.is_leaf_module``): its hooks
    fire as usual and cannot change a capture. Cached per layer (``LayerState.hooks``): counting is a few ``len``
    calls, not a module walk per call."""
    out: list[dict] = []
    for name, m in layer.named_modules():
        if m is layer or name.split(".", 1)[0] == "fxadapt":  # "fxadapt": the adapter container (model.py)
            continue
        if next(m.children(), None) is not None:
            out += (m._forward_hooks, m._forward_pre_hooks)
    return tuple(out)


def hook_count(dicts: tuple[dict, ...]) -> int:
    return sum(map(len, dicts)) if any(dicts) else 0  # usually none: one C-level pass over the dicts


def guard_key(layer: nn.Module, leaves: list[Any], spec: tuple, hooks: int | None = None) -> tuple:
    """Everything a capture was specialised to: call structure, leaf dtypes/ranks/devices/constants, mode, the
    number of hooks on traced-through submodules (``hooks``, or counted now), autocast."""
    if hooks is None:
        hooks = hook_count(hook_dicts(layer))
    metas = tuple([_NONE_META if v is None else _leaf_meta(v) for v in leaves])  # most leaves are None
    if torch._C._is_any_autocast_enabled():
        return (
            spec,
            metas,
            layer.training,
            hooks,
            torch.is_autocast_enabled("cpu"),
            torch.is_autocast_enabled("cuda"),
        )
    return spec, metas, layer.training, hooks, False, False  # the usual case: one check instead of two


def call_key(layer: nn.Module, args: tuple, kwargs: dict, hooks: int) -> tuple[list[Any], tuple, tuple]:
    """``(leaves, spec, key)`` of a layer call: what :func:`flatten_call` and :func:`guard_key` return, computed
    on dispatch's hot path by code generated once per kind of call (positional count and keyword names). That code
    unpacks the arguments straight into leaves, checks that nested containers still have the sampled types and
    lengths, and builds the leaf metadata inline. A call that differs (another nesting, a container where a leaf
    was, autocast on) takes the general path, with the same result."""
    sig = (len(args), tuple(kwargs))
    keyer = _KEYERS.get(sig, _MISSING)
    if keyer is _MISSING:
        keyer = _make_keyer(sig, args, kwargs, [])
        if len(_KEYERS) < 1024:
            _KEYERS[sig] = keyer
    if keyer is not None and not torch._C._is_any_autocast_enabled():
        try:
            return keyer(args, kwargs, layer.training, hooks)
        except _Restructured:
            pass
    leaves, spec = flatten_call(args, kwargs)
    return leaves, spec, guard_key(layer, leaves, spec, hooks)


_KEYERS: dict[tuple, Any] = {}  # (positional count, keyword names) -> generated keyer, or None (general path)


class _Restructured(Exception):
    """Raised by a generated keyer for a call whose nesting differs from the one it was generated for."""


def _checked_meta(value: Any) -> Any:
    """``_leaf_meta`` for a generated keyer's leaf position, which must not hold a container now."""
    t = type(value)
    if t is tuple or t is list or t is dict:
        raise _Restructured
    return _leaf_meta(value)


_FAST_KINDS = 4  # the kinds of call (per call structure) whose keys a generated keyer returns ready-made


def _make_keyer(sig: tuple, args: tuple, kwargs: dict, kinds: list[tuple]) -> Callable[..., Any] | None:
    """Generate the keyer for calls shaped like this one (see :func:`call_key`); None where nesting is too deep
    or holds a dict (rare in layer calls: the general path serves them).

    ``kinds``: up to ``_FAST_KINDS`` samples ``(leaf metadata, training, hooks, key)`` already seen (``_sample_meta``). A call whose leaves
    match a sample's (the same tensor types, dtypes, ranks and devices, the same constants, mode and hook count:
    a model's next call of a kind it made before) gets that sample's key object itself, built once: no metadata
    tuples are built, and dispatch finds its code by identity (``install._dispatch_forward``). Any other call
    builds its key as the general path would; the first calls of a new kind regenerate the keyer with it added."""
    _, spec = flatten_call(args, kwargs)
    lines: list[str] = []
    leaves: list[str] = []

    def emit(var: str, value: Any, depth: int) -> bool:
        t = type(value)
        if t is dict or depth > 4:
            return False
        if t is tuple or t is list:
            lines.append(f"    if type({var}) is not {t.__name__} or len({var}) != {len(value)}: raise R")
            subs = [f"{var}_{i}" for i in range(len(value))]
            if subs:
                lines.append(f"    {', '.join(subs)}, = {var}")
            return all(emit(sub, v, depth + 1) for sub, v in zip(subs, value))
        leaves.append(var)
        return True

    top = [f"a{i}" for i in range(len(args))] + [f"k{i}" for i in range(len(kwargs))]
    if args:
        lines.append(f"    {', '.join(top[: len(args)])}, = args")
    if kwargs:
        lines.append(f"    {', '.join(top[len(args) :])}, = kwargs.values()")
    if not all(emit(var, v, 0) for var, v in zip(top, (*args, *kwargs.values()))):
        return None
    namespace: dict[str, Any] = {
        "R": _Restructured,
        "N": _NONE_META,
        "Tensor": torch.Tensor,
        "M": _checked_meta,
    }
    out = ", ".join(leaves)
    for n, (samples, training, hooks, key) in enumerate(kinds):
        same = _same_kind(n, leaves, samples, training, hooks, namespace)
        lines.append(f"    if {same}: return [{out}], S, K{n}")
        namespace[f"K{n}"] = key  # the very object earlier calls of this kind got
    metas = [f"N if {v} is None else (('T', {v}.dtype, {v}.dim(), {v}.device) if type({v}) is Tensor else M({v}))"
             for v in leaves]  # fmt: skip
    lines.append(f"    key = (S, ({''.join(m + ', ' for m in metas)}), training, hooks, False, False)")
    if len(kinds) < _FAST_KINDS:  # learn this kind of call: its next calls get a ready-made key
        lines.append(f"    L(args, kwargs, [{out}], training, hooks, key)")

        def learn(args: tuple, kwargs: dict, values: list, training: bool, hooks: int, key: tuple) -> None:
            if type(training) is bool and type(hooks) is int:  # a sample's metadata, not its values (no refs)
                kind = ([_sample_meta(v) for v in values], training, hooks, key)
                _KEYERS[sig] = _make_keyer(sig, args, kwargs, [*kinds, kind])

        namespace["L"] = learn
    lines.append(f"    return [{out}], S, key")
    namespace["S"] = spec
    src = "def keyer(args, kwargs, training, hooks):\n" + "\n".join(lines) + "\n"
    exec(compile(src, "<fxadapt call keyer>", "exec"), namespace)
    return namespace["keyer"]


def _sample_meta(value: Any) -> tuple | None:
    """What a keyer keeps of a sample leaf: None, or ``(type, leaf meta)``."""
    return None if value is None else (type(value), _leaf_meta(value))


def _same_kind(n: int, leaves: list[str], samples: list, training: bool, hooks: int, namespace: dict) -> str:
    """The generated condition: this call's leaves (variables ``leaves``) match sample ``n`` (``_sample_meta``
    of each leaf), so that its key is that sample's."""
    same = [f"training is {training!r}", f"hooks == {hooks!r}"]
    for i, (var, sample) in enumerate(zip(leaves, samples)):
        name = f"{n}_{i}"
        if sample is None:
            same.append(f"{var} is None")
            continue
        kind, meta = sample
        namespace[f"T{name}"] = kind
        same.append(f"type({var}) is T{name}")
        if meta[0] == "T":
            namespace[f"D{name}"], namespace[f"V{name}"] = meta[1], meta[3]
            same.append(f"{var}.dtype is D{name} and {var}.dim() == {meta[2]!r} and {var}.device == V{name}")
        elif meta[0] == "C":
            namespace[f"C{name}"] = meta[2]
            same.append(f"{var} == C{name}")
    return " and ".join(same)


def _is_dynamic(value: Any) -> bool:
    return not isinstance(value, _CONSTANT_TYPES)


def check_value_guard(value: Any, expected: bool) -> None:
    """Run-time check of a branch baked in while tracing (see ``_LayerTracer.to_bool``)."""
    if bool(value) != expected:
        raise CaptureError(
            f"a captured branch assumed a flag was {expected}, but it is {bool(value)} now; this call should have "
            "been dispatched to another capture (please report this with the model type)"
        )


def _upstream_all(node: fx.Node, step: Callable[[fx.Node], Any]) -> bool:
    """Walk ``node`` and what it is computed from, each node once: ``step(n)`` returns False (the answer is no) or
    the nodes to walk on from ``n``. True if no step said no."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        more = step(n)
        if more is False:
            return False
        todo.extend(more)
    return True


def _depends_only_on_objects(node: fx.Node) -> bool:
    """True if ``node`` is computed from opaque (non-tensor) inputs only: no tensor data, sizes or parameters."""

    def step(n: fx.Node) -> Any:
        shadow = n.meta.get(SHADOW, _MISSING)
        if isinstance(shadow, (torch.Tensor, torch.Size)) or n.op in ("get_attr", "call_module"):
            return False
        return () if n.op == "placeholder" else n.all_input_nodes

    return _upstream_all(node, step)


_SHAPE_READS = {"size", "dim", "ndimension", "numel"}


def _depends_only_on_sizes(node: fx.Node) -> bool:
    """True if ``node`` is computed from tensor *sizes* only (shapes, ``size()``, ints), never tensor data."""

    def step(n: fx.Node) -> Any:
        if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] == "shape":
            return ()  # a shape read: the tensor's values do not matter
        if n.op == "call_method" and n.target in _SHAPE_READS:
            return n.all_input_nodes[1:]
        shadow = n.meta.get(SHADOW, _MISSING)
        if isinstance(shadow, torch.Tensor) or n.op in ("get_attr", "call_module", "placeholder"):
            return False
        return n.all_input_nodes

    return _upstream_all(node, step)


_RANDOM_FUNCTIONS = {torch.rand, torch.randn, torch.randint, torch.bernoulli, torch.multinomial, torch.normal}


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _first_side_effect(root: nn.Module, graph: fx.Graph) -> fx.Node | None:
    """The first op so far that a second run of the layer would repeat visibly: a mutation of an input or an
    opaque object (cache updates), a random draw, a hook replay."""
    for n in graph.nodes:
        if n.op == "call_method" and (n.target == "update" or str(n.target).endswith("_")):
            target = n.args[0] if n.args else None
            if isinstance(target, fx.Node) and (
                target.op == "placeholder" or _depends_only_on_objects(target)
            ):
                return n
        if n.op == "call_function" and n.target is operator.setitem:
            return n
        inplace = n.op == "call_function" and n.target in _INPLACE_OPERATORS
        if inplace and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder":
            return n
        if n.op == "call_function" and (n.target in _RANDOM_FUNCTIONS or n.target is replay_forward_hooks):
            return n
        if n.op == "call_function" and n.target in (torch.nn.functional.dropout, torch.dropout):
            training = n.kwargs.get("training", n.args[2] if len(n.args) > 2 else True)
            p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
            if training and p:
                return n
        if n.op == "call_module":
            module = root.get_submodule(str(n.target))
            if isinstance(module, nn.Dropout) and module.training and module.p > 0:
                return n
    return None


def hoistable_before(graph: fx.Graph, node: fx.Node, effect: fx.Node) -> list[fx.Node] | None:
    """The nodes to move before ``effect`` so that the size expression ``node`` is computed ahead of it, or None
    if it reads something ``effect`` or a later tensor op produced. A branch on the sizes of tensors computed
    before a cache update (``is_causal = query.shape[2] > 1`` in the attention function) is then checked before
    the update, where a call taking the other branch can still re-dispatch."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    limit = order[effect]
    moved, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if order[n] < limit:
            continue
        if n is effect or n.op not in ("call_function", "call_method"):
            return None
        if isinstance(n.meta.get(SHADOW), torch.Tensor):  # only size arithmetic moves, never a tensor op
            return None
        moved.append(n)
        todo.extend(n.all_input_nodes)
    return sorted(moved, key=order.__getitem__)


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


def compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """Python code for ``graph`` as a function ``(layer, *inputs) -> tuple(outputs)``."""
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, f"<fxadapt {id(graph):x}>", "exec"), namespace)
    fn = namespace["forward"]
    fn.__fxadapt_src__ = code.src
    return fn

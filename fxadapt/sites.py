"""Sites: named places in a captured layer graph where adapters attach.

Residual sites come from graph structure, not module names: a residual ``add`` whose one operand is produced
(through dropout, casts and tuple indexing) by a Linear-like call or a leaf attention call, and whose other
operand is the residual stream. The producer's module scope decides the kind:

===========  =====================================================================================
kind         the producer lies in ...
===========  =====================================================================================
attn.out     a module scope that performs self-attention (the attention call reads the layer input)
cross.out    a scope whose attention reads keys from elsewhere (encoder states or a cross cache)
ffn.out      any other scope (the feed-forward block)
===========  =====================================================================================

A post-LN layer (BERT family, BART) normalises the add right away: the norm becomes part of the site, since
adapters such as ``seq_bn`` apply it themselves. Module sites (``attn.q/k/v/o``, ``ffn.up/gate/down``) are the
Linear calls themselves, classified by data flow into and out of the attention call.

Every rejected candidate keeps its reason, so ``explain()`` can say why an add is not a site.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .capture import is_attention_function, replay_forward_hooks

__all__ = [
    "MODULE_SITE_KINDS",
    "RESIDUAL_SITE_KINDS",
    "SITE_KINDS",
    "ModuleSite",
    "ResidualSite",
    "SiteReport",
    "find_sites",
]

# The site table: kind -> what it is. Shared by every method; a new kind is one row here plus its rule below.
RESIDUAL_SITE_KINDS: dict[str, str] = {
    "attn.out": "self-attention output on the residual stream",
    "cross.out": "cross-attention output on the residual stream (encoder-decoder models)",
    "ffn.out": "feed-forward output on the residual stream",
}
MODULE_SITE_KINDS: dict[str, str] = {
    "attn.q": "query projection",
    "attn.k": "key projection",
    "attn.v": "value projection",
    "attn.qkv": "fused query/key/value projection",
    "attn.o": "attention output projection",
    "cross.q": "cross-attention query projection",
    "cross.k": "cross-attention key projection",
    "cross.v": "cross-attention value projection",
    "cross.o": "cross-attention output projection",
    "ffn.up": "feed-forward up projection",
    "ffn.gate": "feed-forward gate projection",
    "ffn.down": "feed-forward down projection",
}
SITE_KINDS = {**RESIDUAL_SITE_KINDS, **MODULE_SITE_KINDS}

_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout}
_CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "contiguous", "type_as"}
_SOFTMAX_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
# fused attention ops called directly by some modelling code (BERT's SDPA path in transformers 4.x)
_ATTENTION_OPS = {torch.nn.functional.scaled_dot_product_attention}


@dataclass(frozen=True)
class ResidualSite:
    """A residual add ``h + x`` (optionally followed by a norm) where a bottleneck adapter can attach."""

    kind: str
    add: str  # node name of the residual add
    h: str  # operand from the sublayer (after dropout)
    x: str  # operand from the residual stream
    norm: str | None  # node name of the post-LN call normalising the add, if any
    producer: str  # module path (or function) producing h
    hidden_size: int = 0  # last dimension of the residual stream

    @property
    def output(self) -> str:
        """The node whose value leaves the site (the norm for post-LN layers, else the add)."""
        return self.norm or self.add


@dataclass(frozen=True)
class ModuleSite:
    """A Linear-like call (``attn.q``, ``ffn.up``, ...); for a fused projection (GPT-2's ``c_attn``), the slice of
    its output features that is this site's (``attn.q`` = ``c_attn`` outputs ``[0, d)``)."""

    kind: str
    module: str  # module path inside the layer
    node: str
    out_slice: tuple[int, int] | None = None


@dataclass(frozen=True)
class AttentionSite:
    """An attention call (``attn.kv`` / ``cross.kv``): its key/value inputs, after RoPE, where prefixes attach."""

    kind: str
    node: str
    kv_heads: int
    head_dim: int
    scope: str  # module path of the attention module
    q_heads: int = 0
    first: int = 1  # index of the query argument: 1 for HF attention functions (module first), 0 for SDPA


@dataclass
class SiteReport:
    residual: list[ResidualSite] = field(default_factory=list)
    modules: list[ModuleSite] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    linears: dict[str, str] = field(default_factory=dict)  # every Linear-like call: module path -> node name
    attention: list[AttentionSite] = field(default_factory=list)

    def residual_by_kind(self) -> dict[str, ResidualSite]:
        return {s.kind: s for s in self.residual}

    def module_by_kind(self) -> dict[str, ModuleSite]:
        return {s.kind: s for s in self.modules}

    def site(self, kind: str) -> ResidualSite | ModuleSite | None:
        """The site of a kind: a residual or module kind, or ``linear:<path>`` for any Linear call by path."""
        if kind.startswith("linear:"):
            path = kind[len("linear:") :]
            return ModuleSite(kind, path, self.linears[path]) if path in self.linears else None
        return (
            self.residual_by_kind().get(kind)
            or self.module_by_kind().get(kind)
            or next((a for a in self.attention if a.kind == kind), None)
        )

    def kinds(self) -> list[str]:
        return (
            [s.kind for s in self.residual]
            + [s.kind for s in self.modules]
            + [a.kind for a in self.attention]
        )


def _module_of(root: nn.Module, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def is_linear_like(module: nn.Module | None) -> bool:
    """nn.Linear and subclasses, HF's Conv1D, and other parameter-holding leaves with a 2-D weight."""
    if module is None or isinstance(module, nn.Embedding):
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and next(module.children(), None) is None


def is_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    return type(module).__name__.lower().endswith("norm")


def _is_attention_leaf(root: nn.Module, node: fx.Node) -> bool:
    if is_attention_function(node):
        return True
    module = _module_of(root, node)
    return module is not None and "attention" in type(module).__name__.lower()


def _is_softmax(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_function" and (node.target in _SOFTMAX_FUNCTIONS or node.target in _ATTENTION_OPS):
        return True
    if node.op == "call_method" and node.target == "softmax":
        return True
    return isinstance(_module_of(root, node), nn.Softmax)


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def _ancestors(node: fx.Node, tensors_only: bool = False) -> set[fx.Node]:
    """Nodes ``node`` depends on; with ``tensors_only``, through tensor data flow only (not through sizes)."""
    inputs = _tensor_inputs if tensors_only else (lambda n: n.all_input_nodes)
    seen: set[fx.Node] = set()
    todo = list(inputs(node))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(inputs(n))
    return seen


def _through_transparent(root: nn.Module, node: fx.Node) -> fx.Node:
    """Walk back through dropout, casts, hook replays and ``[0]`` of tuple-returning calls."""
    while True:
        if (
            (node.op == "call_module" and isinstance(_module_of(root, node), nn.Dropout))
            or (node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS)
            or (node.op == "call_method" and node.target in _CAST_METHODS)
        ):
            node = node.args[0]  # type: ignore[assignment]
        elif node.op == "call_function" and node.target is replay_forward_hooks:
            node = node.args[3]  # type: ignore[assignment]
        elif node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            node = node.args[0]  # type: ignore[assignment]
        else:
            return node
        if not isinstance(node, fx.Node):
            return node  # type: ignore[return-value]


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (sizes and shapes are not data flow for site classification)."""
    return [n for n in node.all_input_nodes if n.meta.get("fxadapt_kind") != "size"]


def _tensor_shape(node: object) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("fxadapt_meta")
    return meta[1] if meta else None


@dataclass
class _Scope:
    path: str
    cross: bool


def _attention_scopes(root: nn.Module, graph: fx.Graph, primary: fx.Node | None) -> list[_Scope]:
    scopes: list[_Scope] = []
    for node in graph.nodes:
        if not (_is_attention_leaf(root, node) or _is_softmax(root, node)):
            continue
        paths = _stack_paths(node)
        if not paths:
            continue
        path = paths[0]
        if any(s.path == path for s in scopes):
            continue
        if is_attention_function(node) and len(node.args) > 2 and isinstance(node.args[2], fx.Node):
            keys_from = node.args[2]  # HF attention functions: (module, query, key, value, ...)
        elif node.op == "call_function" and node.target in _ATTENTION_OPS and len(node.args) > 1:
            keys_from = node.args[1]  # sdpa(query, key, value, ...)
        else:
            keys_from = node
        cross = (
            primary is not None
            and keys_from is not primary
            and primary not in _ancestors(keys_from, tensors_only=True)
        )
        if not cross and primary is not None and keys_from is node and node.all_input_nodes:
            # hand-written attention (softmax(q @ kᵀ)): cross if every score matmul reads keys from other states
            matmuls = _nearest_matmuls(node.all_input_nodes[0])
            cross = bool(matmuls) and all(
                primary not in _ancestors(mm.args[1], tensors_only=True)
                for mm in matmuls
                if isinstance(mm.args[1], fx.Node)
            )
        scopes.append(_Scope(path, cross))
    return scopes


_MATMULS = {torch.matmul, torch.bmm, operator.matmul}


def _nearest_matmuls(start: fx.Node) -> list[fx.Node]:
    """Matmul nodes reached walking back from ``start`` along tensor inputs, stopping at the first on each path."""
    found, todo, seen = [], [start], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if (n.op == "call_function" and n.target in _MATMULS) or (
            n.op == "call_method" and n.target in ("matmul", "bmm")
        ):
            found.append(n)
            continue
        todo.extend(_tensor_inputs(n))
    return found


def _scope_of(path: str, scopes: Iterable[_Scope]) -> _Scope | None:
    for s in scopes:
        if path == s.path or path.startswith(s.path + "."):
            return s
    return None


def _producer_path(root: nn.Module, node: fx.Node) -> str | None:
    """Module path of a Linear-like or attention producer, else None."""
    if node.op == "call_module":
        module = _module_of(root, node)
        if is_linear_like(module) or _is_attention_leaf(root, node):
            return str(node.target)
        return None
    if is_attention_function(node):
        paths = _stack_paths(node)
        return paths[-1] if paths else ""
    return None


def find_sites(root: nn.Module, graph: fx.Graph) -> SiteReport:
    """Find residual and module sites in a captured layer graph (see the module docstring for the rules)."""
    report = SiteReport()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    primary = placeholders[0] if placeholders else None
    scopes = _attention_scopes(root, graph, primary)

    def kind_for(path: str, prefix_self: str, prefix_cross: str, default: str) -> str:
        scope = _scope_of(path, scopes)
        if scope is None:
            return default
        return prefix_cross if scope.cross else prefix_self

    seen_kinds: dict[str, int] = {}
    for node in graph.nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_TARGETS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        a, b = node.args
        shape = _tensor_shape(node)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or shape is None:
            continue
        if _tensor_shape(a) != shape or _tensor_shape(b) != shape:
            report.rejected.append(
                (node.name, "operands differ in shape from the result (a broadcast, not a residual)")
            )
            continue
        producers = [_producer_path(root, _through_transparent(root, op)) for op in (a, b)]
        if producers[0] is not None and producers[1] is not None:
            report.rejected.append(
                (
                    node.name,
                    f"both operands come from projections ({producers[0]}, {producers[1]}): no residual stream",
                )
            )
            continue
        if producers[0] is None and producers[1] is None:
            report.rejected.append((node.name, "neither operand comes from a Linear-like or attention call"))
            continue
        h, x = (a, b) if producers[0] is not None else (b, a)
        producer = producers[0] if producers[0] is not None else producers[1]
        assert producer is not None
        if h in _ancestors(x) or h is x:
            report.rejected.append((node.name, "the residual operand depends on the sublayer output"))
            continue
        kind = kind_for(producer, "attn.out", "cross.out", "ffn.out")
        count = seen_kinds.get(kind, 0)
        seen_kinds[kind] = count + 1
        if count:
            kind = f"{kind}.{count}"
        norm = None
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and is_norm(_module_of(root, users[0]))
            and users[0].args
            and users[0].args[0] is node
        ):
            norm = users[0].name
        report.residual.append(ResidualSite(kind, node.name, h.name, x.name, norm, producer, int(shape[-1])))

    report.modules = _module_sites(root, graph, scopes, report.residual)
    for node in graph.nodes:
        # HF attention functions take (module, query, key, value, mask, ...); the fused SDPA op (query, key, ...)
        first = 1 if is_attention_function(node) else 0
        if not (first or (node.op == "call_function" and node.target in _ATTENTION_OPS)):
            continue
        if len(node.args) < first + 3 or not isinstance(node.args[first + 1], fx.Node):
            continue
        meta = node.args[first + 1].meta.get("fxadapt_meta")
        q = node.args[first]
        q_meta = q.meta.get("fxadapt_meta") if isinstance(q, fx.Node) else None
        stack = _stack_paths(node)
        scope = _scope_of(stack[-1] if stack else "", scopes)
        if meta and len(meta[1]) == 4:
            kind = "cross.kv" if scope is not None and scope.cross else "attn.kv"
            if all(a.kind != kind for a in report.attention):
                q_heads = q_meta[1][1] if q_meta and len(q_meta[1]) == 4 else meta[1][1]
                report.attention.append(
                    AttentionSite(
                        kind, node.name, meta[1][1], meta[1][3], stack[0] if stack else "", q_heads, first
                    )
                )
    for node in graph.nodes:
        if node.op == "call_module" and is_linear_like(_module_of(root, node)):
            report.linears.setdefault(str(node.target), node.name)
    return report


def _module_sites(
    root: nn.Module, graph: fx.Graph, scopes: list[_Scope], residual: list[ResidualSite]
) -> list[ModuleSite]:
    nodes = {n.name: n for n in graph.nodes}
    linear_calls = [n for n in graph.nodes if n.op == "call_module" and is_linear_like(_module_of(root, n))]
    attention_calls = [
        n
        for n in graph.nodes
        if is_attention_function(n) or (n.op == "call_function" and n.target in _ATTENTION_OPS)
    ]
    sites: list[ModuleSite] = []
    assigned: set[str] = set()

    def nearest_linears(start: fx.Node) -> list[fx.Node]:
        """Linear calls reached walking back from ``start`` without passing through another Linear."""
        found, todo, seen = [], [start], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in linear_calls:
                found.append(n)
                continue
            todo.extend(_tensor_inputs(n))
        return found

    def add(kind: str, node: fx.Node, out_slice: tuple[int, int] | None = None) -> None:
        if out_slice is None and node.name in assigned:
            return
        assigned.add(node.name)
        sites.append(ModuleSite(kind, str(node.target), node.name, out_slice))

    for call in attention_calls:
        scope = _scope_of(_stack_paths(call)[-1] if _stack_paths(call) else "", scopes)
        prefix = "cross" if scope is not None and scope.cross else "attn"
        first = 1 if is_attention_function(call) else 0  # HF functions take the module first
        qkv = [_through_cache(a) if isinstance(a, fx.Node) else None for a in call.args[first : first + 3]]
        producers = [nearest_linears(a) if a is not None else [] for a in qkv]
        flat = [p[0] if len(p) == 1 else None for p in producers]
        if flat[0] is not None and flat[0] is flat[1] is flat[2]:
            add(f"{prefix}.qkv", flat[0])
            for role, arg, out_slice in zip("qkv", qkv, _split_slices(flat[0], qkv)):
                if arg is not None and out_slice is not None:
                    add(f"{prefix}.{role}", flat[0], out_slice)
        else:
            for role, p in zip(("q", "k", "v"), flat):
                if p is not None:
                    add(f"{prefix}.{role}", p)
        for n in linear_calls:  # the output projection consumes the attention result
            if call in _ancestors(n) and scope is not None and _scope_of(str(n.target), [scope]):
                add(f"{prefix}.o", n)
                break

    for site in residual:
        if not site.kind.startswith("ffn.out"):
            continue
        h = _through_transparent(root, nodes[site.h])
        if h not in linear_calls:
            continue
        add("ffn.down", h)
        inner = [n for n in nearest_linears_inputs(h, linear_calls) if n.name not in assigned]
        if len(inner) == 1:
            add("ffn.up", inner[0])
        elif len(inner) == 2:
            gate = next((n for n in inner if _feeds_activation(root, n)), None)
            if gate is not None:
                add("ffn.gate", gate)
                add("ffn.up", next(n for n in inner if n is not gate))
    return sites


def _through_cache(node: fx.Node) -> fx.Node:
    """``cache.update(key, value, ...)[i]`` → the key (i=0) or value (i=1) states written into the cache, so that
    k/v projections are found when the layer runs with a cache (``use_cache=True``, generation)."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] in (0, 1):
        update = node.args[0]
        if (
            isinstance(update, fx.Node)
            and update.op == "call_method"
            and update.target == "update"
            and len(update.args) >= 3
            and isinstance(update.args[1 + node.args[1]], fx.Node)
        ):
            return update.args[1 + node.args[1]]  # type: ignore[return-value]
    return node


def _split_slices(fused: fx.Node, args: list[fx.Node | None]) -> list[tuple[int, int] | None]:
    """Output-feature slices of a fused projection that reach each of ``args`` through ``split(...)[i]``."""
    meta = fused.meta.get("fxadapt_meta")
    out = [None] * len(args)
    if not meta:
        return out
    width, ndim = meta[1][-1], len(meta[1])
    for user in fused.users:
        is_split = (user.op == "call_method" and user.target == "split") or (
            user.op == "call_function" and user.target is torch.split
        )
        if not is_split or len(user.args) < 2:
            continue
        dim = user.kwargs.get("dim", user.args[2] if len(user.args) > 2 else 0)
        if dim not in (-1, ndim - 1):
            continue
        size = user.args[1]
        sizes = list(size) if isinstance(size, (list, tuple)) else [size] * (width // size if size else 0)
        if not all(isinstance(v, int) for v in sizes) or sum(sizes) != width:
            continue
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        pieces = {
            g.args[1]: g for g in user.users if g.target is operator.getitem and isinstance(g.args[1], int)
        }
        for j, arg in enumerate(args):
            if arg is None:
                continue
            reach = _ancestors(arg, tensors_only=True) | {arg}
            hit = [i for i, g in pieces.items() if g in reach]
            if len(hit) == 1:
                out[j] = (bounds[hit[0]], bounds[hit[0] + 1])
    return out


def nearest_linears_inputs(node: fx.Node, linear_calls: list[fx.Node]) -> list[fx.Node]:
    """Linear calls feeding ``node``'s inputs, stopping at the first Linear on each path."""
    found: list[fx.Node] = []
    todo, seen = _tensor_inputs(node), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in linear_calls:
            if n not in found:
                found.append(n)
            continue
        todo.extend(n.all_input_nodes)
    return sorted(found, key=lambda n: list(n.graph.nodes).index(n))


def _feeds_activation(root: nn.Module, node: fx.Node) -> bool:
    for user in node.users:
        if user.op == "call_module":
            module = _module_of(root, user)
            if module is not None and not is_linear_like(module) and not isinstance(module, nn.Dropout):
                return True
        if user.op == "call_function" and getattr(user.target, "__module__", "").startswith(
            "torch.nn.functional"
        ):
            return True
        if user.op == "call_function" and user.target in (torch.sigmoid, torch.tanh, torch.relu):
            return True
    return False

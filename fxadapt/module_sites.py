"""Module sites (the projections, by data flow) and attention sites (prefix tuning) of a captured layer: the second
half of :func:`fxadapt.sites.find_sites` (see its module docstring for the rules), on its ``_Layer`` view."""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from .graphs import (
    ATTENTION_OPS,
    ancestors,
    is_attention_function,
    is_matmul,
    is_movement,
    is_projection,
    module_of,
    pass_through_input,
    tensor_inputs,
    tensor_shape,
    weight_owner,
)
from .provenance import FEATURES
from .sites import (
    AttentionSite,
    ModuleSite,
    SiteReport,
    _Layer,
    _matmul_operands,
    _qkv_args,
    _score_operands,
    _stack_paths,
    is_attention_softmax,
)

__all__ = ["attention_sites", "module_sites"]

# ---------------------------------------------------------------------------------------------------------------
# module sites


def _projections_back(layer: _Layer, start: fx.Node) -> dict[str, tuple[fx.Node, set[tuple[int, int]]]]:
    """Projections feeding ``start`` (stopping at the first on each path), with the output features that reach
    it: ``{projection node name: (node, ranges)}``. Where parts of a fused projection arrive, the whole of it
    arriving too is side data (ModernBERT's rotary embedding reads the q/k/v tensor for its dtype) and is not
    counted."""
    parts: dict[str, list[tuple[tuple[int, int], ...]]] = {}
    todo, seen = [start], set()
    while todo:
        n = todo.pop()
        if n in seen or n in layer.stream:
            continue
        seen.add(n)
        features = n.meta.get(FEATURES)
        if features is None and is_projection(layer.root, n):
            features = (n.name, ((0, (tensor_shape(n) or (0,))[-1]),))
        if features is not None:
            parts.setdefault(features[0], []).append(tuple(features[1]))
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] in (0, 1):
            n = _through_cache(n)
        todo.extend(tensor_inputs(n))
    found: dict[str, tuple[fx.Node, set[tuple[int, int]]]] = {}
    for source, pieces in parts.items():
        node = layer.nodes[source]
        whole = ((0, (tensor_shape(node) or (0,))[-1]),)
        specific = [p for p in pieces if p != whole] or pieces
        found[source] = (node, {r for p in specific for r in p})
    return found


def _merge(ranges: set[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


class _Sites:
    def __init__(self, layer: _Layer):
        self.layer = layer
        self.sites: list[ModuleSite] = []
        self.taken: set[tuple[str, tuple | None]] = set()
        self.calls: dict[str, list[str]] = {}
        for n in layer.graph.nodes:
            if n.op == "call_module" and is_projection(layer.root, n):
                self.calls.setdefault(str(n.target), []).append(n.name)
            elif (owner := weight_owner(layer.root, n)) is not None:
                self.calls.setdefault(owner, []).append(n.name)

    def add(self, kind: str, node: fx.Node, ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        if any(s.kind == kind for s in self.sites):
            return
        width = (tensor_shape(node) or (0,))[-1]
        if ranges is not None and ranges == ((0, width),):
            ranges = None
        key = (node.name, ranges)
        if ranges is None and key in self.taken:
            return
        self.taken.add(key)
        module = (
            str(node.target) if node.op == "call_module" else weight_owner(self.layer.root, node) or node.name
        )
        nodes = tuple(self.calls.get(module, [node.name]))
        self.sites.append(ModuleSite(kind, module, node.name, ranges, nodes))


def _attention_roles(
    layer: _Layer, node: fx.Node
) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node], fx.Node]:
    """(query operands, key operands, value operands, attention output) of an attention call or softmax."""
    root = layer.root
    if is_attention_function(node) or (node.op == "call_function" and node.target in ATTENTION_OPS):
        q, k, v = ([_through_cache(a)] if a is not None else [] for a in _qkv_args(node))
        return q, k, v, node
    pairs = _score_operands(node.all_input_nodes[0], root) if node.all_input_nodes else []
    own = [(lft, r) for lft, r in pairs if _projects_stream(layer, lft)]
    # the content score: both operands projected from the stream (not DeBERTa's position terms, whose other
    # operand projects the relative embeddings)
    both = [(lft, r) for lft, r in own if _projects_stream(layer, r)]
    chosen = both or own
    q = [lft for lft, _ in chosen]
    k = [r for _, r in chosen]
    # the matmul the probabilities feed: its other operand is v
    v: list[fx.Node] = []
    context = node
    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            if is_matmul(user, root):
                left, right = _matmul_operands(user)
                other = right if left is n else left
                if other is not None:
                    v.append(other)
                context = user
                todo.clear()
                break
            src, _ = pass_through_input(root, user)
            if src is n or (user.op == "call_function" and user.target in (operator.mul, operator.truediv)):
                todo.append(user)
    return q, k, v, context


def _projects_stream(layer: _Layer, operand: fx.Node) -> bool:
    """Whether ``operand`` comes from the stream through projections of it (or reads it directly)."""
    found = _projections_back(layer, operand)
    if not found:
        return layer.reads_stream(operand)
    return any(layer.reads_stream(a) for proj, _ in found.values() for a in tensor_inputs(proj))


def module_sites(layer: _Layer, report: SiteReport) -> list[ModuleSite]:
    root = layer.root
    out = _Sites(layer)
    attn_sites = [s for s in report.residual if not s.kind.startswith("ffn.out")]
    regions = {s.kind: layer.region(layer.nodes[s.h]) for s in attn_sites}
    calls = [
        n
        for n in layer.graph.nodes
        if is_attention_function(n)
        or (n.op == "call_function" and n.target in ATTENTION_OPS)
        or is_attention_softmax(root, n)
    ]
    done_scopes: set[str] = set()
    for call in calls:
        q, k, v, context = _attention_roles(layer, call)
        keys = [key for key in k if isinstance(key, fx.Node)]
        prefix = "cross" if keys and not any(layer.reads_stream(key) for key in keys) else "attn"
        scope = (_stack_paths(call) or [""])[-1]
        if (prefix, scope) in done_scopes:
            continue
        done_scopes.add((prefix, scope))
        roles = {}
        for role, operands in (("q", q), ("k", k), ("v", v)):
            found: dict[str, tuple[fx.Node, set]] = {}
            for operand in operands:
                for name, (proj, ranges) in _projections_back(layer, operand).items():
                    found.setdefault(name, (proj, set()))[1].update(ranges)
            if len(found) == 1:
                ((proj, ranges),) = found.values()
                roles[role] = (proj, _merge(ranges))
        fused = {}
        for role, (proj, _) in roles.items():
            fused.setdefault(proj.name, []).append(role)
        for role, (proj, ranges) in roles.items():
            if len(fused[proj.name]) > 1:
                out.add(f"{prefix}.qkv", proj)
            out.add(f"{prefix}.{role}", proj, ranges)
        if is_attention_softmax(root, call):
            report.notes.append(
                f"{prefix} attention at {scope or call.name} is written by hand (softmax(q·kᵀ)·v, no HF attention "
                f"function or SDPA call): no {prefix}.kv site for prefix tuning"
            )
        missing = [r for r in "qkv" if r not in roles]
        if missing:
            report.notes.append(
                f"{prefix} attention at {scope or call.name}: no single projection found for "
                f"{', '.join(prefix + '.' + r for r in missing)}"
            )
        # the output projection consumes the attention result, inside the attention's residual sublayer
        region = next((r for kind, r in regions.items() if context in r and kind.startswith(prefix)), None)
        for n in layer.graph.nodes if region is not None else ():
            if layer.order[n] <= layer.order[context] or not is_projection(root, n):
                continue
            if n in region and context in ancestors(n, tensors_only=True):
                out.add(f"{prefix}.o", n)
                break
    for site in report.residual:
        if not site.kind.startswith("ffn.out"):
            continue
        down, _ = layer.walk_back(layer.nodes[site.h])
        if not is_projection(root, down):
            continue
        out.add("ffn.down", down)
        inner: dict[str, tuple[fx.Node, set]] = {}
        for a in tensor_inputs(down):
            for name, entry in _projections_back(layer, a).items():
                if entry[0] is not down:
                    inner.setdefault(name, (entry[0], set()))[1].update(entry[1])
        parts = [(proj, _merge(r)) for proj, r in inner.values()]
        if len(parts) == 1:
            proj, ranges = parts[0]
            pieces = _pieces(layer, proj, down)
            if (
                len(pieces) == 2
            ):  # fused gate/up (Phi-3's gate_up_proj): the piece feeding the activation gates
                gate = next((p for p in pieces if _feeds_activation(root, p[1])), None)
                if gate is not None:
                    out.add("ffn.gate", proj, gate[0])
                    out.add("ffn.up", proj, next(p[0] for p in pieces if p is not gate))
                    continue
            out.add("ffn.up", proj, None)
        elif len(parts) == 2:
            gate = next((p for p in parts if _feeds_activation(root, p[0])), None)
            if gate is not None:
                out.add("ffn.gate", gate[0], None)
                out.add("ffn.up", next(p[0] for p in parts if p is not gate), None)
    return out.sites


def _pieces(layer: _Layer, proj: fx.Node, down: fx.Node) -> list[tuple[tuple[tuple[int, int], ...], fx.Node]]:
    """Distinct feature parts of ``proj`` (with the node holding each) among the values feeding ``down``."""
    pieces: dict[tuple, fx.Node] = {}
    for n in ancestors(down, tensors_only=True) - {proj}:
        features = n.meta.get(FEATURES)
        if features is not None and features[0] == proj.name and any(not is_movement(u) for u in n.users):
            pieces.setdefault(features[1], n)
    return list(pieces.items())


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


def _feeds_activation(root: nn.Module, node: fx.Node) -> bool:
    for user in node.users:
        if user.op == "call_module":
            module = module_of(root, user)
            if (
                module is not None
                and not isinstance(module, nn.Dropout)
                and not is_projection(root, user)
                and next(module.parameters(), None) is None
            ):
                return True
        if user.op == "call_function" and getattr(user.target, "__module__", "").startswith(
            "torch.nn.functional"
        ):
            return True
        if user.op == "call_function" and getattr(user.target, "__name__", "") in ("sigmoid", "tanh", "relu"):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# attention sites (prefix tuning)


def attention_sites(layer: _Layer) -> list[AttentionSite]:
    out: list[AttentionSite] = []
    for node in layer.graph.nodes:
        # HF attention functions take (module, query, key, value, mask, ...); the fused SDPA op (query, key, ...)
        first = 1 if is_attention_function(node) else 0
        if not (first or (node.op == "call_function" and node.target in ATTENTION_OPS)):
            continue
        if len(node.args) < first + 3 or not isinstance(node.args[first + 1], fx.Node):
            continue
        meta = node.args[first + 1].meta.get("fxadapt_meta")
        q = node.args[first]
        q_meta = q.meta.get("fxadapt_meta") if isinstance(q, fx.Node) else None
        stack = _stack_paths(node)
        cross = not layer.reads_stream(node.args[first + 1])
        if meta and len(meta[1]) == 4:
            kind = "cross.kv" if cross else "attn.kv"
            if all(a.kind != kind for a in out):
                q_heads = q_meta[1][1] if q_meta and len(q_meta[1]) == 4 else meta[1][1]
                out.append(
                    AttentionSite(
                        kind, node.name, meta[1][1], meta[1][3], stack[0] if stack else "", q_heads, first
                    )
                )
    return out

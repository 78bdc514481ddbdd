"""Sites: named places in a captured layer graph where adapters attach.

Residual sites come from graph structure, not module names. The layer's first tensor input is the **residual
stream**; walking the graph in order, an ``add`` with one operand on the stream and the other (``h``) computed
from the stream through weights (a projection, an attention call, an opaque weighted module) is a **residual
add**, and its result is the stream from then on (with its norm, when a norm follows at once: post-LN layers).
``h`` is the sublayer output *as it arrives at the add*: after dropout, casts, data movement, layer scale or a
residual multiplier. What the sublayer computed decides the kind:

===========  =====================================================================================
kind         the sublayer (every op between the stream and ``h``) ...
===========  =====================================================================================
attn.out     contains an attention call or softmax over keys computed from the stream
cross.out    contains an attention whose keys come from elsewhere (encoder states, a cross cache)
ffn.out      contains no attention (feed-forward blocks, mixture-of-experts blocks with shared experts)
===========  =====================================================================================

Three structures give **branch sites** (``mode="branch"``), where the adapter's output replaces ``h`` and the
model then applies what follows ``h`` (its norm, the add) unchanged:

- a norm between the projection and the add ("sandwich" post-norms: Gemma-2/3, OLMo-2): ``h`` is the norm's
  input and the norm is the site's norm (AdapterHub's placement for Gemma-2/3: the adapter acts on the
  projection output and ``original_ln_before`` uses the post-norm);
- parallel residual branches summed before the residual add (``x + (attn + mlp)``: GPT-J, GPT-NeoX, Phi,
  Falcon, CodeGen): one site per branch, ``h`` the branch as it reaches the branch sum, ``x`` the stream;
- a quirk row of :data:`PEER_PLACEMENT` (below) where a peer library defines the placement differently.

Module sites are the projections themselves, classified by data flow: around each attention call (HF
attention function or SDPA: its query/key/value arguments) or hand-written attention (``softmax(q @ kᵀ) @ v``:
the left operand of the score matmul is q, its right operand k, the operand of the matmul after the softmax
v), the projection producing each operand is ``attn.q/k/v`` and the first projection consuming the attention
output is ``attn.o``. A fused projection feeding several roles gives ``attn.qkv`` plus each role as the part of
its output features that reaches that role, whatever the split (see ``provenance.py``). The down projection of a
feed-forward site is ``ffn.down``, the projections feeding it ``ffn.up`` / ``ffn.gate``.

Every rejected candidate keeps its reason, so ``explain()`` can say why an add is not a site.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.fx as fx
from torch import nn

from .graphs import (
    ADD_TARGETS,
    ATTENTION_OPS,
    ancestors,
    has_input_ancestor,
    is_attention,
    is_attention_function,
    is_matmul,
    is_norm,
    is_projection,
    is_softmax,
    is_weighted,
    module_of,
    pass_through_input,
    tensor_inputs,
    tensor_shape,
)

__all__ = [
    "MODULE_SITE_KINDS",
    "PEER_PLACEMENT",
    "RESIDUAL_SITE_KINDS",
    "SITE_KINDS",
    "AttentionSite",
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
    "cross.qkv": "fused cross-attention query/key/value projection",
    "cross.o": "cross-attention output projection",
    "ffn.up": "feed-forward up projection",
    "ffn.gate": "feed-forward gate projection",
    "ffn.down": "feed-forward down projection",
}
SITE_KINDS = {**RESIDUAL_SITE_KINDS, **MODULE_SITE_KINDS}

# Placements a peer library defines differently from the rules above, checked side by side with AdapterHub
# `adapters` 1.3.0 (tests/peer). One row per quirk: model_type -> {site kind: residual input of the adapter}.
#   "stream+branches": the stream plus the other parallel branches that reach it first (AdapterHub's GPT-J
#                      block adds the attention branch to the stream before the feed-forward adapter)
#   "none":            no residual input (AdapterHub's Phi interface hooks nothing before the feed-forward)
#   "sublayer_input":  the sublayer's normalised input (AdapterHub's ModernBERT interface hooks ``mlp``/``attn``)
#   "swapped":         the adapter reads the stream, and the sublayer output is its residual input (AdapterHub's
#                      ALBERT attention passes ``(hidden_states, attention_output)`` in that order)
PEER_PLACEMENT: dict[str, dict[str, str]] = {
    "albert": {"attn.out": "swapped"},
    "gptj": {"ffn.out": "stream+branches"},
    "phi": {"ffn.out": "none"},
    "modernbert": {"attn.out": "sublayer_input", "ffn.out": "sublayer_input"},
}


@dataclass(frozen=True)
class ResidualSite:
    """A residual add ``h + x`` where a bottleneck adapter can attach.

    ``mode="sum"``: the adapter's output replaces the add (and ``norm``, the post-LN right after it).
    ``mode="branch"``: the adapter's output replaces ``h``; ``norm`` is the norm the model applies to ``h``
    (sandwich post-norm) or None; the model's own ops after ``h`` stay. ``x`` is the residual input the adapter
    sees (None where it has none); ``extra`` names values added to ``x`` first (peer placements)."""

    kind: str
    add: str  # node name of the residual add
    h: str  # operand from the sublayer (as it arrives at the add, or at the branch sum / norm)
    x: str | None  # the residual input
    norm: str | None  # post-LN after the add (sum mode) or the norm applied to h (branch mode)
    producer: str  # module path (or function) producing h
    hidden_size: int = 0  # last dimension of the residual stream
    mode: str = "sum"
    extra: tuple[str, ...] = ()
    feature_dim: int = -1  # where the features are: -1, or 1 for a channels-first stream (conv1d layers)

    @property
    def output(self) -> str:
        """The node whose value the adapter's output replaces."""
        if self.mode == "branch":
            return self.h
        return self.norm or self.add


@dataclass(frozen=True)
class ModuleSite:
    """A projection call (``attn.q``, ``ffn.up``, ...). For a fused projection (GPT-2's ``c_attn``, GPT-NeoX's
    ``query_key_value``), ``out_ranges`` are the output features that are this site's: one ``(start, stop)`` run
    for a contiguous part, several for parts interleaved per head. ``nodes`` are every call of the module in
    the layer (DeBERTa calls its key projection on the relative embeddings too)."""

    kind: str
    module: str  # module path inside the layer
    node: str
    out_ranges: tuple[tuple[int, int], ...] | None = None
    nodes: tuple[str, ...] = ()

    @property
    def out_slice(self) -> tuple[int, int] | None:
        """The contiguous part ``(start, stop)`` of a fused projection; None for a whole or interleaved one."""
        return self.out_ranges[0] if self.out_ranges is not None and len(self.out_ranges) == 1 else None

    @property
    def interleaved(self) -> bool:
        return self.out_ranges is not None and len(self.out_ranges) > 1

    @property
    def calls(self) -> tuple[str, ...]:
        return self.nodes or (self.node,)


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
    notes: list[str] = field(default_factory=list)  # why module sites are missing (for explain)

    def residual_by_kind(self) -> dict[str, ResidualSite]:
        return {s.kind: s for s in self.residual}

    def module_by_kind(self) -> dict[str, ModuleSite]:
        return {s.kind: s for s in self.modules}

    def site(self, kind: str) -> ResidualSite | ModuleSite | AttentionSite | None:
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


# ---------------------------------------------------------------------------------------------------------------
# the residual stream


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_TARGETS:
        return len(node.args) == 2 and not node.kwargs
    return (
        node.op == "call_method"
        and node.target in ("add", "add_")
        and len(node.args) == 2
        and not node.kwargs
    )


def _primary_input(graph: fx.Graph) -> fx.Node | None:
    """The residual stream's entry: the first tensor input of the layer output's rank and width."""
    placeholders = [
        n for n in graph.nodes if n.op == "placeholder" and n.meta.get("fxadapt_kind") == "tensor"
    ]
    output = next(n for n in graph.nodes if n.op == "output")
    outs: list[fx.Node] = []
    fx.node.map_arg(output.args, outs.append)
    first = next((tensor_shape(n) for n in outs if tensor_shape(n)), None)
    if first is not None:
        for p in placeholders:
            shape = tensor_shape(p)
            if shape and len(shape) == len(first) and shape[-1] == first[-1]:
                return p
    return placeholders[0] if placeholders else None


class _Layer:
    """One layer graph with the caches site rules share."""

    def __init__(self, root: nn.Module, graph: fx.Graph, model_type: str | None):
        self.root, self.graph = root, graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.primary = _primary_input(graph)
        self.stream: set[fx.Node] = set() if self.primary is None else {self.primary}
        self.quirks = PEER_PLACEMENT.get(model_type or "", {})

    def region(self, h: fx.Node) -> set[fx.Node]:
        """The sublayer computing ``h``: ``h`` and its ancestors up to the stream."""
        return ({h} | ancestors(h, stop=self.stream)) - self.stream

    def reads_stream(self, node: fx.Node) -> bool:
        return node in self.stream or bool(ancestors(node, tensors_only=True) & self.stream)

    def walk_back(self, node: fx.Node) -> tuple[fx.Node, list[tuple[fx.Node, str]]]:
        """Follow pass-through ops back from ``node``; returns the first other node and the ops passed."""
        passed: list[tuple[fx.Node, str]] = []
        while isinstance(node, fx.Node) and node not in self.stream:
            src, kind = pass_through_input(self.root, node)
            if src is None or not isinstance(src, fx.Node):
                break
            passed.append((node, kind))
            node = src
        return node, passed

    def attention_in(self, region: set[fx.Node]) -> list[fx.Node]:
        return [n for n in region if is_attention(self.root, n) or is_attention_softmax(self.root, n)]

    def is_cross(self, attention: list[fx.Node]) -> bool:
        """Keys of every attention in the sublayer come from outside the stream (encoder states, a cache). An
        opaque attention module is cross-attention when it reads a sequence of other states (a 3-D input that
        does not come from the stream)."""
        keys = [k for a in attention for k in _key_operands(self.root, a)]
        for a in attention:
            if a.op == "call_module":
                seqs = [t for t in tensor_inputs(a) if len(tensor_shape(t) or ()) == 3]
                keys += [t for t in seqs if not self.reads_stream(t)] or seqs
        return bool(keys) and not any(self.reads_stream(k) for k in keys)

    def producer(self, h: fx.Node) -> str:
        node, _ = self.walk_back(h)
        if node.op == "call_module":
            return str(node.target)
        stack = _stack_paths(node)
        return stack[-1] if stack else node.name


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def _qkv_args(node: fx.Node) -> list[fx.Node | None]:
    """(query, key, value) inputs of an HF attention function (``module, query, key, value, ...``) or SDPA
    (``query, key, value``), positional or by keyword; None for a missing one."""
    first = 1 if is_attention_function(node) else 0
    args = list(node.args[first : first + 3])
    for i, name in enumerate(("query", "key", "value")):
        if len(args) <= i:
            args.append(node.kwargs.get(name))
    return [a if isinstance(a, fx.Node) else None for a in args[:3]]


def _key_operands(root: nn.Module, node: fx.Node) -> list[fx.Node]:
    """The key inputs of an attention call, or of the score matmuls feeding a softmax."""
    if is_attention_function(node) or (node.op == "call_function" and node.target in ATTENTION_OPS):
        key = _qkv_args(node)[1]
        return [key] if key is not None else []
    if is_softmax(root, node) and node.all_input_nodes:
        return [r for _, r in _score_operands(node.all_input_nodes[0], root)]
    return []


def is_attention_softmax(root: nn.Module, node: fx.Node) -> bool:
    """A softmax over attention scores: its input comes from a matmul of two computed values (not a router's
    softmax over a projection's logits)."""
    if not is_softmax(root, node) or not node.all_input_nodes:
        return False
    return any(
        has_input_ancestor(lft) and has_input_ancestor(r) and not is_projection(root, mm)
        for lft, r, mm in _score_matmuls(node.all_input_nodes[0], root)
    )


def _matmul_operands(mm: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """(left, right) tensor operands of a matmul-like node (baddbmm: batch1/batch2; einsum: first two)."""
    args = list(mm.args)
    target = mm.target
    if target == "baddbmm" or getattr(target, "__name__", "") == "baddbmm":
        left = mm.kwargs.get("batch1", args[1] if len(args) > 1 else None)
        right = mm.kwargs.get("batch2", args[2] if len(args) > 2 else None)
    elif getattr(target, "__name__", "") == "einsum":
        ops = [a for a in args[1:] if isinstance(a, fx.Node)]
        if len(ops) == 1 and isinstance(args[1], (list, tuple)):
            ops = [a for a in args[1] if isinstance(a, fx.Node)]
        left, right = [*ops, None, None][:2]
    else:
        left, right = [*args, None, None][:2]
    return (left if isinstance(left, fx.Node) else None, right if isinstance(right, fx.Node) else None)


def _score_operands(start: fx.Node, root: nn.Module | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """(left, right) operands of the matmuls reached walking back from ``start`` (the softmax input), stopping
    at the first matmul on each path."""
    return [(lft, r) for lft, r, _ in _score_matmuls(start, root)]


def _score_matmuls(start: fx.Node, root: nn.Module | None = None) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    found, todo, seen = [], [start], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_matmul(n, root):
            left, right = _matmul_operands(n)
            if left is not None and right is not None:
                found.append((left, right, n))
            continue
        todo.extend(tensor_inputs(n))
    return found


def find_sites(root: nn.Module, graph: fx.Graph, model_type: str | None = None) -> SiteReport:
    """Find residual and module sites in a captured layer graph (see the module docstring for the rules).

    ``model_type`` (the HF config's) selects the :data:`PEER_PLACEMENT` rows; nothing else depends on it."""
    report = SiteReport()
    layer = _Layer(root, graph, model_type)
    if layer.primary is None:
        report.notes.append("the layer has no tensor input: no residual stream")
        return report
    sites: list[ResidualSite] = []
    for node in graph.nodes:
        if node in layer.stream:
            continue
        src, kind = pass_through_input(root, node)
        if kind in ("cast", "dropout", "move") and src in layer.stream and _same_width(node, src):
            layer.stream.add(node)  # the stream cast, passed through or reshaped (OPT: ``reshape(-1, d)``)
            continue
        if _is_add(node):
            sites.extend(_residual_add(layer, node, report))
    counts: dict[str, int] = {}
    for site in sites:
        n = counts.get(site.kind, 0)
        counts[site.kind] = n + 1
        report.residual.append(replace(site, kind=f"{site.kind}.{n}") if n else site)
    from .module_sites import attention_sites, module_sites  # they build on this module's layer view

    report.modules = module_sites(layer, report)
    report.attention = attention_sites(layer)
    for node in graph.nodes:
        if node.op == "call_module" and is_projection(root, node):
            report.linears.setdefault(str(node.target), node.name)
    return report


def _residual_add(layer: _Layer, node: fx.Node, report: SiteReport) -> list[ResidualSite]:
    a, b = node.args
    shape = tensor_shape(node)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or shape is None:
        return []
    if tensor_shape(a) != shape or tensor_shape(b) != shape:
        report.rejected.append(
            (node.name, "operands differ in shape from the result (a broadcast, not a residual)")
        )
        return []
    on = [a in layer.stream, b in layer.stream]
    if on[0] == on[1]:
        why = "both operands are the residual stream" if on[0] else "neither operand is the residual stream"
        report.rejected.append((node.name, why))
        return []
    x, h = (a, b) if on[0] else (b, a)
    if not layer.reads_stream(h):
        report.rejected.append((node.name, "the other operand does not read the residual stream"))
        return []
    region = layer.region(h)
    if not any(is_weighted(layer.root, n) for n in region):
        report.rejected.append(
            (node.name, "no projection, attention or weighted module between stream and add")
        )
        return []
    layer.stream.add(node)
    norm = None
    users = list(node.users)
    post = users[0] if len(users) == 1 else None
    if _normalises(layer, post, node):  # post-LN: the norm right after the add is part of the site
        norm = post.name
        layer.stream.add(post)
    hidden, feature_dim = _features(layer, h, shape)

    def site(kind: str, h_node: fx.Node, mode: str, site_norm: str | None, extra=()) -> ResidualSite:
        x_name: str | None = x.name
        quirk = layer.quirks.get(kind)
        if quirk != "stream+branches":
            extra = ()
        if quirk == "none":
            x_name = None
        elif quirk == "sublayer_input":  # a hooked placement: the model adds its own stream after the adapter
            x_name = _sublayer_input(layer, h_node, x).name
            mode = "branch"
        elif quirk == "swapped":  # the adapter reads the stream and takes the sublayer output as residual
            h_node, x_name = x, h_node.name
        return ResidualSite(
            kind,
            node.name,
            h_node.name,
            x_name,
            site_norm,
            layer.producer(h_node),
            hidden,
            mode,
            tuple(extra),
            feature_dim,
        )

    # parallel branches summed before the residual add: one branch site per kind of branch
    inner, _ = layer.walk_back(h)
    if _is_add(inner) and all(isinstance(o, fx.Node) for o in inner.args):
        branches = [o for o in inner.args if layer.reads_stream(o)]
        kinds = [_kind(layer, layer.region(o) - {inner}) for o in branches]
        if len(branches) == 2 and len(set(kinds)) == 2:
            order = sorted(range(2), key=lambda i: kinds[i] != "attn.out")  # attention branch first
            out = []
            for i in order:
                others = [branches[j].name for j in range(2) if j != i and kinds[j] == "attn.out"]
                out.append(site(kinds[i], branches[i], "branch", None, others))
            return out
    kind = _kind(layer, region)
    # a norm between the sublayer and the add (sandwich post-norm): the adapter goes before it
    _, passed = layer.walk_back(h)
    post_norm = next((n for n, k in passed if k == "norm"), None)
    if post_norm is not None:
        return [site(kind, post_norm.args[0], "branch", post_norm.name)]
    return [site(kind, h, "sum", norm)]


def _normalises(layer: _Layer, post: fx.Node | None, node: fx.Node) -> bool:
    """Whether ``post`` is a norm module called on ``node`` itself."""
    if post is None or post.op != "call_module" or not is_norm(module_of(layer.root, post)):
        return False
    return bool(post.args) and post.args[0] is node


def _features(layer: _Layer, h: fx.Node, shape: tuple) -> tuple[int, int]:
    """(hidden size, feature dim) of the stream at a residual add: the last dim, unless the sublayer ends in a
    convolution whose output channels sit on dim 1 (a channels-first stream: SqueezeBERT's conv1d layers)."""
    producer, _ = layer.walk_back(h)
    module = module_of(layer.root, producer)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 3 and len(shape) == 3:
        channels = weight.shape[0]
        if shape[1] == channels and shape[-1] != channels:
            return int(channels), 1
    return int(shape[-1]), -1


def _same_width(a: fx.Node, b: fx.Node) -> bool:
    sa, sb = tensor_shape(a), tensor_shape(b)
    return bool(sa and sb) and sa[-1] == sb[-1]


def _kind(layer: _Layer, region: set[fx.Node]) -> str:
    attention = layer.attention_in(region)
    if not attention:
        return "ffn.out"
    return "cross.out" if layer.is_cross(attention) else "attn.out"


def _sublayer_input(layer: _Layer, h: fx.Node, x: fx.Node) -> fx.Node:
    """The value the sublayer reads from the stream ``x``: ``x`` after its pre-norm (if it has one)."""
    for user in x.users:
        if user.op == "call_module" and is_norm(module_of(layer.root, user)) and user in layer.region(h):
            return user
    return x

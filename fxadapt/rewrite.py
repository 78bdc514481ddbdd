"""Rewrite: plan → insert adapter nodes into a copy of a captured graph → lint → generated code.

A :class:`LayerPlan` says what is active in one layer: the active setup (a composition block) and, per site,
which adapters of it sit there (:class:`SitePlan`). Each site's method emits its nodes through :class:`Emitter`
(``Method.compose_site``), which keeps the new nodes in order right after the site, rewires the site's users to
the new output and drops nodes the rewrite made dead. After every rewrite the graph is linted.

For ``seq_bn`` at ``ffn.out`` of a BERT layer the generated code reads::

    output_dense = self.output.dense(intermediate_act_fn)
    output_dropout = self.output.dropout(output_dense)
    add_2 = output_dropout + attention_output_layer_norm
    output_layer_norm_1 = self.output.LayerNorm(add_2)
    sst_2_bottleneck_ffn_out = getattr(self.fxadapt, "sst-2").ffn_out(output_layer_norm_1, output_dropout)
    add_3 = sst_2_bottleneck_ffn_out + attention_output_layer_norm
    output_layer_norm_2 = self.output.LayerNorm(add_3)
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture import Capture, compile_graph
from .compose import Block, replicate_batch
from .errors import CompositionError, SiteNotFoundError, nearest
from .guards import flatten_call, unflatten_call
from .lowering import capture_allows
from .methods.base import AdapterConfig, method_for
from .sites import MODULE_SITE_KINDS, ResidualSite, SiteReport

__all__ = ["AdapterRef", "Emitter", "LayerPlan", "SitePlan", "build_runner", "replicated_call", "site_key"]


def site_key(kind: str) -> str:
    """Module-dict key of a site kind (``ffn.out`` → ``ffn_out``)."""
    return kind.replace(".", "_")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter's weights at one site: name, module path inside the layer, config."""

    name: str
    target: str
    config: AdapterConfig

    def node_name(self, site: str) -> str:
        return f"{self.name}_{self.config.method}_{site_key(site)}"


@dataclass(frozen=True)
class SitePlan:
    site: str
    adapters: tuple[AdapterRef, ...]  # the setup's adapters present at this site, in setup order
    fusions: tuple[tuple[str, str, Any], ...] = ()  # (fuse name, module path, fusion config) present here


@dataclass(frozen=True)
class LayerPlan:
    """Everything active in one layer; empty plans run the original eager forward."""

    setup: Block | None = None
    sites: tuple[SitePlan, ...] = ()
    parallel: int = 1  # batch replicas (Parallel blocks)
    first_layer: bool = False

    def __bool__(self) -> bool:
        return bool(self.sites)

    def describe(self) -> list[str]:
        return [f"{ref.name} ({ref.config.method}) at {sp.site}" for sp in self.sites for ref in sp.adapters]


class Emitter:
    """Small builder over an fx graph used by method rewrite rules."""

    def __init__(
        self, graph: fx.Graph, root: nn.Module, name: str, aliases: dict[str, fx.Node] | None = None
    ):
        self.graph = graph
        self.root = root
        self.name = name  # base name for the inserted adapter node
        self._nodes = {n.name: n for n in graph.nodes}
        # site outputs replaced by earlier rewrites: later sites that read them get the new node
        self.aliases = aliases if aliases is not None else {}
        self._cursor: fx.Node | None = None
        self.inserted: list[fx.Node] = []
        self.lower = False  # emit fused kernel ops where a rule can (see fxadapt.lowering)
        self.dtype: torch.dtype | None = (
            None  # the captured call's activation dtype (lowering rules check it)
        )
        self.notes: list[str] = []  # what was lowered or why not, for explain()

    def node(self, name: str | None) -> fx.Node | None:
        """The node called ``name``, or what an earlier rewrite replaced it with (None for None: a site without
        a residual input)."""
        if name is None:
            return None
        return self.aliases.get(name) or self._nodes[name]

    @contextmanager
    def after(self, *names: str | None) -> Iterator[None]:
        """Emit new nodes right after the last (in graph order) of the nodes ``names``."""
        nodes = [self.node(n) for n in names if n is not None]
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        self._cursor = max(nodes, key=order.__getitem__)
        try:
            yield
        finally:
            self._cursor = None

    @contextmanager
    def before(self, name: str) -> Iterator[None]:
        """Emit new nodes right before node ``name`` (in order)."""
        anchor = self.node(name)
        self._cursor = anchor.prev
        try:
            yield
        finally:
            self._cursor = None

    def _emit(self, make: Callable[[], fx.Node]) -> fx.Node:
        assert self._cursor is not None, "emit inside `with emitter.after(...)` or `emitter.before(...)`"
        with self.graph.inserting_after(self._cursor):
            node = make()
        self._cursor = node
        self.inserted.append(node)
        return node

    def add(self, a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        """``a + b``; a None operand (a site without residual input) is the identity."""
        if a is None or b is None:
            return b if a is None else a
        return self._emit(lambda: self.graph.call_function(operator.add, (a, b)))

    def mul(self, a: fx.Node, b: Any) -> fx.Node:
        return self._emit(lambda: self.graph.call_function(operator.mul, (a, b)))

    def getitem(self, a: fx.Node | None, index: Any) -> fx.Node | None:
        if a is None:
            return None
        return self._emit(lambda: self.graph.call_function(operator.getitem, (a, index)))

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self._emit(lambda: self.graph.call_method(name, args, kwargs))

    def norm(self, like: fx.Node, value: fx.Node) -> fx.Node:
        """Call the same norm module as ``like`` (a call_module node) on ``value``."""
        return self._emit(
            lambda: self.graph.call_module(str(like.target), (value, *like.args[1:]), dict(like.kwargs))
        )

    def call(self, target: str, args: tuple, kwargs: dict | None = None, name: str | None = None) -> fx.Node:
        def make() -> fx.Node:
            node = self.graph.call_module(target, args, kwargs or {})
            node.name = self.graph._graph_namespace.create_name(name or self.name, node)
            return node

        return self._emit(make)

    def attr(self, target: str) -> fx.Node:
        """A submodule or parameter of the layer, by path (``get_attr``)."""
        return self._emit(lambda: self.graph.get_attr(target))

    def function(self, fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self._emit(lambda: self.graph.call_function(fn, args, kwargs or {}))

    def discard(self) -> None:
        """Drop the nodes inserted so far (a rule that turned out to change nothing)."""
        for node in reversed(self.inserted):
            if not node.users:
                self.graph.erase_node(node)
        self.inserted.clear()

    def replace_node(self, name: str, new: fx.Node) -> None:
        """Route every user of node ``name`` (outside the inserted nodes) to ``new``; later sites reading
        ``name`` read ``new``."""
        old = self.node(name)
        inserted = set(self.inserted)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inserted)
        self.aliases[name] = new

    def replace(self, site: ResidualSite, new: fx.Node) -> None:
        """Route every user of the site's output (outside the inserted nodes) to ``new``; drop dead old nodes."""
        self.replace_node(site.output, new)
        for name in (site.norm, site.add):
            node = self._nodes.get(name) if name else None
            if node is not None and not node.users and node in self.graph.nodes:
                self.graph.erase_node(node)


def _replicate_inputs(graph: fx.Graph, plan: LayerPlan) -> dict[str, fx.Node]:
    """Parallel: replicate the layer's tensor inputs to ``plan.parallel`` copies of the batch, first thing.
    Returns the replacement of each input (sites that read an input read its replica)."""
    placeholders = [
        n for n in graph.nodes if n.op == "placeholder" and n.meta.get("fxadapt_kind") == "tensor"
    ]
    replaced: dict[str, fx.Node] = {}
    if not placeholders:
        return replaced
    with graph.inserting_after(placeholders[-1]):
        rep = graph.call_function(replicate_batch, (plan.parallel, plan.first_layer, *placeholders))
    cursor = rep
    for i, ph in enumerate(placeholders):
        with graph.inserting_after(cursor):
            item = graph.call_function(operator.getitem, (rep, i))
        cursor = item
        ph.replace_all_uses_with(item, delete_user_cb=lambda user: user is not rep)
        replaced[ph.name] = item
    return replaced


def replicated_call(plan: LayerPlan, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a layer call as the base graph inside ``plan``'s generated code sees it: under
    Parallel, the tensor inputs replicated as :func:`_replicate_inputs` does first thing (a decoder layer's encoder
    states arrive replicated, its hidden states not yet). A capture made at run time traces and verifies the base
    layer on these: on the raw inputs their batch sizes disagree."""
    if plan.parallel <= 1:
        return args, kwargs
    leaves, spec = flatten_call(args, kwargs)
    at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    if not at:
        return args, kwargs
    for i, rep in zip(at, replicate_batch(plan.parallel, plan.first_layer, *(leaves[i] for i in at))):
        leaves[i] = rep
    return unflatten_call(leaves, spec)


def lowering(capture: Capture) -> tuple[bool, str]:
    """Whether adapter nodes of this capture are lowered to fused kernel ops, and why (not)."""
    return capture_allows(capture)


def _one_rule_per_row(setup: Any, methods: dict[str, Any]) -> bool:
    """Under PerRow each row runs one adapter, so methods that share one site rule (LoRA and (IA)^3) may mix."""
    from .compose import PerRow

    return isinstance(setup, PerRow) and len({type(m).compose_site for m in methods.values()}) == 1


def build_runner(
    layer: nn.Module, capture: Capture, report: SiteReport, plan: LayerPlan, notes: list | None = None
):
    """Rewrite a copy of ``capture.graph`` with ``plan`` and return ``(runner, source)``; ``notes`` collects
    which adapter nodes were lowered to fused kernels and why others were not."""
    graph = copy.deepcopy(capture.graph)
    aliases: dict[str, fx.Node] = _replicate_inputs(graph, plan) if plan.parallel > 1 else {}
    lower, why = lowering(capture)
    if notes is not None and not lower:
        notes.append(f"not lowered: {why}")
    for site_plan in plan.sites:
        site = report.site(site_plan.site)
        if (
            site is None
            and site_plan.site.split(".")[0] == "cross"
            and site_plan.site in MODULE_SITE_KINDS
            and capture.has_opaque_inputs
        ):
            # a projection this call does not run (cross-attention k/v read back from a cache): nothing to adapt
            continue
        if site is None:
            kinds = sorted(set(report.kinds()))
            raise SiteNotFoundError(
                f"site {site_plan.site!r} (adapters {[a.name for a in site_plan.adapters]}) not found in this call "
                f"of {type(layer).__name__}; this call has {kinds}{nearest(site_plan.site, kinds)}. "
                f"Opaque submodules: {list(capture.leaves) or 'none'}"
            )
        methods = {method_for(ref.config).name: method_for(ref.config) for ref in site_plan.adapters}
        if len(methods) > 1 and _one_rule_per_row(plan.setup, methods):  # serve: LoRA and (IA)^3 rows mix
            methods = dict([next(iter(methods.items()))])
        if len(methods) > 1:
            raise CompositionError(
                f"adapters of different methods {sorted(methods)} are active at site {site_plan.site!r}; "
                "compose adapters of one method per site"
            )
        (method,) = methods.values()
        emitter = Emitter(graph, layer, site_plan.adapters[0].node_name(site_plan.site), aliases)
        emitter.lower, emitter.dtype = lower, capture.dtype
        method.compose_site(emitter, site, plan.setup, site_plan)
        if notes is not None:
            notes.extend(emitter.notes)
    graph.lint()
    code = compile_graph(graph)
    return capture.bind(code), code.__fxadapt_src__

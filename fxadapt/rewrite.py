"""Rewrite: plan → insert adapter nodes into a copy of a captured graph → lint → generated code.

A *plan* is the tuple of :class:`PlanItem` active in one layer: which adapter (weights at ``target``) attaches
at which site, with which method. Methods insert their nodes through :class:`Emitter`, which keeps the new
nodes in order right after the site, rewires the site's users to the new output and drops the nodes the
rewrite made dead. After every rewrite the graph is linted.

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

import torch.fx as fx
from torch import nn

from .capture import Capture, compile_graph
from .errors import SiteNotFoundError, nearest
from .methods.base import AdapterConfig, method_for
from .sites import ResidualSite, SiteReport

__all__ = ["Emitter", "PlanItem", "build_runner", "site_key"]


def site_key(kind: str) -> str:
    """Module-dict key of a site kind (``ffn.out`` → ``ffn_out``)."""
    return kind.replace(".", "_")


@dataclass(frozen=True)
class PlanItem:
    """One adapter at one site of one layer."""

    adapter: str
    site: str
    target: str  # module path of the adapter's weights inside the layer
    config: AdapterConfig

    @property
    def node_name(self) -> str:
        return f"{self.adapter}_{self.config.method}_{site_key(self.site)}"


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

    def node(self, name: str) -> fx.Node:
        return self.aliases.get(name) or self._nodes[name]

    @contextmanager
    def after(self, name: str) -> Iterator[None]:
        self._cursor = self.node(name)
        try:
            yield
        finally:
            self._cursor = None

    def _emit(self, make: Callable[[], fx.Node]) -> fx.Node:
        assert self._cursor is not None, "emit inside `with emitter.after(...)`"
        with self.graph.inserting_after(self._cursor):
            node = make()
        self._cursor = node
        self.inserted.append(node)
        return node

    def add(self, a: fx.Node, b: fx.Node) -> fx.Node:
        return self._emit(lambda: self.graph.call_function(operator.add, (a, b)))

    def mul(self, a: fx.Node, b: Any) -> fx.Node:
        return self._emit(lambda: self.graph.call_function(operator.mul, (a, b)))

    def norm(self, like: fx.Node, value: fx.Node) -> fx.Node:
        """Call the same norm module as ``like`` (a call_module node) on ``value``."""
        return self._emit(
            lambda: self.graph.call_module(str(like.target), (value, *like.args[1:]), dict(like.kwargs))
        )

    def call(self, target: str, args: tuple, kwargs: dict | None = None) -> fx.Node:
        def make() -> fx.Node:
            node = self.graph.call_module(target, args, kwargs or {})
            node.name = self.graph._graph_namespace.create_name(self.name, node)
            return node

        return self._emit(make)

    def function(self, fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> fx.Node:
        return self._emit(lambda: self.graph.call_function(fn, args, kwargs or {}))

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
            if node is not None and node.graph is self.graph and not node.users:
                self.graph.erase_node(node)


def build_runner(layer: nn.Module, capture: Capture, report: SiteReport, plan: tuple[PlanItem, ...]):
    """Rewrite a copy of ``capture.graph`` with ``plan`` and return ``(runner, source)``."""
    graph = copy.deepcopy(capture.graph)
    aliases: dict[str, fx.Node] = {}
    for item in plan:
        site = report.site(item.site)
        if site is None:
            kinds = sorted(set(report.kinds()))
            raise SiteNotFoundError(
                f"site {item.site!r} (adapter {item.adapter!r}) not found in this call of "
                f"{type(layer).__name__}; this call has {kinds}{nearest(item.site, kinds)}. "
                f"Opaque submodules: {list(capture.leaves) or 'none'}"
            )
        emitter = Emitter(graph, layer, item.node_name, aliases)
        method_for(item.config).rewrite(emitter, site, item.target, item.config)
    graph.lint()
    code = compile_graph(graph)
    return capture.bind(code), code.__fxadapt_src__

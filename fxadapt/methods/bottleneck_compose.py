"""Composition of bottleneck adapters at a residual site: AdapterHub's ``BottleneckLayer`` over graph nodes, the
per-row (``PerRow``) batched path, and the lowering of single adapters to the fused kernel.

The state passed through a setup is AdapterHub's ``BottleneckState`` (hidden, sublayer residual input, adapter
residual, last up-projection, last adapter); each adapter's ``pre_forward`` (residual / norm placement) is
emitted by :meth:`_BottleneckComposer._pre_forward`, its module call by :meth:`_BottleneckComposer.single`.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch

from ..compose import Composer, Fuse, PerRow, check_size, compose
from ..errors import CompositionError, ConfigError
from ..lowering import fused_bottleneck, per_row_bottleneck, why_not_fused
from ..routing import current_ids
from .base import widened

__all__ = ["compose_bottleneck_site", "weighted_mean"]


def compose_bottleneck_site(emitter, site, setup, plan) -> None:
    """Emit the active setup's bottleneck adapters at one residual site (AdapterHub's ``BottleneckLayer``)."""
    if isinstance(setup, PerRow):
        return _per_row_site(emitter, site, setup, plan)
    e = emitter
    refs = {ref.name: ref for ref in plan.adapters}
    composer = _BottleneckComposer(e, site, refs, {name: (target, cfg) for name, target, cfg in plan.fusions})
    h = e.node(site.h)
    with e.after(site.output, *site.extra):
        x = _residual_input(e, site, refs.values())
        state = compose(composer, setup, _State(h, x, x, None, None))
        if state.last is None:  # nothing of the setup applies at this site: it stays as it was
            e.discard()
            return
        last = refs[state.last].config
        y = state.hidden
        if last.is_parallel:
            y = e.add(y, h)
        if last.original_ln_after and site.mode == "sum":
            y = e.add(y, state.input)
            if composer.norm is not None:
                y = e.norm(composer.norm, y)
    e.replace(site, y)


class _State(NamedTuple):
    """AdapterHub's BottleneckState, over graph nodes."""

    hidden: Any
    input: Any
    residual: Any
    up: Any
    last: str | None


class _BottleneckComposer(Composer[_State]):
    """State hooks of bottleneck adapters at one residual site (AdapterHub's ``BottleneckLayer``)."""

    def __init__(self, emitter, site, refs, fusions):
        self.e = emitter
        self.refs = refs
        self.fusions = fusions
        self.norm = emitter.node(site.norm) if site.norm else None
        self.site = site
        self._fuse_depth = 0

    def present(self, name: str) -> bool:
        return name in self.refs

    def _pre_forward(self, name: str, state: _State) -> tuple[_State, Any]:
        """``Adapter.pre_forward``: (state with the adapter's input and residual, pre-norm hidden for queries)."""
        config = self.refs[name].config
        e, hidden = self.e, state.hidden
        if config.is_parallel:
            return state._replace(hidden=state.input, residual=state.input), state.input
        residual = hidden if config.residual_before_ln is True else state.residual
        before = hidden
        if config.original_ln_before:
            hidden = e.add(hidden, state.input)
            if config.residual_before_ln == "post_add":
                residual = hidden
            if self.norm is not None:
                hidden = e.norm(self.norm, hidden)
        if config.residual_before_ln is False:
            residual = hidden
        return state._replace(hidden=hidden, residual=residual), before

    def pre_block(self, setup, state: _State) -> _State:
        name = setup if isinstance(setup, str) else next(n for n in setup.names() if n in self.refs)
        return self._pre_forward(name, state)[0]

    def single(self, name: str, state: _State) -> _State:
        ref = self.refs[name]
        args = (state.hidden, state.residual)
        node_name = ref.node_name(self.site.kind)
        if self.e.lower and not self._fuse_depth:
            why = why_not_fused(self.e.root.get_submodule(ref.target), x_dtype=self.e.dtype)
            if why is None:
                module = self.e.attr(ref.target)
                out = self.e.function(fused_bottleneck, (module, *args))
                out.name = self.e.graph._graph_namespace.create_name(f"{node_name}_fused", out)
                self.e.notes.append(f"{node_name}: lowered to fxadapt.kernels.bottleneck")
                return state._replace(hidden=out, up=None, last=name)
            self.e.notes.append(f"{node_name}: not lowered: {why}")
        if self._fuse_depth:
            both = self.e.call(ref.target, args, {"return_up": True}, name=ref.node_name(self.site.kind))
            out, up = self.e.getitem(both, 0), self.e.getitem(both, 1)
        else:
            out, up = self.e.call(ref.target, args, name=ref.node_name(self.site.kind)), None
        return state._replace(hidden=out, up=up, last=name)

    def has_fusion(self, setup: Fuse) -> bool:
        return setup.name in self.fusions

    def pre_fuse(self, setup: Fuse, state: _State) -> tuple[_State, Any]:
        last = setup.last() if setup.last() in self.refs else next(n for n in setup.names() if n in self.refs)
        fused, before = self._pre_forward(last, state)
        fusion_config = self.fusions[setup.name][1]
        self._fuse_depth += 1
        return fused, (before if fusion_config.query_before_ln else fused.hidden)

    def fuse(self, setup: Fuse, state: _State, children: list[_State], query: Any) -> _State:
        self._fuse_depth -= 1
        target, _ = self.fusions[setup.name]
        ups = self.e.function(torch.stack, ([c.up for c in children],), {"dim": 2})
        out = self.e.call(
            target, (query, ups, state.residual), name=f"fusion_{self.site.kind.replace('.', '_')}"
        )
        return state._replace(hidden=out, last=setup.last())

    def vslice(self, state: _State, index: Any) -> _State:
        g = self.e.getitem
        return _State(
            g(state.hidden, index),
            g(state.input, index),
            g(state.residual, index),
            g(state.up, index) if state.up is not None else None,
            state.last,
        )

    def hslice(self, state: _State, index: Any) -> _State:
        key = (slice(None), index)
        g = self.e.getitem
        return _State(
            g(state.hidden, key),
            g(state.input, key),
            g(state.residual, key),
            g(state.up, key) if state.up is not None else None,
            state.last,
        )

    def cat(self, states: list[_State], dim: int, base: _State) -> _State:
        def cat(nodes):
            nodes = list(nodes)
            if any(n is None for n in nodes):  # no residual input at this site
                return None
            return self.e.function(torch.cat, (nodes,), {"dim": dim})

        last = next((s.last for s in reversed(states) if s.last), base.last)
        if dim == 1:  # Split: only the hidden states are reassembled (AdapterHub's compose_split)
            return base._replace(hidden=cat(s.hidden for s in states), last=last)
        ups = [s.up for s in states]
        return _State(
            cat(s.hidden for s in states),
            cat(s.input for s in states),
            cat(s.residual for s in states),
            cat(ups) if all(u is not None for u in ups) else None,
            last,
        )

    def mean(self, states: list[_State], weights: tuple[float, ...]) -> _State:
        hidden = self.e.function(weighted_mean, ([s.hidden for s in states], weights))
        return states[0]._replace(hidden=hidden, last=states[-1].last)

    def batch_size(self, state: _State) -> Any:
        return self.e.method("size", state.hidden, 0)

    def seq_len(self, state: _State) -> Any:
        return self.e.method("size", state.hidden, 1)

    def per_replica(self, state: _State, n: int) -> Any:
        return self.e.function(operator.floordiv, (self.batch_size(state), n))

    def check(self, value: Any, expected: int, what: str) -> None:
        self.e.function(check_size, (value, expected, what))

    def times(self, value: Any, k: int) -> Any:
        return value if k == 1 else self.e.function(operator.mul, (value, k))


def _residual_input(e, site, refs) -> Any:
    """The site's residual input as a node (None where it has none), checked against the adapters' needs.

    At a branch site (``site.mode == "branch"``: sandwich post-norm, parallel branch) the model applies its own
    norm and residual after the adapter, as in AdapterHub's hooked layers; like AdapterHub, configs that would
    skip them (``original_ln_after=False``) are refused there."""
    x = e.node(site.x)
    for name in site.extra:  # peer placements: the stream plus branches that reached it first
        x = e.add(x, e.node(name))
    for ref in refs:
        config = ref.config
        if site.mode == "branch" and not config.original_ln_after:
            raise ConfigError(
                f"adapter {ref.name!r}: original_ln_after=False is not supported at {site.kind!r}, where the model "
                "applies its own norm and residual after the adapter (a post-norm or parallel-branch site); "
                "use original_ln_after=True (AdapterHub refuses it at such sites too)"
            )
        if x is None and config.is_parallel:
            raise ConfigError(
                f"adapter {ref.name!r}: a parallel adapter reads the sublayer input, which site {site.kind!r} does "
                "not have; use a sequential config (e.g. 'double_seq_bn') here"
            )
    return x


_STRUCTURE = ("original_ln_before", "original_ln_after", "residual_before_ln", "is_parallel")


def _per_row_site(e, site, setup: PerRow, plan) -> None:
    """Every row through its own adapter in one batched op (``fxadapt.kernels.bottleneck_multi``)."""
    refs = {ref.name: ref for ref in plan.adapters}
    configs = [refs[n].config for n in refs]
    for field in _STRUCTURE:
        if len({getattr(c, field) for c in configs}) > 1:
            raise CompositionError(
                f"PerRow{tuple(setup.names())}: adapters differ in {field} at site {site.kind!r}; per-row routing "
                "needs adapters of one structure (e.g. all seq_bn)"
            )
    composer = _BottleneckComposer(e, site, refs, {})
    h = e.node(site.h)
    first = next(iter(refs))
    with e.after(site.output, *site.extra):
        x = _residual_input(e, site, refs.values())
        state = composer._pre_forward(first, _State(h, x, x, None, None))[0]
        ids = e.function(  # current_ids(h): the call's ids, checked against h's batch (serve)
            route_ids, (e.function(current_ids, (h,)), tuple(n in refs for n in setup.children))
        )
        modules = [e.attr(refs[n].target) for n in setup.children if n in refs]
        residual = state.residual if not configs[0].is_parallel else None
        y = e.function(per_row_bottleneck, (state.hidden, residual, ids, modules))
        if configs[0].is_parallel:
            y = e.add(y, h)
        if configs[0].original_ln_after and site.mode == "sum":
            y = e.add(y, state.input)
            if composer.norm is not None:
                y = e.norm(composer.norm, y)
    e.replace(site, y)


def route_ids(ids: torch.Tensor, present: tuple[bool, ...]) -> torch.Tensor:
    """Map PerRow indices to this site's adapters (absent here → -1, no adapter)."""
    table, j = [], 0
    for p in present:
        table.append(j if p else -1)
        j += p
    if len(table) and all(t == i for i, t in enumerate(table)):
        return ids
    lookup = torch.tensor([*table, -1], device=ids.device)  # index -1 → the trailing -1
    return lookup[ids]


def weighted_mean(hiddens: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    """AdapterHub's Average: ``mean(stack(hiddens) * weights)`` (the mean divides by the count once more).

    The weights are fp32 as in AdapterHub (fp64 for fp64 activations, so they are not rounded there); half
    precision hiddens are averaged in fp32 and cast back to their dtype."""
    stacked = torch.stack(hiddens, 0)
    wide = widened(stacked)
    w = torch.tensor(weights, dtype=wide.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    return torch.mean(wide * w, dim=0).to(stacked.dtype)

"""Bottleneck adapters (AdapterHub's ``seq_bn``, ``double_seq_bn``, ``par_bn``, ``scaled_par_bn``).

With ``h = dropout(dense(x_in))`` the sublayer output, ``x`` the residual input, ``LN`` the layer's own norm
(absent in pre-LN layers) and ``A(z) = dropout(s · up(act(down(z))))`` the bottleneck, a sequential adapter
computes (AdapterHub ``Adapter.pre_forward/forward/post_forward``):

    residual = h                                   (residual_before_ln=True)
    z        = LN(h + x) if original_ln_before else h
    residual = h + x if residual_before_ln == "post_add";  = z if residual_before_ln is False
    a        = A(z) + residual                     (ln_after / adapter_residual_before_ln move a new LN around)
    y        = LN(a + x) if original_ln_after else a

so ``seq_bn`` is ``y = LN(A(LN(h + x)) + h + x)`` and ``double_seq_bn`` is ``y = LN(A(h) + h + x)``.
A parallel adapter (``par_bn``) reads the residual input: ``y = LN(h + x + A(x))`` with ``s = 4``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from ..compose import Composer, Fuse, PerRow, check_size, compose
from ..errors import CompositionError, ConfigError, nearest
from ..lowering import fused_bottleneck, per_row_bottleneck, why_not_fused
from ..routing import current_ids
from ..sites import RESIDUAL_SITE_KINDS
from .base import AdapterConfig, Method, register_method, register_preset

__all__ = ["Bottleneck", "BottleneckConfig", "activation", "activation_names"]

_INITS = ("bert", "mam_adapter", "houlsby")


def activation_names() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted({*ACT2FN.keys(), "leakyrelu", "identity", "linear"})


def activation(name: str) -> nn.Module:
    """The activation AdapterHub builds for ``non_linearity=name`` (transformers' ACT2FN, case-insensitive)."""
    from transformers.activations import get_activation

    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key in ("identity", "linear"):
        return nn.Identity()
    return get_activation(key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BottleneckConfig(AdapterConfig):
    """A bottleneck adapter. Defaults are AdapterHub's ``SeqBnConfig`` (Pfeiffer et al., 2020).

    Args:
        sites: residual site kinds to attach to (``"attn.out"``, ``"ffn.out"``, ``"cross.out"``).
        reduction_factor: hidden size / bottleneck width; a float, or a mapping from layer index (as a string)
            to a float with an optional ``"default"`` entry.
        non_linearity: activation between the projections (``"relu"``, ``"swish"``, ``"gelu"``, ...).
        original_ln_before: apply the layer's residual add and norm before the adapter.
        original_ln_after: apply the layer's residual add and norm after the adapter.
        residual_before_ln: where the adapter's own residual is taken: ``True`` (sublayer output), ``"post_add"``
            (after the layer's residual add) or ``False`` (the adapter input).
        adapter_residual_before_ln: with ``ln_after``, add the adapter residual before that new norm.
        ln_before / ln_after: new LayerNorms inside the adapter.
        is_parallel: parallel adapter reading the sublayer's residual input (He et al., 2021).
        scaling: output scale: a float, ``"learned"`` (a scalar parameter) or ``"channel"`` (a vector).
        init_weights: ``"bert"`` (N(0, 0.02) on both projections), ``"mam_adapter"`` (Kaiming down, zero up)
            or ``"houlsby"`` (truncated normal, std 1e-2).
        dropout: dropout on the adapter output.
        leave_out: layer indices (over all layer lists, encoder first) that get no adapter.
    """

    method = "bottleneck"

    sites: tuple[str, ...] = ("ffn.out",)
    reduction_factor: float | Mapping[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | str = 1.0
    init_weights: str = "bert"
    dropout: float = 0.0
    leave_out: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def fail(field: str, value: Any, expected: str, choices: Any = ()) -> None:
            raise ConfigError(
                f"BottleneckConfig.{field}={value!r} is invalid; expected {expected}"
                f"{nearest(str(value), choices) if choices else ''}"
            )

        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        object.__setattr__(self, "sites", sites)
        if not sites:
            fail("sites", self.sites, f"a non-empty tuple of {sorted(RESIDUAL_SITE_KINDS)}")
        for s in sites:
            if s not in RESIDUAL_SITE_KINDS:
                fail("sites", s, f"residual site kinds {sorted(RESIDUAL_SITE_KINDS)}", RESIDUAL_SITE_KINDS)
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            rf = {str(k): v for k, v in rf.items()}
            object.__setattr__(self, "reduction_factor", rf)
            values = list(rf.values())
        else:
            values = [rf]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                fail("reduction_factor", v, "a finite number > 0 (hidden size / bottleneck width)")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in activation_names():
            fail("non_linearity", self.non_linearity, f"one of {activation_names()}", activation_names())
        for flag in (
            "original_ln_before",
            "original_ln_after",
            "adapter_residual_before_ln",
            "ln_before",
            "ln_after",
            "is_parallel",
        ):
            if not isinstance(getattr(self, flag), bool):
                fail(flag, getattr(self, flag), "True or False")
        if self.residual_before_ln not in (True, False, "post_add"):
            fail("residual_before_ln", self.residual_before_ln, "True, False or 'post_add'")
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                fail("scaling", self.scaling, "a float, 'learned' or 'channel'", ("learned", "channel"))
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            fail("scaling", self.scaling, "a float, 'learned' or 'channel'")
        if self.init_weights not in _INITS:
            fail("init_weights", self.init_weights, f"one of {list(_INITS)}", _INITS)
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            fail("dropout", self.dropout, "a probability in [0, 1)")
        leave_out = tuple(self.leave_out)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in leave_out):
            fail("leave_out", self.leave_out, "a list of layer indices (ints >= 0)")
        object.__setattr__(self, "leave_out", leave_out)

    def reduction_for(self, layer_index: int) -> float:
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            if str(layer_index) in rf:
                return rf[str(layer_index)]
            if "default" in rf:
                return rf["default"]
            raise ConfigError(
                f"BottleneckConfig.reduction_factor={dict(rf)!r} has no entry for layer {layer_index} and no "
                "'default'; add a 'default' key"
            )
        return rf


class Bottleneck(nn.Module):
    """The weights and core math of one bottleneck adapter: ``A(z)`` plus its own residual/norm options."""

    def __init__(self, hidden_size: int, width: int, config: BottleneckConfig):
        super().__init__()
        self.parallel = config.is_parallel
        self.residual_before_norm = config.adapter_residual_before_ln
        self.norm_before = nn.LayerNorm(hidden_size) if config.ln_before else None
        self.down = nn.Linear(hidden_size, width)
        self.act = activation(config.non_linearity)
        self.act_name = config.non_linearity.lower()
        self.up = nn.Linear(width, hidden_size)
        if config.scaling == "learned":
            self.scaling: float | nn.Parameter = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        self.norm_after = nn.LayerNorm(hidden_size) if config.ln_after else None
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "bert":
            for lin in (self.down, self.up):
                lin.weight.normal_(mean=0.0, std=0.02)
                lin.bias.zero_()
        elif init == "mam_adapter":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        elif init == "houlsby":
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                lin.bias.zero_()

    def forward(
        self, z: torch.Tensor, residual: torch.Tensor | None = None, return_up: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The adapter's output; with ``return_up`` also the scaled up-projection (what AdapterFusion attends)."""
        inner = self.norm_before(z) if self.norm_before is not None else z
        up = self.up(self.act(self.down(inner))) * self.scaling
        out = self.dropout(up)
        if self.parallel:
            out = self.norm_after(out) if self.norm_after is not None else out
        else:
            if self.residual_before_norm:
                out = out + residual
            if self.norm_after is not None:
                out = self.norm_after(out)
            if not self.residual_before_norm:
                out = out + residual
        return (out, up) if return_up else out


@register_method
class BottleneckMethod(Method):
    name = "bottleneck"
    config_class = BottleneckConfig

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, BottleneckConfig)
        return config.sites

    def build(self, config, site, layer, layer_index):  # type: ignore[override]
        hidden_size = site.hidden_size
        rf = config.reduction_for(layer_index)
        width = int(hidden_size // rf)
        if width < 1 or rf > hidden_size:
            raise ConfigError(
                f"BottleneckConfig.reduction_factor={rf!r} gives a bottleneck of width {width} for hidden size "
                f"{hidden_size}; expected 0 < reduction_factor <= {hidden_size}"
            )
        return Bottleneck(hidden_size, width, config)

    def compose_site(self, emitter, site, setup, plan):  # type: ignore[override]
        if isinstance(setup, PerRow):
            return _per_row_site(emitter, site, setup, plan)
        e = emitter
        refs = {ref.name: ref for ref in plan.adapters}
        composer = _BottleneckComposer(
            e, site, refs, {name: (target, cfg) for name, target, cfg in plan.fusions}
        )
        h, x = e.node(site.h), e.node(site.x)
        with e.after(site.output):
            state = compose(composer, setup, _State(h, x, x, None, None))
            if state.last is None:  # nothing of the setup applies at this site: it stays as it was
                e.discard()
                return
            last = refs[state.last].config
            y = state.hidden
            if last.is_parallel:
                y = e.add(y, h)
            if last.original_ln_after:
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
            return self.e.function(torch.cat, (list(nodes),), {"dim": dim})

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
    h, x = e.node(site.h), e.node(site.x)
    first = next(iter(refs))
    with e.after(site.output):
        state = composer._pre_forward(first, _State(h, x, x, None, None))[0]
        device = e.function(getattr, (h, "device"))
        ids = e.function(
            route_ids, (e.function(current_ids, (device,)), tuple(n in refs for n in setup.children))
        )
        modules = [e.attr(refs[n].target) for n in setup.children if n in refs]
        residual = state.residual if not configs[0].is_parallel else None
        y = e.function(per_row_bottleneck, (state.hidden, residual, ids, modules))
        if configs[0].is_parallel:
            y = e.add(y, h)
        if configs[0].original_ln_after:
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
    """AdapterHub's Average: ``mean(stack(hiddens) * weights)`` (the mean divides by the count once more)."""
    stacked = torch.stack(hiddens, 0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(
        -1, *([1] * (stacked.dim() - 1))
    )
    return torch.mean(stacked * w, dim=0)


def _preset(**kw: Any):
    return lambda: BottleneckConfig(**kw)


register_preset("seq_bn", _preset())
register_preset("pfeiffer", _preset())
register_preset(
    "double_seq_bn",
    _preset(sites=("attn.out", "ffn.out"), original_ln_before=False, non_linearity="swish"),
)
register_preset(
    "houlsby", _preset(sites=("attn.out", "ffn.out"), original_ln_before=False, non_linearity="swish")
)
register_preset(
    "par_bn",
    _preset(
        original_ln_before=False,
        is_parallel=True,
        reduction_factor=2,
        scaling=4.0,
        init_weights="mam_adapter",
    ),
)
register_preset(
    "scaled_par_bn",
    _preset(
        original_ln_before=False,
        is_parallel=True,
        reduction_factor=2,
        scaling="learned",
        init_weights="mam_adapter",
    ),
)

"""LoRA (Hu et al., 2021) at module sites, and the elementwise "scale" composition that (IA)^3 builds on.

A LoRA adapter at a projection ``y = W x + b`` (a Linear-like call found in the layer graph) adds a low-rank
update; with ``s = alpha / r`` (``alpha / √r`` for rsLoRA):

    add   (LoRA):    y' = W x + b + s · B A dropout(x)          A: [r, in], B: [out, r]
    scale ((IA)^3):  y' = (W x + b) ⊙ (s · B)                   B: [out, 1], r = 1

which are AdapterHub's ``LoRA`` and ``IA3`` modules (``adapters/methods/lora.py``) and PEFT's ``lora.Linear``
(``result + lora_B(lora_A(dropout(x))) * scaling``). On a fused projection (GPT-2's ``c_attn``) ``attn.q`` is a
slice ``[start, stop)`` of the output features: the update touches only that slice (zeros / ones elsewhere),
as AdapterHub's ``LoRAMergedLinear`` does with its ``lora_ind`` padding.

The rewrite inserts one call of the adapter module right after the projection's call and reroutes the users of the
projection output. For LoRA on ``attn.q`` and (IA)^3 on ``attn.k`` of a BERT layer the generated code reads::

    attention_self_query = self.attention.self.query(hidden_states)
    fxadapt_a_attn_q = self.fxadapt.a.attn_q(hidden_states)          # s · B A dropout(x)
    add_2 = attention_self_query + fxadapt_a_attn_q
    view = add_2.view(getitem_1, getitem_2, -1, 8)                   # was: attention_self_query.view(...)
    ...
    fxadapt_b_attn_k = self.fxadapt.b.attn_k()                       # alpha · B
    mul = attention_self_key * fxadapt_b_attn_k

Both are linear reparametrisations of the projection, so :meth:`LoRAMethod.merge` folds them into its weight
(``W ± s·B A`` on the slice's rows; rows and bias scaled by ``s·B`` or divided by it), respecting HF's ``Conv1D``
layout (weight stored ``[in, out]``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..compose import Composer
from ..errors import CompositionError, ConfigError, SiteNotFoundError
from ..lowering import lower_projection, why_not_fused
from .base import AdapterConfig, Method, register_method, register_preset, widened

__all__ = ["IA3Vector", "LoRA", "LoRAConfig", "LoRAMethod", "lora_delta", "projection_features"]

from .lora_config import _LINEAR, _MODEL, LoRAConfig

# ----------------------------------------------------------------------------------------------------------------
# weights and reference math


def lora_delta(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The reference LoRA update ``s · (x Aᵀ) Bᵀ`` (``x``: [..., in], A: [r, in], B: [out, r])."""
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def projection_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, transposed)`` of a Linear-like module; ``transposed`` for HF's ``Conv1D``
    (weight stored ``[in, out]``)."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        nf = getattr(module, "nf", None)  # transformers' Conv1D: weight [in, out], out = nf
        if isinstance(nf, int) and weight.shape[1] == nf:
            return int(weight.shape[0]), int(weight.shape[1]), True
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if (out_f, in_f) == tuple(weight.shape):
            return int(in_f), int(out_f), False
    raise ConfigError(
        f"LoRA cannot adapt a {type(module).__name__}: expected nn.Linear, transformers' Conv1D or a module with "
        "in_features/out_features and a [out, in] weight"
    )


class _SiteSlice(nn.Module):
    """Where the adapter's features sit in the projection output: the runs ``ranges`` of ``width`` features (one
    run for a contiguous part of a fused projection, several for parts interleaved per head)."""

    def __init__(self, out_ranges, width: int):
        super().__init__()
        if out_ranges is not None and len(out_ranges) == 2 and isinstance(out_ranges[0], int):
            out_ranges = (tuple(out_ranges),)  # a single (start, stop) slice
        self.ranges: tuple[tuple[int, int], ...] = (
            tuple(out_ranges) if out_ranges is not None else ((0, width),)
        )
        self.start, self.stop = self.ranges[0][0], self.ranges[-1][1]
        self.width = width
        self._index: torch.Tensor | None = None

    @property
    def whole(self) -> bool:
        return self.ranges == ((0, self.width),)

    def feature_index(self, device: torch.device | None = None) -> slice | torch.Tensor:
        """The adapter's output features: a slice for one run, else an index tensor."""
        if len(self.ranges) == 1:
            return slice(self.start, self.stop)
        if self._index is None or (device is not None and self._index.device != device):
            index = torch.cat([torch.arange(a, b) for a, b in self.ranges])
            self._index = index.to(device) if device is not None else index
        return self._index

    def pad(self, t: torch.Tensor, value: float) -> torch.Tensor:
        """Place the last dimension of ``t`` at the adapter's features of the projection's full width."""
        if self.whole:
            return t
        if len(self.ranges) == 1:
            return F.pad(t, (self.start, self.width - self.stop), value=value)
        out = t.new_full((*t.shape[:-1], self.width), value)
        return out.index_copy(-1, self.feature_index(t.device), t)

    def extra_repr(self) -> str:
        return "" if self.whole else f"out_ranges={list(self.ranges)} of {self.width}"


class LoRA(_SiteSlice):
    """One LoRA update at one projection: ``forward(x) = s · B A dropout(x)`` (zero-padded to the full width)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        out_slice=None,
        width: int | None = None,
    ):
        super().__init__(out_slice, width if width is not None else out_features)
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters(config.init_weights)
        self.gate = nn.Linear(in_features, 1) if getattr(config, "use_gating", False) else None
        if self.gate is not None:  # AdapterHub: N(0, 0.02) weight, torch's default bias
            nn.init.normal_(self.gate.weight, std=0.02)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "lora":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init == "bert":
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.lora_A.shape[0])
            nn.init.zeros_(self.lora_B)
        elif init == "ia3":
            nn.init.ones_(self.lora_A)
            nn.init.ones_(self.lora_B)
        elif init == "vera":  # AdapterHub allows VeRA's init for plain LoRA too: Kaiming-uniform A and B
            nn.init.kaiming_uniform_(self.lora_A)
            nn.init.kaiming_uniform_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:  # the gate replaces the scaling (AdapterHub's LoRA.forward)
            gate = torch.sigmoid(self.gate(x)).mean(dim=1).unsqueeze(-1)
            return self.pad(lora_delta(self.dropout(x), self.lora_A, self.lora_B, 1.0) * gate, 0.0)
        return self.pad(lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scaling), 0.0)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` ([out, in], fp32), the update :meth:`LoRAMethod.merge` folds into the weight."""
        return (widened(self.lora_B) @ widened(self.lora_A)) * self.scaling


class IA3Vector(_SiteSlice):
    """One (IA)^3 scale at one projection: ``forward() = s · B`` (padded with ones to the full width)."""

    def __init__(self, out_features: int, config: LoRAConfig, out_slice=None, width: int | None = None):
        super().__init__(out_slice, width if width is not None else out_features)
        self.lora_B = nn.Parameter(torch.zeros(out_features, 1))  # AdapterHub's shape: [out, r=1]
        self.scaling = config.scaling
        self.reset_parameters(config.init_weights)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if init == "ia3":
            nn.init.ones_(self.lora_B)
        elif init == "lora":
            nn.init.zeros_(self.lora_B)
        elif init == "bert":
            nn.init.normal_(self.lora_B, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.pad(self.scale_vector(), 1.0)

    def scale_vector(self) -> torch.Tensor:
        return self.lora_B.view(-1) * self.scaling


# ----------------------------------------------------------------------------------------------------------------
# method


def _graph_node(emitter: Any, name: str) -> fx.Node:
    """The node called ``name`` itself (``emitter.node`` gives what replaced it if an earlier rewrite did)."""
    return next(n for n in emitter.graph.nodes if n.name == name)


def _call_input(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()))


@register_method
class LoRAMethod(Method):
    name = "lora"
    config_class = LoRAConfig
    mergeable = True
    compositions = ("Stack", "Parallel", "BatchSplit", "Average")
    formats = ("fxadapt", "adapterhub", "peft")

    def supported_formats(self, config: AdapterConfig) -> tuple[str, ...]:
        out = list(self.formats)
        form = getattr(config, "use_dora", False) or getattr(config, "is_vera", False)
        variant = getattr(config, "variant", "adapterhub")
        if (getattr(config, "use_gating", False) or (form and variant != "peft")) and "peft" in out:
            out.remove("peft")  # PEFT has no gated LoRA; DoRA/VeRA follow one peer's formula
        if form and variant != "adapterhub" and "adapterhub" in out:
            out.remove("adapterhub")
        return tuple(out)

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, LoRAConfig)
        return config.sites

    def why_not_mergeable(self, config: AdapterConfig) -> str | None:
        if getattr(config, "use_gating", False):
            return "its gate depends on each input (gated LoRA), so no fixed weight equals it"
        return None

    def requests(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, LoRAConfig)
        if config.target_modules is not None:
            return ()  # names may match outside the layers too: build_model_parts checks every one
        return tuple(s for s in config.sites if not s.startswith(_MODEL))

    def build_model_parts(self, config, context):  # type: ignore[override]
        from .lora_outside import build_outside_parts  # lora_outside.py builds on this module

        return build_outside_parts(config, context)

    def model_hooks(self, config, context):  # type: ignore[override]
        from .lora_outside import OutsideHooks, outside_paths

        return {
            f"outside:{path}": (lambda model, path=path: OutsideHooks(model, path))
            for path in outside_paths(config, context.model, context.paths)
        }

    def select_sites(self, config, report, layer):  # type: ignore[override]
        if config.target_modules is None:
            out = super().select_sites(config, report, layer)
            if config.cross_attention:
                for kind in config.sites:
                    role = kind[len("attn.") :] if kind.startswith("attn.") else None
                    site = report.site(f"cross.{role}") if role in ("q", "k", "v", "o", "qkv") else None
                    if site is not None:
                        out.append((kind, site))
            return out
        out = []
        for request in config.target_modules:
            name = request.strip(".")
            for path in report.linears:
                if path == name or path.endswith("." + name):
                    site = report.site(_LINEAR + path)
                    if site is not None:
                        out.append((request, site))
        return out

    def build(self, config, site, layer, layer_index):  # type: ignore[override]
        try:
            proj = layer.get_submodule(site.module)
        except AttributeError:
            raise SiteNotFoundError(
                f"LoRA at {site.kind!r} of {type(layer).__name__}: that projection is the op {site.module!r} with a "
                "parameter weight (e.g. an einsum), not a module; LoRA adapts projection modules (nn.Linear, "
                "transformers' Conv1D)"
            ) from None
        in_f, width, transposed = projection_features(proj)
        ranges = getattr(site, "out_ranges", None)
        features = sum(b - a for a, b in ranges) if ranges is not None else width
        interleaved = ranges is not None and len(ranges) > 1
        if interleaved and (config.use_dora or config.is_vera or _feeds_forward(config, site)):
            raise ConfigError(
                f"{config.method} at {site.kind!r}: that site is a part of {site.module!r} interleaved per head; "
                "DoRA, VeRA and input-scaling (IA)^3 need a contiguous part or the whole projection (attn.qkv)"
            )
        start, stop = site.out_slice if site.out_slice is not None else (0, width)
        if config.composition_mode == "scale" and _feeds_forward(config, site):
            from .ia3 import IA3InputVector  # ia3.py builds on this module

            module: nn.Module = IA3InputVector(in_f, config, site, transposed)
        elif config.composition_mode == "scale":
            module = IA3Vector(features, config, ranges, width)
        elif config.use_dora:
            from .dora import DoRALoRA  # dora.py builds on this module

            rows = (proj.weight.t() if transposed else proj.weight)[start:stop]
            module = DoRALoRA(in_f, stop - start, config, rows, transposed, site.out_slice, width)
        else:
            module = LoRA(in_f, features, config, ranges, width)
        return module.train(layer.training)  # an eval model gets an eval adapter (its dropout off)

    def build_all(self, config, sites, layers, paths):  # type: ignore[override]
        if not config.is_vera:
            return super().build_all(config, sites, layers, paths)
        from .vera import DoRAVeRA, VeRA, build_vera  # vera.py builds on this module

        shapes, info = {}, {}
        for key, site in sites.items():
            if getattr(site, "interleaved", False):
                raise ConfigError(
                    f"VeRA at {site.kind!r}: that site is a part of {site.module!r} interleaved per head; VeRA needs "
                    "a contiguous part or the whole projection (attn.qkv)"
                )
            proj = layers[key[0]].get_submodule(site.module)
            in_f, width, transposed = projection_features(proj)
            start, stop = site.out_slice if site.out_slice is not None else (0, width)
            shapes[key] = (in_f, stop - start)
            info[key] = (proj, width, transposed, start, stop)
        if not sites:
            return {}
        order = sorted(sites)
        shared = build_vera(config, shapes, order[0])
        out = {}
        for key in order:
            proj, width, transposed, start, stop = info[key]
            args = (
                shapes[key][0],
                shapes[key][1],
                config,
                shared,
                key == order[0],
                sites[key].out_slice,
                width,
            )
            if config.use_dora:
                rows = (proj.weight.t() if transposed else proj.weight)[start:stop]
                module: nn.Module = DoRAVeRA(*args, weight_rows=rows, transposed=transposed)
            else:
                module = VeRA(*args)
            out[key] = module.train(layers[key[0]].training)
        return out

    def compose_site(self, emitter, site, setup, plan):  # type: ignore[override]
        # a module called several times in the layer (DeBERTa's key projection on the relative embeddings too)
        # gets the update at every call, as a module wrapper (PEFT, AdapterHub) would give it
        for node in getattr(site, "calls", (site.node,)):
            at = dataclasses.replace(site, node=node) if node != site.node else site
            self._compose_call(emitter, at, setup, plan)

    def _compose_call(self, emitter, site, setup, plan) -> None:
        from ..compose import PerRow, Stack

        if isinstance(setup, PerRow):  # each row its own LoRA / (IA)^3 (lora_rows.py)
            from .lora_rows import compose_per_row

            return compose_per_row(emitter, site, setup, plan)
        if isinstance(setup, Stack) and len(plan.adapters) == 1:
            return super().compose_site(emitter, site, setup, plan)  # the single-adapter rule below
        flat = isinstance(setup, Stack) and all(isinstance(c, str) for c in setup.children)
        modules = [emitter.root.get_submodule(ref.target) for ref in plan.adapters]
        input_scaled = any(getattr(m, "scales_input", False) for m in modules)
        if flat and input_scaled and all(ref.config.composition_mode == "scale" for ref in plan.adapters):
            return super().compose_site(emitter, site, setup, plan)  # scales commute: one after the other
        return compose_lora_site(emitter, site, setup, plan)

    def rewrite(self, emitter, site, target, config):  # type: ignore[override]
        e = emitter
        if e.lower:  # fused kernels serve this call (CUDA, or the forced interpreter): see fxadapt.lowering
            if config.composition_mode == "add" and lower_projection(e, site, target):
                return
            if config.composition_mode == "scale":
                e.notes.append(f"{e.name}: not lowered: {why_not_fused(e.root.get_submodule(target))}")
        call = _graph_node(e, site.node)
        module = e.root.get_submodule(target)
        if getattr(module, "scales_input", False):  # PEFT's feed-forward (IA)^3: W (x ⊙ l) + b
            return rewrite_input_scale(e, site, target, call)
        # the projection output, or what an earlier adapter at this projection made of it
        current = e.node(site.node)
        if getattr(module, "rewrites_output", False):  # DoRA: the new output from input, output, W and b
            proj = e.root.get_submodule(site.module)
            with e.after(site.node):
                weight = e.attr(f"{site.module}.weight")
                bias = e.attr(f"{site.module}.bias") if getattr(proj, "bias", None) is not None else None
                y = e.call(target, (_call_input(call), current, weight, bias))
            e.replace_node(site.node, y)
            return
        with e.after(site.node):
            if config.composition_mode == "scale":
                y = e.mul(current, e.call(target, ()))
            else:
                y = e.add(current, e.call(target, (_call_input(call),)))
        e.replace_node(site.node, y)

    @torch.no_grad()
    def merge(self, config, module, site, layer, sign):  # type: ignore[override]
        proj = layer.get_submodule(site.module)
        if hasattr(module, "merge_into"):  # DoRA, input-scaled (IA)^3: the module knows its own algebra
            module.merge_into(proj, sign)
            return
        _, _, transposed = projection_features(proj)
        weight, bias = proj.weight, getattr(proj, "bias", None)
        rows = module.feature_index(weight.device)
        if not isinstance(rows, slice):
            return _merge_rows(config, module, weight, bias, rows, transposed, sign)
        w = weight[:, rows] if transposed else weight[rows]  # a view: updated in place
        if config.composition_mode == "scale":
            v = widened(module.scale_vector())
            factor = v.view(1, -1) if transposed else v.view(-1, 1)
            new = widened(w) * factor if sign > 0 else widened(w) / factor
            w.copy_(new.to(w.dtype))
            if bias is not None:
                b = bias[rows]
                b.copy_((widened(b) * v if sign > 0 else widened(b) / v).to(b.dtype))
        else:
            delta = module.delta_weight()
            delta = delta.t() if transposed else delta
            w.copy_((widened(w) + sign * delta).to(w.dtype))


def _merge_rows(config, module, weight, bias, rows, transposed, sign) -> None:
    """:meth:`LoRAMethod.merge` for features interleaved in a fused projection (an index, not a view)."""
    dim = 1 if transposed else 0
    w = widened(weight.index_select(dim, rows))
    if config.composition_mode == "scale":
        v = widened(module.scale_vector())
        factor = v.view(1, -1) if transposed else v.view(-1, 1)
        new = w * factor if sign > 0 else w / factor
        if bias is not None:
            b = widened(bias.index_select(0, rows))
            bias.index_copy_(0, rows, (b * v if sign > 0 else b / v).to(bias.dtype))
    else:
        delta = module.delta_weight()
        new = w + sign * (delta.t() if transposed else delta)
    weight.index_copy_(dim, rows, new.to(weight.dtype))


register_preset("lora", lambda: LoRAConfig())


def _feeds_forward(config: LoRAConfig, site: Any) -> bool:
    """Whether (IA)^3 scales this projection's input (``IA3Config.feedforward_modules``: site kinds or module
    names, PEFT's ``feedforward_modules``)."""
    names = getattr(config, "feedforward_modules", ())
    return any(
        n == site.kind or site.module == n.strip(".") or site.module.endswith("." + n.strip("."))
        for n in names
    )


def rewrite_input_scale(e: Any, site: Any, target: str, call: fx.Node) -> None:
    """Scale the projection's input: ``proj(x)`` becomes ``proj(x * l)`` (a Stack of several multiplies)."""
    x = _call_input(call)
    with e.graph.inserting_before(call):  # the call itself, even if an earlier rewrite aliased its output
        vector = e.graph.call_module(target, ())
        vector.name = e.graph._graph_namespace.create_name(e.name, vector)
        scaled = e.graph.call_function(operator.mul, (x, vector))
    e.inserted += [vector, scaled]
    if call.args:
        call.args = (scaled, *call.args[1:])
    else:
        key = next(iter(call.kwargs))
        call.kwargs = {**call.kwargs, key: scaled}


# ----------------------------------------------------------------------------------------------------------------
# composition (AdapterHub's LoRALayer semantics)


class _LoRAState(NamedTuple):
    """At one projection: its input, the composed update so far (None: none yet), its output, the last adapter."""

    input: Any
    hidden: Any
    output: Any
    last: str | None


class _LoRAComposer(Composer[_LoRAState]):
    """Stack composes updates as a product (the second LoRA reads the first one's update: Wx + s₂B₂A₂(s₁B₁A₁x)),
    (IA)^3 scales multiply; Parallel/BatchSplit slice the batch; Average takes AdapterHub's weighted mean."""

    def __init__(self, emitter, site, refs):
        self.e, self.site, self.refs = emitter, site, refs

    def present(self, name: str) -> bool:
        return name in self.refs

    def single(self, name: str, state: _LoRAState) -> _LoRAState:
        ref = self.refs[name]
        if ref.config.composition_mode == "scale":
            scale = self.e.call(ref.target, (), name=ref.node_name(self.site.kind))
            # a per-row tensor (not the bare vector), so that batch slices and concatenations line up
            base = state.hidden if state.hidden is not None else self._identity(state)
            hidden = self.e.mul(base, scale)
        else:
            if state.hidden is not None:
                lora = self.e.root.get_submodule(ref.target)
                n_in = (
                    getattr(lora, "in_features", None) or lora.lora_A.shape[1]
                )  # VeRA, MTL-LoRA: attributes
                n_out = getattr(lora, "out_features", None) or lora.lora_B.shape[0]
                if n_in != n_out:
                    raise CompositionError(
                        f"Stack of LoRA adapters at {self.site.kind!r} ({n_in} -> "
                        f"{n_out} features): a stacked LoRA reads the previous one's update, which "
                        "needs a square projection (attn.q/k/v/o); stack them at square projections only"
                    )
            source = state.input if state.hidden is None else state.hidden
            hidden = self.e.call(ref.target, (source,), name=ref.node_name(self.site.kind))
        return state._replace(hidden=hidden, last=name)

    def vslice(self, state: _LoRAState, index: Any) -> _LoRAState:
        g = self.e.getitem
        return _LoRAState(
            g(state.input, index),
            g(state.hidden, index) if state.hidden is not None else None,
            g(state.output, index),
            state.last,
        )

    def cat(self, states: list[_LoRAState], dim: int, base: _LoRAState) -> _LoRAState:
        def cat(nodes: list[Any]) -> Any:
            return self.e.function(torch.cat, (nodes,), {"dim": dim})

        hiddens = [s.hidden if s.hidden is not None else self._identity(s) for s in states]
        last = next((s.last for s in reversed(states) if s.last), base.last)
        return _LoRAState(cat([s.input for s in states]), cat(hiddens), cat([s.output for s in states]), last)

    def _identity(self, state: _LoRAState) -> Any:
        """The update of a slice no adapter touched: zero (add) or one (scale)."""
        mode = next(iter(self.refs.values())).config.composition_mode
        fill = torch.zeros_like if mode == "add" else torch.ones_like
        return self.e.function(fill, (state.output,))

    def mean(self, states: list[_LoRAState], weights: tuple[float, ...]) -> _LoRAState:
        from .bottleneck import weighted_mean

        hidden = self.e.function(weighted_mean, ([s.hidden for s in states], weights))
        return states[0]._replace(hidden=hidden, last=states[-1].last)

    def batch_size(self, state: _LoRAState) -> Any:
        return self.e.method("size", state.output, 0)

    def per_replica(self, state: _LoRAState, n: int) -> Any:
        return self.e.function(operator.floordiv, (self.batch_size(state), n))

    def times(self, value: Any, k: int) -> Any:
        return value if k == 1 else self.e.function(operator.mul, (value, k))

    def check(self, value: Any, expected: int, what: str) -> None:
        from ..compose import check_size

        self.e.function(check_size, (value, expected, what))


def compose_lora_site(emitter: Any, site: Any, setup: Any, plan: Any) -> None:
    from ..compose import compose

    refs = {ref.name: ref for ref in plan.adapters}
    for ref in refs.values():
        module = emitter.root.get_submodule(ref.target)
        feature = (
            "DoRA (use_dora=True)"
            if getattr(module, "rewrites_output", False)
            else "feed-forward (IA)^3 (input scaling)"
            if getattr(module, "scales_input", False)
            else None
        )
        if feature is not None:
            raise CompositionError(
                f"adapter {ref.name!r} ({ref.config.method}, {feature}) at {site.kind!r} runs only alone or in a "
                f"Stack of adapter names, not in {setup!r} with {sorted(set(refs) - {ref.name}) or 'others'}"
            )
    if getattr(site, "out_ranges", None) is not None and len(refs) > 1:
        raise CompositionError(
            f"composing several LoRA adapters at the sliced site {site.kind!r} of a fused projection is not "
            "supported; adapt the whole projection (attn.qkv) instead"
        )
    e = emitter
    call = _graph_node(e, site.node)
    current = e.node(site.node)
    with e.after(site.node):
        state = compose(
            _LoRAComposer(e, site, refs), setup, _LoRAState(_call_input(call), None, current, None)
        )
        if state.last is None or state.hidden is None:
            e.discard()
            return
        if refs[state.last].config.composition_mode == "scale":
            y = e.mul(state.output, state.hidden)
        else:
            y = e.add(state.output, state.hidden)
    e.replace_node(site.node, y)

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
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..compose import Composer
from ..errors import CompositionError, ConfigError, nearest
from ..lowering import lower_projection, why_not_fused
from ..sites import MODULE_SITE_KINDS
from .base import AdapterConfig, Method, register_method, register_preset

__all__ = ["IA3Vector", "LoRA", "LoRAConfig", "LoRAMethod", "lora_delta", "projection_features"]

_INITS = ("lora", "bert", "gaussian", "ia3")
_MODES = ("add", "scale")
_LINEAR = "linear:"


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA at projections. Defaults are AdapterHub's ``LoRAConfig`` (``"lora"``): r=8, alpha=8, q and v.

    Args:
        sites: module site kinds to adapt: ``attn.q/k/v/o``, ``attn.qkv`` (a whole fused projection),
            ``ffn.up/gate/down``, ``cross.q/k/v/o``, or ``linear:<module path in the layer>``. Default
            ``("attn.q", "attn.v")`` (AdapterHub's ``attn_matrices=["q", "v"]``).
        target_modules: PEFT-style alternative to ``sites``: module names; a name matches every Linear-like call
            in a layer whose path equals it or ends with ``.<name>`` (``"query"`` → ``attention.self.query``).
        r: rank (> 0).
        alpha: scaling numerator (> 0): ``s = alpha / r``.
        dropout: dropout on the LoRA input (``add`` mode only), in [0, 1).
        use_rslora: ``s = alpha / √r`` (Kalajdzievski, 2023) instead of ``alpha / r``.
        init_weights: ``"lora"`` (A Kaiming-uniform with a=√5, B zeros: a no-op at init), ``"bert"``
            (A, B ~ N(0, 0.02)), ``"gaussian"`` (PEFT: A ~ N(0, 1/r), B zeros) or ``"ia3"`` (ones).
        composition_mode: ``"add"`` (LoRA) or ``"scale"`` ((IA)^3: the output times ``s·B``, needs r=1).
        leave_out: layer indices (over all layer lists, encoder first) that get no adapter.
    """

    method: ClassVar[str] = "lora"
    default_sites: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")

    sites: tuple[str, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: str = "lora"
    composition_mode: str = "add"
    leave_out: tuple[int, ...] = ()

    def _fail(self, field: str, value: Any, expected: str, choices: Any = ()) -> None:
        raise ConfigError(
            f"{type(self).__name__}.{field}={value!r} is invalid; expected {expected}"
            f"{nearest(str(value), choices) if choices else ''}"
        )

    def __post_init__(self) -> None:
        fail = self._fail
        sites = _as_tuple(self.sites)
        targets = _as_tuple(self.target_modules)
        if targets is not None:
            if sites:
                fail(
                    "sites",
                    self.sites,
                    f"no sites when target_modules={list(targets)} is given (choose sites by kind or by name)",
                )
            if not targets or not all(isinstance(t, str) and t.strip(". ") for t in targets):
                fail("target_modules", self.target_modules, "a non-empty list of module names like 'query'")
            sites = ()
        elif sites is None:
            sites = self.default_sites
        elif not sites:
            fail("sites", self.sites, f"a non-empty tuple of module site kinds {sorted(MODULE_SITE_KINDS)}")
        for s in sites:
            if not isinstance(s, str) or (
                s not in MODULE_SITE_KINDS and not (s.startswith(_LINEAR) and len(s) > len(_LINEAR))
            ):
                fail(
                    "sites",
                    s,
                    f"module site kinds {sorted(MODULE_SITE_KINDS)} or 'linear:<module path>'",
                    MODULE_SITE_KINDS,
                )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "target_modules", targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            fail("r", self.r, "an int > 0 (the rank)")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not self.alpha > 0
            or not math.isfinite(self.alpha)
        ):
            fail("alpha", self.alpha, "a finite number > 0 (scaling = alpha / r)")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            fail("dropout", self.dropout, "a probability in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            fail("use_rslora", self.use_rslora, "True or False")
        if self.init_weights not in _INITS:
            fail("init_weights", self.init_weights, f"one of {list(_INITS)}", _INITS)
        if self.composition_mode not in _MODES:
            fail("composition_mode", self.composition_mode, f"one of {list(_MODES)}", _MODES)
        if self.composition_mode == "scale":
            if self.r != 1:
                fail("r", self.r, "1 with composition_mode='scale' (one scale per output feature)")
            if self.dropout:
                fail("dropout", self.dropout, "0.0 with composition_mode='scale' (no input to drop out)")
            if self.init_weights == "gaussian":
                fail(
                    "init_weights", self.init_weights, "'ia3', 'lora' or 'bert' with composition_mode='scale'"
                )
        leave_out = tuple(self.leave_out)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in leave_out):
            fail("leave_out", self.leave_out, "a list of layer indices (ints >= 0)")
        object.__setattr__(self, "leave_out", leave_out)

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # -- peer field names ---------------------------------------------------------------------------------------

    @classmethod
    def from_peft(cls, config: Any) -> LoRAConfig:
        """The config equal to a PEFT ``LoraConfig`` (or its ``to_dict()`` / ``adapter_config.json`` dict).

        Maps ``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora`` and ``init_lora_weights``
        (``True`` → ``"lora"``, ``"gaussian"``, ``False`` → ``"bert"``: random non-zero A and B). ``fan_in_fan_out``
        is not needed (fxadapt reads the layout from the module). Settings that change the method (DoRA,
        ``bias`` other than ``"none"``, rank/alpha patterns, ``layers_to_transform``, PiSSA/LoftQ/... inits)
        raise ConfigError.
        """
        data = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(data, Mapping):
            raise ConfigError(f"from_peft expects a peft LoraConfig or a dict, got {type(config).__name__}")
        data = dict(data)
        peft_type = str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "LORA"))
        if peft_type.upper() != "LORA":
            raise ConfigError(f"from_peft: peft_type={peft_type!r} is not a LoRA config; expected 'LORA'")
        targets = data.get("target_modules")
        if targets is None or isinstance(targets, str):
            raise ConfigError(
                f"from_peft: target_modules={targets!r} is not supported; expected a list of module names "
                "(PEFT's regex strings and 'all-linear' select by full model path)"
            )
        init = data.get("init_lora_weights", True)
        inits = {True: "lora", False: "bert", "gaussian": "gaussian"}
        if isinstance(init, str) and init.lower() == "gaussian":
            init = "gaussian"
        if not isinstance(init, (bool, str)) or init not in inits:
            raise ConfigError(
                f"from_peft: init_lora_weights={init!r} is not supported; expected True, False or 'gaussian'"
            )
        for key, value in data.items():
            if key in _PEFT_MAPPED or key in _PEFT_IGNORED:
                continue
            if value not in (None, False, "none", {}, [], ()):
                raise ConfigError(
                    f"from_peft: {key}={value!r} is not supported by fxadapt's LoRA; expected its PEFT default "
                    f"(supported fields: {sorted(_PEFT_MAPPED)})"
                )
        return cls(
            target_modules=tuple(sorted(targets)),
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            init_weights=inits[init],
        )

    @classmethod
    def from_adapterhub(cls, config: Any) -> LoRAConfig:
        """The config equal to an AdapterHub ``LoRAConfig`` / ``IA3Config`` (object or dict).

        ``selfattn_lora`` + ``attn_matrices`` → ``attn.<m>``; ``intermediate_lora`` → ``ffn.up``;
        ``output_lora`` → ``ffn.down``. ``composition_mode="scale"`` gives an :class:`~fxadapt.IA3Config`.
        """
        data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        for key in ("use_gating", "use_dora", "vera_d", "vera_b"):
            if data.get(key) not in (None, False):
                raise ConfigError(
                    f"from_adapterhub: {key}={data[key]!r} is not supported; expected its default"
                )
        sites: list[str] = []
        if data.get("selfattn_lora", True):
            sites += [f"attn.{m}" for m in data.get("attn_matrices", ["q", "v"])]
        if data.get("intermediate_lora"):
            sites.append("ffn.up")
        if data.get("output_lora"):
            sites.append("ffn.down")
        kwargs = dict(
            sites=tuple(sites),
            r=data.get("r", 8),
            alpha=data.get("alpha", 8),
            dropout=data.get("dropout", 0.0),
            init_weights=data.get("init_weights", "lora"),
            composition_mode=data.get("composition_mode", "add"),
            leave_out=tuple(data.get("leave_out") or ()),
        )
        target = cls
        if kwargs["composition_mode"] == "scale":
            from .ia3 import IA3Config

            target = IA3Config
        return target(**kwargs)


_PEFT_MAPPED = {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "init_lora_weights"}
# bookkeeping fields of a PEFT config that do not change what the adapter computes
_PEFT_IGNORED = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
    "modules_to_save",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "ensure_weight_tying",
}


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)


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
    """Where the adapter's features sit in the projection output: ``[start, stop)`` of ``width``."""

    def __init__(self, out_slice: tuple[int, int] | None, width: int):
        super().__init__()
        self.start, self.stop = out_slice if out_slice is not None else (0, width)
        self.width = width

    def pad(self, t: torch.Tensor, value: float) -> torch.Tensor:
        """Pad the last dimension of ``t`` from the slice to the projection's full width."""
        if self.start == 0 and self.stop == self.width:
            return t
        return F.pad(t, (self.start, self.width - self.stop), value=value)

    def extra_repr(self) -> str:
        sliced = self.start != 0 or self.stop != self.width
        return f"out_slice=({self.start}, {self.stop}) of {self.width}" if sliced else ""


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(lora_delta(self.dropout(x), self.lora_A, self.lora_B, self.scaling), 0.0)

    def delta_weight(self) -> torch.Tensor:
        """``s · B A`` ([out, in], fp32), the update :meth:`LoRAMethod.merge` folds into the weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


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

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, LoRAConfig)
        return config.sites

    def requests(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, LoRAConfig)
        return config.target_modules if config.target_modules is not None else config.sites

    def select_sites(self, config, report, layer):  # type: ignore[override]
        if config.target_modules is None:
            return super().select_sites(config, report, layer)
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
        in_f, width, _ = projection_features(layer.get_submodule(site.module))
        start, stop = site.out_slice if site.out_slice is not None else (0, width)
        if config.composition_mode == "scale":
            module: nn.Module = IA3Vector(stop - start, config, site.out_slice, width)
        else:
            module = LoRA(in_f, stop - start, config, site.out_slice, width)
        return module.train(layer.training)  # an eval model gets an eval adapter (its dropout off)

    def compose_site(self, emitter, site, setup, plan):  # type: ignore[override]
        from ..compose import Stack

        if isinstance(setup, Stack) and len(plan.adapters) == 1:
            return super().compose_site(emitter, site, setup, plan)  # the single-adapter rule below
        return compose_lora_site(emitter, site, setup, plan)

    def rewrite(self, emitter, site, target, config):  # type: ignore[override]
        e = emitter
        if e.lower:  # fused kernels serve this call (CUDA, or the forced interpreter): see fxadapt.lowering
            if config.composition_mode == "add" and lower_projection(e, site, target):
                return
            if config.composition_mode == "scale":
                e.notes.append(f"{e.name}: not lowered: {why_not_fused(e.root.get_submodule(target))}")
        call = _graph_node(e, site.node)
        # the projection output, or what an earlier adapter at this projection made of it
        current = e.node(site.node)
        with e.after(site.node):
            if config.composition_mode == "scale":
                y = e.mul(current, e.call(target, ()))
            else:
                y = e.add(current, e.call(target, (_call_input(call),)))
        e.replace_node(site.node, y)

    @torch.no_grad()
    def merge(self, config, module, site, layer, sign):  # type: ignore[override]
        proj = layer.get_submodule(site.module)
        _, _, transposed = projection_features(proj)
        weight, bias = proj.weight, getattr(proj, "bias", None)
        rows = slice(module.start, module.stop)
        w = weight[:, rows] if transposed else weight[rows]  # a view: updated in place
        if config.composition_mode == "scale":
            v = module.scale_vector().float()
            factor = v.view(1, -1) if transposed else v.view(-1, 1)
            new = w.float() * factor if sign > 0 else w.float() / factor
            w.copy_(new.to(w.dtype))
            if bias is not None:
                b = bias[rows]
                b.copy_((b.float() * v if sign > 0 else b.float() / v).to(b.dtype))
        else:
            delta = module.delta_weight()
            delta = delta.t() if transposed else delta
            w.copy_((w.float() + sign * delta).to(w.dtype))


register_preset("lora", lambda: LoRAConfig())


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
                if lora.lora_A.shape[1] != lora.lora_B.shape[0]:
                    raise CompositionError(
                        f"Stack of LoRA adapters at {self.site.kind!r} ({lora.lora_A.shape[1]} -> "
                        f"{lora.lora_B.shape[0]} features): a stacked LoRA reads the previous one's update, which "
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
    if site.out_slice is not None and len(refs) > 1:
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

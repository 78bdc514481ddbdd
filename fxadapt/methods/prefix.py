"""Prefix tuning (Li & Liang, 2021) with AdapterHub's reparameterisation, at the ``attn.kv`` / ``cross.kv`` sites.

Every attention call of a layer gets ``prefix_length`` learned key/value vectors in front of its keys and values
(after RoPE, with the key/value head count of the call, so GQA works), and its attention mask is extended so every
query sees them. As in AdapterHub, the prefixes of all layers at one location (the self-attention of a layer list,
or its cross-attention) come from one shared module::

    P = control_trans(wte(0..prefix_length-1))   # [prefix_length, n_layers · 2 · heads · head_dim]
    control_trans = Linear(hidden, bottleneck_size) → tanh → Linear(bottleneck_size, ...)   (flat=False)
    control_trans = a parameter of that size                                              (flat=True)

``fxadapt.eject_prefix(model, name)`` replaces the MLP by the prefixes it produces (flat), for inference.
The shared module lives in the first layer of its group; the other layers hold a reference to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, Method, register_method, register_preset
from .bottleneck import activation, activation_names

__all__ = ["PrefixTuningConfig", "extend_mask"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning. Defaults are AdapterHub's ``PrefixTuningConfig``.

    Args:
        prefix_length: learned key/value positions per attention call.
        bottleneck_size: width of the reparameterisation MLP (``flat=False``).
        non_linearity: activation of that MLP.
        flat: learn the prefixes directly instead of through the MLP.
        dropout: dropout on the prefixes.
        encoder_prefix: prefixes on the encoder's self-attention (encoder-decoder models).
        cross_prefix: prefixes on the cross-attention (encoder-decoder models).
        leave_out: layer indices (over all layer lists) without prefixes.
        use_gating: AdapterHub's gated prefixes (UniPELT): per attention call, the prefix keys and values times
            ``g = mean over positions of sigmoid(gate(h))``, ``h`` the attention's input (the input of its first
            projection), ``gate: Linear(hidden, 1)`` (``2``: separate key and value gates, ``shared_gating=False``).
        shared_gating: one gate for keys and values.
        shift_positions: the real tokens' positions start after the prefix (``prefix_length``), as in PEFT, whose
            prefixes are a pre-filled KV cache: ``position_ids`` are offset by a model pre-hook (the model must take
            ``position_ids``). Default False (AdapterHub: positions unchanged).
    """

    method = "prefix_tuning"

    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    flat: bool = False
    dropout: float = 0.0
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: tuple[int, ...] = ()
    use_gating: bool = False
    shared_gating: bool = True
    shift_positions: bool = False

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ConfigError(
                f"PrefixTuningConfig.{field}={getattr(self, field)!r} is invalid; expected {expected}"
            )

        for field in ("prefix_length", "bottleneck_size"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(field, "an int > 0")
        if not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in activation_names():
            fail("non_linearity", f"one of {activation_names()}")
        for field in (
            "flat",
            "encoder_prefix",
            "cross_prefix",
            "use_gating",
            "shared_gating",
            "shift_positions",
        ):
            if not isinstance(getattr(self, field), bool):
                fail(field, "True or False")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            fail("dropout", "a probability in [0, 1)")
        leave_out = tuple(self.leave_out)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in leave_out):
            fail("leave_out", "a list of layer indices (ints >= 0)")
        object.__setattr__(self, "leave_out", leave_out)


class PrefixPool(nn.Module):
    """The prefixes of ``n_layers`` attention calls with ``heads`` key/value heads of ``head_dim``."""

    def __init__(self, n_layers: int, heads: int, head_dim: int, input_size: int, config: PrefixTuningConfig):
        super().__init__()
        self.n_layers, self.heads, self.head_dim = n_layers, heads, head_dim
        self.prefix_length = config.prefix_length
        self.flat = config.flat
        width = n_layers * 2 * heads * head_dim
        if config.flat:
            self.control_trans = nn.Parameter(torch.randn(config.prefix_length * width))
        else:
            self.wte = nn.Embedding(config.prefix_length, input_size)
            self.control_trans = nn.Sequential(
                nn.Linear(input_size, config.bottleneck_size),
                activation(config.non_linearity),
                nn.Linear(config.bottleneck_size, width),
            )
        self.dropout = nn.Dropout(config.dropout)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[heads, prefix_length, head_dim]`` of the ``index``-th layer of the group."""
        p, h, d = self.prefix_length, self.heads, self.head_dim
        rows = slice(
            index * 2 * h * d, (index + 1) * 2 * h * d
        )  # this layer's (key, value) block of the output
        if self.flat:
            kv = self.control_trans.view(p, -1)[:, rows]
        else:
            first, act, last = self.control_trans
            hidden = act(first(self.wte.weight))  # the embeddings of positions 0..p-1
            kv = F.linear(
                hidden, last.weight[rows], last.bias[rows]
            )  # only this layer's slice of the last Linear
        kv = self.dropout(kv.reshape(p, 2, h, d)).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    @torch.no_grad()
    def ejected(self) -> PrefixPool:
        """A flat pool holding the prefixes this one produces now (AdapterHub's ``eject_prefix``)."""
        cfg = PrefixTuningConfig(prefix_length=self.prefix_length, flat=True, dropout=self.dropout.p)
        flat = PrefixPool(self.n_layers, self.heads, self.head_dim, 1, cfg)
        parts = [
            torch.stack(self.layer(i), 0).permute(2, 0, 1, 3) for i in range(self.n_layers)
        ]  # [p, 2, h, d]
        flat.control_trans.copy_(
            torch.cat([x.reshape(self.prefix_length, -1) for x in parts], dim=1).reshape(-1)
        )
        ref = next(self.parameters())
        return flat.to(device=ref.device, dtype=ref.dtype).train(self.training)


class PrefixSite(nn.Module):
    """One layer's view of a shared :class:`PrefixPool` (registered in the first layer of the group only)."""

    def __init__(self, pool: PrefixPool, index: int, owner: bool, gate: nn.Linear | None = None):
        super().__init__()
        self.index = index
        self.gate = gate
        if owner:
            self.pool = pool
        else:
            self.__dict__["_pool_ref"] = pool  # a reference: the pool's weights are saved once, in its owner

    def get_pool(self) -> PrefixPool:
        return self._modules["pool"] if "pool" in self._modules else self.__dict__["_pool_ref"]

    def set_pool(self, pool: PrefixPool) -> None:
        if "pool" in self._modules:
            self.pool = pool
        else:
            self.__dict__["_pool_ref"] = pool

    def forward(
        self, keys: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.get_pool().layer(self.index)
        shape = (keys.shape[0], *k.shape)
        k, v = k.to(keys.dtype).unsqueeze(0).expand(shape), v.to(keys.dtype).unsqueeze(0).expand(shape)
        if self.gate is not None:  # AdapterHub's prefix gates: [batch, 1 or 2] from the attention input
            g = torch.sigmoid(self.gate(hidden)).mean(dim=1).to(keys.dtype)
            k, v = k * g[:, 0].view(-1, 1, 1, 1), v * g[:, -1].view(-1, 1, 1, 1)
        return k, v


def extend_mask(
    mask: Any, prefix: int, query: torch.Tensor, keys: torch.Tensor, module: nn.Module, is_causal: Any = None
) -> Any:
    """The attention mask of a call whose keys got ``prefix`` positions in front: every query sees them.

    Boolean masks (``True`` = attend) get ``True`` columns, additive float masks ``0`` columns. Without a mask, a
    causal call (SDPA's ``is_causal`` shortcut) gets an explicit causal mask over the original keys; a non-causal
    one keeps no mask.
    """
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
        tq, tk = query.shape[-2], keys.shape[-2]
        if not causal or tq <= 1:
            return None
        pos_q = torch.arange(tq, device=query.device).unsqueeze(1) + (
            tk - tq
        )  # bottom-right aligned (caches)
        allowed = torch.arange(tk, device=query.device).unsqueeze(0) <= pos_q
        return F.pad(allowed, (prefix, 0), value=True)[None, None]
    if mask.dtype == torch.bool:
        return F.pad(mask, (prefix, 0), value=True)
    return F.pad(mask, (prefix, 0), value=0.0)


def _shift_positions(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Model pre-hook of ``shift_positions=True`` prefixes: ``position_ids`` count the active prefixes first."""
    from ..model import get_state

    state = get_state(model)
    if state is None or state.active is None:
        return None
    shift = sum(
        r.config.prefix_length
        for n in state.active.names()
        if (r := state.adapters.get(n)) is not None
        and isinstance(r.config, PrefixTuningConfig)
        and r.config.shift_positions
        and not r.merged
    )
    if not shift:
        return None
    positions = kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor):
        kwargs["position_ids"] = positions + shift
        return args, kwargs
    tokens = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    tokens = tokens if tokens is not None else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
    start = shift + past
    kwargs["position_ids"] = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand(
        tokens.shape[0], -1
    )
    return args, kwargs


def pad_keys(bias: torch.Tensor | None, prefix: int) -> torch.Tensor | None:
    """Zero columns in front of a per-key bias ``[..., keys]`` (T5's relative position bias)."""
    return None if bias is None else F.pad(bias, (prefix, 0), value=0.0)


@register_method
class PrefixTuningMethod(Method):
    name = "prefix_tuning"
    config_class = PrefixTuningConfig
    formats = ("fxadapt", "adapterhub", "peft")

    def supported_formats(self, config: AdapterConfig) -> tuple[str, ...]:
        # PEFT's prefixes are a pre-filled KV cache (positions shifted); AdapterHub has no gate-free form of gates
        return tuple(
            f for f in self.formats if f != "peft" or (config.shift_positions and not config.use_gating)
        )

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, PrefixTuningConfig)
        return ("attn.kv", "cross.kv") if config.cross_prefix else ("attn.kv",)

    def requests(self, config: AdapterConfig) -> tuple[str, ...]:
        return ("attn.kv",)  # cross.kv exists only in encoder-decoder models

    def build_all(self, config, sites, layers, paths):  # type: ignore[override]
        groups: dict[tuple[str, str], list[int]] = {}
        lists = {p.rsplit(".", 1)[0] for p in paths}
        for index, kind in sorted(sites, key=lambda ik: ik[0]):
            layer_list = paths[index].rsplit(".", 1)[0]
            if kind == "attn.kv" and not config.encoder_prefix and len(lists) > 1 and "encoder" in layer_list:
                continue
            groups.setdefault((layer_list, kind), []).append(index)
        out = {}
        for (_, kind), indices in groups.items():
            first = sites[(indices[0], kind)]
            pool = PrefixPool(
                len(indices), first.kv_heads, first.head_dim, first.q_heads * first.head_dim, config
            )
            for position, index in enumerate(indices):
                gate = None
                if config.use_gating:
                    width = _attention_input_width(layers[index], sites[(index, kind)].scope)
                    gate = nn.Linear(width, 1 if config.shared_gating else 2)
                    nn.init.normal_(
                        gate.weight, mean=0.0, std=0.02
                    )  # AdapterHub; the bias keeps torch's init
                out[(index, kind)] = PrefixSite(pool, position, owner=position == 0, gate=gate)
        return out

    def model_hooks(self, config, context):  # type: ignore[override]
        if not config.shift_positions:
            return {}
        import inspect

        try:
            takes = "position_ids" in inspect.signature(context.model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            takes = False
        if not takes:
            raise ConfigError(
                f"PrefixTuningConfig(shift_positions=True) offsets position_ids, which "
                f"{type(context.model).__name__}.forward does not take"
            )
        return {
            "shift_positions": lambda model: model.register_forward_pre_hook(
                _shift_positions, with_kwargs=True
            )
        }

    def eject(self, config, modules):  # type: ignore[override]
        if config.flat:
            return config
        ejected: dict[int, PrefixPool] = {}
        for module in modules.values():
            if isinstance(module, PrefixSite):
                pool = module.get_pool()
                if id(pool) not in ejected:
                    ejected[id(pool)] = pool.ejected()
                module.set_pool(ejected[id(pool)])
        return config.replace(flat=True)

    def rewrite(self, emitter, site, target, config):  # type: ignore[override]
        e = emitter
        call = e.node(site.node)
        args = list(call.args)
        f = (
            site.first
        )  # HF attention functions: (module, query, key, value, mask, ...); SDPA: (query, key, ...)
        query, keys, values = args[f], args[f + 1], args[f + 2]
        module = args[0] if f else None  # SDPA calls say is_causal themselves
        mask_key = "attention_mask" if f else "attn_mask"
        mask_in_kwargs = len(args) <= f + 3
        mask = call.kwargs.get(mask_key) if mask_in_kwargs else args[f + 3]
        with e.before(site.node):
            gated = config.use_gating
            pair = e.call(target, (keys, _attention_input(e, site)) if gated else (keys,))
            pk, pv = e.getitem(pair, 0), e.getitem(pair, 1)
            new_k = e.function(torch.cat, ([pk, keys],), {"dim": 2})
            new_v = e.function(torch.cat, ([pv, values],), {"dim": 2})
            new_mask = e.function(
                extend_mask, (mask, config.prefix_length, query, keys, module, call.kwargs.get("is_causal"))
            )
            bias = call.kwargs.get("position_bias")
            new_bias = (
                e.function(pad_keys, (bias, config.prefix_length)) if isinstance(bias, fx.Node) else None
            )
        args[f + 1], args[f + 2] = new_k, new_v
        kwargs = dict(call.kwargs)
        if new_bias is not None:
            kwargs["position_bias"] = new_bias  # T5: prefix keys get no relative-position bias
        if mask_in_kwargs:
            kwargs[mask_key] = new_mask
        else:
            args[f + 3] = new_mask
        if not f:
            kwargs["is_causal"] = False  # an explicit mask now says what is causal
        call.args, call.kwargs = tuple(args), kwargs


def _attention_projections(scope_module: nn.Module) -> list[tuple[str, nn.Module]]:
    from .lora import projection_features

    out = []
    for name, m in scope_module.named_modules():
        try:
            projection_features(m)
        except ConfigError:
            continue
        out.append((name, m))
    return out


def _attention_input_width(layer: nn.Module, scope: str) -> int:
    """Width of an attention module's input: the input features of its first projection."""
    from .lora import projection_features

    projections = _attention_projections(layer.get_submodule(scope) if scope else layer)
    if not projections:
        raise ConfigError(
            f"PrefixTuningConfig(use_gating=True): the attention module {scope!r} has no projection whose input "
            "the gate could read"
        )
    return projection_features(projections[0][1])[0]


def attention_module_path(layer: nn.Module, scope: str) -> str:
    """Path (in the layer) of the module that owns an attention call's projections: the parent of its first
    projection (BERT's ``attention.self``, GPT-2's ``attn``), where AdapterHub keeps its prefix gates."""
    projections = _attention_projections(layer.get_submodule(scope) if scope else layer)
    inner = projections[0][0].rpartition(".")[0] if projections else ""
    return ".".join(p for p in (scope, inner) if p)


def _attention_input(e: Any, site: Any) -> fx.Node:
    """The graph value an attention module received: the input of the first projection call in its scope."""
    prefix = f"{site.scope}." if site.scope else ""
    for node in e.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(prefix):
            try:
                module = e.root.get_submodule(str(node.target))
            except AttributeError:
                continue
            if any(m is module for _, m in _attention_projections(e.root.get_submodule(site.scope))):
                return node.args[0] if node.args else next(iter(node.kwargs.values()))
    raise ConfigError(f"prefix gates: no projection call of the attention module {site.scope!r} in the graph")


register_preset("prefix_tuning", lambda: PrefixTuningConfig())

"""Bottleneck adapters: AdapterHub's ``BnConfig`` family (``seq_bn``, ``double_seq_bn``, ``par_bn``,
``scaled_par_bn``, ``compacter``, ``compacter++``, ``seq_bn_inv``, ``double_seq_bn_inv``, AdapterPlus).

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

AdapterHub's other bottleneck options, each an option of :class:`BottleneckConfig` as in its ``BnConfig``:

- ``phm_layer`` (Compacter): the down and up projections are PHM layers (``phm.py``);
- ``use_gating``: ``A(z) · g`` with ``g = mean over positions of sigmoid(gate(z))`` (one scalar per sequence;
  ``gate: Linear(hidden, 1)``), as UniPELT uses it;
- ``stochastic_depth`` (AdapterPlus' drop path, torchvision's ``StochasticDepth(p, "row")``): in train mode the
  up-projection of each sequence is zeroed with probability ``p`` and otherwise divided by ``1 - p``, before the
  scaling; one Bernoulli draw per sequence from the global generator, as AdapterHub draws it. AdapterHub applies it
  in sequential adapters only (its ``ParallelAdapter`` ignores it), and so does fxadapt;
- ``inv_adapter`` (MAD-X): an invertible block on the embedding output and its inverse before the output
  embeddings (``invertible.py``), model parts applied by hooks.

The composition of adapters at a site (Stack, Fuse, Split, Parallel, BatchSplit, Average, PerRow) is in
``bottleneck_compose.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, SiteNotFoundError, nearest
from ..sites import RESIDUAL_SITE_KINDS
from .base import AdapterConfig, Method, register_method, register_preset
from .bottleneck_compose import compose_bottleneck_site, weighted_mean
from .invertible import INV_PART, INV_TYPES, NICECouplingBlock, invertible_hooks
from .phm import PHMLinear, PHMShared

__all__ = ["Bottleneck", "BottleneckConfig", "activation", "activation_names", "weighted_mean"]

_INITS = ("bert", "mam_adapter", "houlsby")
_PHM_W_INITS = ("phm", "glorot-normal", "glorot-uniform", "normal")


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
        use_gating: multiply the adapter output by a learned gate (UniPELT).
        stochastic_depth: drop-path probability of the adapter output in train mode (AdapterPlus).
        inv_adapter: ``"nice"``: an invertible adapter on the embedding output (MAD-X); None: none.
        inv_adapter_reduction_factor: reduction factor inside the invertible block's MLPs.
        phm_layer: PHM (Compacter) down and up projections; the ``phm_*`` options and ``factorized_phm_W``,
            ``shared_W_phm``, ``shared_phm_rule``, ``factorized_phm_rule``, ``learn_phm``,
            ``hypercomplex_nonlinearity`` are AdapterHub's (see ``phm.py``).
        init_weights_seed: seed ``torch.manual_seed`` before initialising each adapter module (AdapterHub's:
            every module then starts with the same weights).
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
    use_gating: bool = False
    stochastic_depth: float = 0.0
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool = True
    shared_W_phm: bool = False
    shared_phm_rule: bool = True
    factorized_phm_rule: bool = False
    phm_c_init: str = "normal"
    phm_init_range: float = 0.0001
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    phm_rank: int = 1
    phm_bias: bool = True
    init_weights_seed: int | None = None

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
            "use_gating",
            "phm_layer",
            "factorized_phm_W",
            "shared_W_phm",
            "shared_phm_rule",
            "factorized_phm_rule",
            "learn_phm",
            "phm_bias",
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
        p = self.stochastic_depth
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            fail("stochastic_depth", p, "a drop-path probability in [0, 1)")
        if self.inv_adapter is not None:
            if self.inv_adapter == "glow":
                raise ConfigError(
                    "BottleneckConfig.inv_adapter='glow' is not supported: AdapterHub 1.3.0's GLOW coupling block "
                    "slices the sequence axis and returns a list, so it defines no working invertible adapter to "
                    "reproduce; use inv_adapter='nice'"
                )
            if self.inv_adapter not in INV_TYPES:
                fail("inv_adapter", self.inv_adapter, f"None or one of {list(INV_TYPES)}", INV_TYPES)
            rf = self.inv_adapter_reduction_factor
            if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not rf > 0:
                fail("inv_adapter_reduction_factor", rf, "a number > 0 when inv_adapter is set")
        for field in ("phm_dim", "phm_rank"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(field, v, "an int >= 1")
        if self.phm_c_init not in ("normal", "uniform"):
            fail("phm_c_init", self.phm_c_init, "'normal' or 'uniform'", ("normal", "uniform"))
        if self.hypercomplex_nonlinearity not in _PHM_W_INITS:
            fail(
                "hypercomplex_nonlinearity",
                self.hypercomplex_nonlinearity,
                f"one of {list(_PHM_W_INITS)}",
                _PHM_W_INITS,
            )
        r = self.phm_init_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            fail("phm_init_range", r, "a number > 0")
        if self.phm_layer and self.init_weights != "bert":
            raise ConfigError(
                f"BottleneckConfig(phm_layer=True, init_weights={self.init_weights!r}) is not supported: "
                "AdapterHub's mam_adapter and houlsby inits address a .weight that PHM layers do not have (they "
                "fail there); Compacter adapters use init_weights='bert'"
            )
        seed = self.init_weights_seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            fail("init_weights_seed", seed, "None or an int")

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
        if config.phm_layer:
            self.down: nn.Module = PHMLinear(hidden_size, width, "down", config)
        else:
            self.down = nn.Linear(hidden_size, width)
        self.act = activation(config.non_linearity)
        self.act_name = config.non_linearity.lower()
        if config.phm_layer:
            self.up: nn.Module = PHMLinear(width, hidden_size, "up", config)
        else:
            self.up = nn.Linear(width, hidden_size)
        if config.scaling == "learned":
            self.scaling: float | nn.Parameter = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        self.norm_after = nn.LayerNorm(hidden_size) if config.ln_after else None
        self.gate = nn.Linear(hidden_size, 1) if config.use_gating else None
        self.dropout = nn.Dropout(config.dropout)
        # AdapterHub's Adapter drops paths; its ParallelAdapter has no drop path
        self.drop_path = 0.0 if config.is_parallel else float(config.stochastic_depth)
        if config.init_weights_seed:  # AdapterHub's fix_seed: every module starts alike
            torch.manual_seed(config.init_weights_seed)
        self.reset_parameters(config.init_weights)

    @property
    def plain(self) -> bool:
        """Linear projections, no gate, no drop path: what the fused kernels compute."""
        return isinstance(self.down, nn.Linear) and self.gate is None and self.drop_path == 0

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        linears = [m for m in (self.down, self.up) if isinstance(m, nn.Linear)]
        if init == "bert":
            for lin in [*linears, *([self.gate] if self.gate is not None else [])]:
                lin.weight.normal_(mean=0.0, std=0.02)
                lin.bias.zero_()
        elif init == "mam_adapter":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
            if self.gate is not None:
                self.gate.weight.normal_(mean=0.0, std=0.02)
                self.gate.bias.zero_()
        elif init == "houlsby":  # the gate keeps torch's default init (AdapterHub does not touch it)
            for lin in linears:
                nn.init.trunc_normal_(lin.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                lin.bias.zero_()

    def share(self, shared: PHMShared) -> None:
        """Give the PHM projections the adapter's shared PHM weights."""
        for proj in (self.down, self.up):
            proj.share(shared)

    def forward(
        self, z: torch.Tensor, residual: torch.Tensor | None = None, return_up: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The adapter's output; with ``return_up`` also the scaled up-projection (what AdapterFusion attends)."""
        inner = self.norm_before(z) if self.norm_before is not None else z
        up = self.up(self.act(self.down(inner)))
        if self.drop_path and self.training:
            up = drop_path(up, self.drop_path)
        up = up * self.scaling
        out = self.dropout(up)
        if self.gate is not None:
            gate = torch.sigmoid(self.gate(z)).mean(dim=1).unsqueeze(-1)  # [batch, 1, 1]
            out = out * gate
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


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """torchvision's ``stochastic_depth(x, p, "row", training=True)``: each row kept with probability ``1 - p``
    (then divided by it), one Bernoulli draw per row from the global generator."""
    survival = 1.0 - p
    noise = torch.empty([x.shape[0]] + [1] * (x.dim() - 1), dtype=x.dtype, device=x.device)
    noise.bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


@register_method
class BottleneckMethod(Method):
    name = "bottleneck"
    config_class = BottleneckConfig

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, BottleneckConfig)
        return config.sites

    def fusion_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        assert isinstance(config, BottleneckConfig)
        return config.sites

    def build(self, config, site, layer, layer_index):  # type: ignore[override]
        if getattr(site, "feature_dim", -1) != -1:
            raise SiteNotFoundError(
                f"bottleneck adapters at {site.kind!r} of {type(layer).__name__}: its residual stream is "
                f"channels-first (features on dim {site.feature_dim}, convolution layers), and bottleneck adapters "
                "act on the last dimension"
            )
        hidden_size = site.hidden_size
        width = _width(config, hidden_size, layer_index)
        return Bottleneck(hidden_size, width, config)

    def build_all(self, config, sites, layers, paths):  # type: ignore[override]
        out = super().build_all(config, sites, layers, paths)
        if config.phm_layer and (config.shared_phm_rule or config.shared_W_phm) and out:
            first = next(iter(out))
            hidden = sites[first].hidden_size
            widths = {m.down.out_features for m in out.values()}
            if config.shared_W_phm and len(widths) > 1:
                raise ConfigError(
                    f"BottleneckConfig(shared_W_phm=True) needs one bottleneck width in every layer, but "
                    f"reduction_factor={config.reduction_factor!r} gives widths {sorted(widths)}"
                )
            shared = PHMShared(hidden, next(iter(widths)), config)
            out[first].shared = shared  # saved once, with the first site's module
            for module in out.values():
                module.share(shared)
        return out

    def build_model_parts(self, config, context):  # type: ignore[override]
        if config.inv_adapter is None:
            return {}
        context.embed()  # raises SiteNotFoundError where no module feeds the first layer
        hidden = context.hidden_size
        block = NICECouplingBlock(hidden, config.non_linearity, config.inv_adapter_reduction_factor)
        return {(0, INV_PART): block}

    def model_hooks(self, config, context):  # type: ignore[override]
        if config.inv_adapter is None:
            return {}
        _, embed = context.embed()
        return {"inv_adapter": invertible_hooks(embed, context.output_embeddings())}

    def compose_site(self, emitter, site, setup, plan):  # type: ignore[override]
        compose_bottleneck_site(emitter, site, setup, plan)


def _width(config: BottleneckConfig, hidden_size: int, layer_index: int) -> int:
    rf = config.reduction_for(layer_index)
    width = int(hidden_size // rf)
    if width < 1 or rf > hidden_size:
        raise ConfigError(
            f"BottleneckConfig.reduction_factor={rf!r} gives a bottleneck of width {width} for hidden size "
            f"{hidden_size}; expected 0 < reduction_factor <= {hidden_size}"
        )
    if config.phm_layer and (hidden_size % config.phm_dim or width % config.phm_dim):
        raise ConfigError(
            f"BottleneckConfig(phm_layer=True, phm_dim={config.phm_dim}): hidden size {hidden_size} and bottleneck "
            f"width {width} (reduction_factor={rf!r}) must both be multiples of phm_dim; choose a reduction_factor "
            f"giving a width divisible by {config.phm_dim}"
        )
    return width


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
_SEQ: dict[str, Any] = {}
_DOUBLE: dict[str, Any] = dict(sites=("attn.out", "ffn.out"), original_ln_before=False, non_linearity="swish")
_INV: dict[str, Any] = dict(inv_adapter="nice", inv_adapter_reduction_factor=2)
_COMPACTER: dict[str, Any] = dict(phm_layer=True, reduction_factor=32, non_linearity="gelu")
register_preset("seq_bn_inv", _preset(**_SEQ, **_INV))
register_preset("pfeiffer+inv", _preset(**_SEQ, **_INV))
register_preset("double_seq_bn_inv", _preset(**_DOUBLE, **_INV))
register_preset("houlsby+inv", _preset(**_DOUBLE, **_INV))
register_preset("compacter++", _preset(**_SEQ, **_COMPACTER))
register_preset("compacter", _preset(**{**_DOUBLE, **_COMPACTER}))
# AdapterHub's AdapterPlusConfig (it has no string name there)
register_preset(
    "adapterplus",
    _preset(
        original_ln_after=False,
        original_ln_before=True,
        residual_before_ln=False,
        stochastic_depth=0.1,
        init_weights="houlsby",
        scaling="channel",
        reduction_factor=96,
        non_linearity="gelu",
    ),
)

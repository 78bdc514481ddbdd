"""AdapterHub's bottleneck family in its checkpoint format: ``BnConfig`` dicts and the weights that live outside the
layers (``adapterhub.py`` handles the per-site weights).

Config: :func:`bottleneck_config` reads every ``BnConfig`` key (Compacter's ``phm_*``, ``use_gating``,
``stochastic_depth``, ``inv_adapter``; the v1 ``invertible_adapter`` dict), :func:`bottleneck_dict` writes them.

Weights outside the layers, as ``adapters`` 1.3.0 keeps them (``[<base prefix>.]`` = the base model's attribute,
``bert.`` in ``BertForSequenceClassification``, none in ``BertModel``):

- ``[<base prefix>.]invertible_adapters.<name>.{F,G}.{0,2}.{weight,bias}``: the NICE block, fxadapt's ``embed.inv``
  part (kept in the first layer's container);
- ``[<base prefix>.]shared_parameters.<name>.<phm_rule|phm_rule_left|..|W_down_left|..>``: Compacter's shared PHM
  weights, fxadapt's ``shared.<param>`` of the adapter's first site module. ``adapters`` 1.3.0 saves and loads
  them only under a base-model prefix (a bare ``BertModel`` checkpoint lacks them): reading a checkpoint without
  them is refused, and writing one for a model without a prefix warns.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = [
    "BN_DEFAULTS",
    "bottleneck_config",
    "bottleneck_dict",
    "is_model_level",
    "model_level_tensors",
    "model_level_weights",
    "split_model_level",
]

logger = logging.getLogger("fxadapt")

INVERTIBLE = "invertible_adapters"
SHARED = "shared_parameters"
_SITE_FLAGS = (("mh_adapter", "attn.out"), ("output_adapter", "ffn.out"), ("cross_adapter", "cross.out"))

# AdapterHub's BnConfig defaults (the keys a 1.x ``adapter_config.json`` holds), except the three site flags
BN_DEFAULTS: dict[str, Any] = dict(
    original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, init_weights="bert",
    init_weights_seed=None, is_parallel=False, scaling=1.0, use_gating=False, residual_before_ln=True,
    adapter_residual_before_ln=False, inv_adapter=None, inv_adapter_reduction_factor=None, cross_adapter=False,
    leave_out=[], dropout=0.0, phm_layer=False, phm_dim=4, factorized_phm_W=True, shared_W_phm=False,
    shared_phm_rule=True, factorized_phm_rule=False, phm_c_init="normal", phm_init_range=0.0001, learn_phm=True,
    hypercomplex_nonlinearity="glorot-uniform", phm_rank=1, phm_bias=True, stochastic_depth=0.0,
)  # fmt: skip


def _fields() -> list[str]:
    from ..methods.bottleneck import BottleneckConfig

    return [f.name for f in dataclasses.fields(BottleneckConfig) if f.name != "sites"]


def bottleneck_config(data: dict[str, Any], has_invertible: bool, source: str) -> Any:
    """An fxadapt :class:`~fxadapt.BottleneckConfig` from an AdapterHub ``BnConfig`` dict. ``has_invertible``:
    whether the checkpoint holds invertible-adapter weights (AdapterHub adds the block only where its model
    class supports it; without the weights there is none)."""
    from ..methods.bottleneck import BottleneckConfig

    data = dict(data)
    legacy = data.pop("invertible_adapter", None)  # adapter-transformers v1: a nested dict
    if isinstance(legacy, dict) and legacy:
        data["inv_adapter"] = legacy.get("block_type")
        data["inv_adapter_reduction_factor"] = legacy.get("reduction_factor")
    missing = [
        k for k in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity") if k not in data
    ]
    if missing:
        raise CheckpointError(f"{source}: bottleneck config lacks required field(s) {missing}")
    kwargs = {k: data[k] for k in _fields() if k in data}
    if isinstance(kwargs.get("scaling"), int) and not isinstance(kwargs["scaling"], bool):
        kwargs["scaling"] = float(kwargs["scaling"])
    kwargs["leave_out"] = tuple(kwargs.get("leave_out") or ())
    if not has_invertible and kwargs.get("inv_adapter") != "glow":  # glow is refused by the config itself
        kwargs["inv_adapter"] = kwargs["inv_adapter_reduction_factor"] = None
    try:
        return BottleneckConfig(sites=tuple(kind for key, kind in _SITE_FLAGS if data.get(key)), **kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def bottleneck_dict(config: Any) -> dict[str, Any]:
    """The AdapterHub ``BnConfig`` dict of an fxadapt bottleneck config."""
    data = {**BN_DEFAULTS, **{k: getattr(config, k) for k in _fields()}, "leave_out": list(config.leave_out)}
    for key, kind in _SITE_FLAGS:
        data[key] = kind in config.sites
    if isinstance(config.scaling, (int, float)):
        data["scaling"] = float(config.scaling)  # AdapterHub accepts only a float here
    if isinstance(config.reduction_factor, dict):
        data["reduction_factor"] = dict(config.reduction_factor)
    return data


# ------------------------------------------------------------------------------------------------------------
# weights outside the layers


def _pattern(container: str, name: str) -> re.Pattern[str]:
    return re.compile(rf"(?:^|\.){container}\.{re.escape(name)}\.(.+)$")


def is_model_level(key: str, name: str) -> bool:
    """Whether ``key`` is one of adapter ``name``'s invertible-block or shared-PHM weights."""
    return bool(_pattern(INVERTIBLE, name).search(key) or _pattern(SHARED, name).search(key))


def split_model_level(
    tensors: dict[str, torch.Tensor], name: str
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """``(per-site tensors, {"invertible": {param: t}, "shared": {param: t}})`` of adapter ``name``."""
    rest: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, torch.Tensor]] = {"invertible": {}, "shared": {}}
    patterns = {"invertible": _pattern(INVERTIBLE, name), "shared": _pattern(SHARED, name)}
    for key, value in tensors.items():
        for what, pattern in patterns.items():
            m = pattern.search(key)
            if m:
                extra[what][m.group(1)] = value
                break
        else:
            rest[key] = value
    return rest, extra


def model_level_weights(
    config: Any, extra: dict[str, dict[str, torch.Tensor]], weights: dict, source: str
) -> dict[tuple[int, str, str], torch.Tensor]:
    """Translated weights of the invertible block and the shared PHM weights (see the module docstring)."""
    from ..methods.invertible import INV_PART

    out = {(0, INV_PART, p): t for p, t in extra["invertible"].items()}
    shared = extra["shared"]
    wants_shared = config.phm_layer and (config.shared_phm_rule or config.shared_W_phm)
    if wants_shared and not shared:
        raise CheckpointError(
            f"{source}: a Compacter adapter with shared PHM weights (shared_phm_rule / shared_W_phm), but the "
            "checkpoint lacks them ('shared_parameters.<name>.*'; adapters 1.3.0 saves them only from a model "
            "with a base-model prefix, e.g. BertForSequenceClassification, not from a bare BertModel), so it "
            "cannot be reproduced"
        )
    if shared and not wants_shared:
        raise CheckpointError(
            f"{source}: holds shared PHM weights {sorted(shared)} that its config "
            f"(phm_layer={config.phm_layer}, shared_phm_rule={config.shared_phm_rule}, "
            f"shared_W_phm={config.shared_W_phm}) does not use"
        )
    if shared:
        if not weights:
            raise CheckpointError(f"{source}: shared PHM weights but no adapter weights at any site")
        index, kind, _ = min(weights)  # fxadapt keeps them with the first site's module
        out.update({(index, kind, f"shared.{p}"): t for p, t in shared.items()})
    return out


def _base_prefix(model: nn.Module) -> str:
    """The attribute path of the base model inside ``model`` (``bert``), or ``""`` for a bare base model."""
    base = getattr(model, "base_model", model)
    if base is model or not isinstance(base, nn.Module):
        return ""
    return next((n for n, m in model.named_modules() if m is base), "")


def model_level_tensors(
    model: nn.Module, record: Any, params: dict[tuple[int, str, str], torch.Tensor], name: str
) -> tuple[dict[str, torch.Tensor], set[tuple[int, str, str]]]:
    """``(AdapterHub tensors, the fxadapt weight keys they hold)`` for the weights outside the layers."""
    from ..methods.invertible import INV_PART

    prefix = _base_prefix(model)
    lead = f"{prefix}." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    used: set[tuple[int, str, str]] = set()
    for key, value in params.items():
        _, kind, pname = key
        if kind == INV_PART:
            out[f"{lead}{INVERTIBLE}.{name}.{pname}"] = value
        elif pname.startswith("shared."):
            out[f"{lead}{SHARED}.{name}.{pname[len('shared.') :]}"] = value
        else:
            continue
        used.add(key)
    if any(k[2].startswith("shared.") for k in used) and not prefix:
        logger.warning(
            "Compacter adapter %r of %s (no base-model prefix): adapters 1.3.0 loads its shared PHM weights "
            "only under a prefix ('<prefix>.shared_parameters.'); load it into a model with a head there",
            name,
            type(model).__name__,
        )
    return out, used

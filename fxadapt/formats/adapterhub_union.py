"""AdapterHub's ``ConfigUnion`` checkpoints (``{"architecture": "union", "configs": [...]}``): one adapter name,
several members, every member's weights under that name in its own key layout.

Reading gives each member's keys to that member's reader (bottleneck: ``.adapters.<name>.``, the invertible block
and shared PHM weights; LoRA: ``.loras.<name>.``; prefix tuning: ``prefix_tuning.`` pools and gates; prompt
tuning: ``prompt_tuning.``) and builds an fxadapt :class:`~fxadapt.ConfigUnion`; writing splits the union adapter's
weights by member (the record says which site belongs to which) and writes each with its method's writer. A member
whose AdapterHub weights fxadapt cannot read or write is refused by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from . import describe, listed, site_reports

__all__ = ["read_union", "write_union"]

# member architectures with a reader/writer here; the others are named in the refusal
_PENDING = {"mtl_lora": "multi-task LoRA", "reft": "ReFT"}
_PREFIX, _PROMPT = "prefix_tuning.", "prompt_tuning."


def _members(data: dict, source: str) -> list[dict]:
    members = data.get("configs")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise CheckpointError(f"{source}: a ConfigUnion needs a non-empty list 'configs' of member dicts")
    for m in members:
        arch = m.get("architecture")
        if arch in _PENDING:
            raise CheckpointError(
                f"{source}: its ConfigUnion member {_PENDING[arch]} cannot be read, because fxadapt has no reader "
                f"for AdapterHub's {_PENDING[arch]} weights yet"
            )
        if arch not in (None, "bottleneck", "lora", "prefix_tuning", "prompt_tuning"):
            raise CheckpointError(f"{source}: unknown ConfigUnion member architecture {arch!r}")
    return members


def read_union(model: nn.Module, data: dict, tensors: dict, name: str, source: str) -> tuple[Any, dict]:
    """``(ConfigUnion, weights)`` of an AdapterHub union checkpoint."""
    from ..methods.union import ConfigUnion
    from . import adapterhub as ah
    from . import adapterhub_bottleneck as bn
    from . import adapterhub_lora as lora

    members = _members(data, source)
    reports = site_reports(model)
    configs: list[Any] = []
    weights: dict[tuple[int, str, str], torch.Tensor] = {}
    from . import adapterhub_prompts as prompts

    lora_keys = {k: v for k, v in tensors.items() if f".loras.{name}." in f".{k}"}
    prefix_keys = {k: v for k, v in tensors.items() if f".{_PREFIX}" in f".{k}"}
    prompt_keys = {k: v for k, v in tensors.items() if f".{_PROMPT}" in f".{k}"}
    rest = {k: v for k, v in tensors.items() if k not in lora_keys | prefix_keys | prompt_keys}
    residual_keys, extra = bn.split_model_level(rest, name)
    residual_keys = {k: v for k, v in residual_keys.items() if f".adapters.{name}." in f".{k}"}
    leftover = sorted(set(rest) - set(residual_keys) - {k for k in rest if bn.is_model_level(k, name)})
    if leftover:
        raise CheckpointError(f"{source}: keys that belong to no ConfigUnion member: {listed(leftover)}")
    residual_cache: dict | None = None
    for member in members:
        # union members come from adapters >= 1.0: no legacy activation renaming (a truthy version)
        full = ah.resolve_config(member, "adapters.union", source)
        if member.get("architecture") == "prefix_tuning":
            config = prompts.prefix_config(full, source)
            got = prompts.prefix_weights(model, config, prefix_keys, name, source)
        elif member.get("architecture") == "prompt_tuning":
            config = prompts.prompt_config(full, source)
            got = prompts.prompt_weights(model, prompt_keys, name, source)
        elif member.get("architecture") == "lora":
            config = ah.lora_config(full, "adapters.union", source)
            got, sites, used = lora.read_lora_weights(model, lora_keys, name, reports, config, source)
            config = config.replace(
                sites=sites, leave_out=tuple(i for i in range(len(reports)) if i not in used)
            )
            lora_keys = {}  # one LoRA member per union
        else:
            config = bn.bottleneck_config(full, bool(extra["invertible"]), source)
            if residual_cache is None:
                ln_before = config.ln_before
                residual_cache = ah._residual_weights(
                    model,
                    residual_keys,
                    "adapters",
                    name,
                    reports,
                    lambda p, ln=ln_before: ah._bottleneck_param(p, ln),
                    source,
                )
            got = {k: v for k, v in residual_cache.items() if k[1] in config.sites}
            got.update(bn.model_level_weights(config, extra, got, source))
        configs.append(config)
        weights.update(got)
    if residual_cache is not None:
        stray = sorted(describe(k) for k in residual_cache if k not in weights)
        if stray:
            raise CheckpointError(f"{source}: bottleneck weights at sites no member uses: {listed(stray)}")
    try:
        return ConfigUnion(configs=tuple(configs)), weights
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def write_union(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    """AdapterHub's union dict and tensors of an fxadapt union adapter."""
    from ..parts import components
    from . import adapterhub as ah
    from . import adapterhub_lora as lora
    from . import adapterhub_prompts as prompts

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    dicts: list[dict] = []
    tensors: dict[str, torch.Tensor] = {}
    for position, (_, member) in enumerate(components(record.config)):
        mine = {k for k, p in record.members.items() if p == position}
        sub = dataclasses.replace(
            record,
            config=member,
            sites={k: s for k, s in record.sites.items() if k[1] in mine},
            placements={i: tuple(k for k in ks if k in mine) for i, ks in record.placements.items()},
            members={},
        )
        sub_params = {k: p for k, p in params.items() if k[1] in mine}
        if member.method == "bottleneck":
            data, t = ah.write_bottleneck(model, sub, sub_params, name)
        elif member.method == "prefix_tuning":
            data, t = prompts.prefix_dict(member), prompts.prefix_tensors(model, sub, sub_params, name)
        elif member.method == "prompt_tuning":
            data, t = prompts.prompt_dict(member), prompts.prompt_tensors(model, sub, sub_params, name)
        elif member.method == "lora":
            outside = sorted({k for i, ks in sub.placements.items() for k in ks if (i, k) not in sub.sites})
            if outside:
                raise CheckpointError(
                    f"AdapterHub's LoRA adapts projections inside the layers only; the LoRA member of adapter "
                    f"{name!r} also adapts {outside}"
                )
            data = lora.lora_config_dict(member, model_type, {k for _, k in sub.sites})
            t = lora.lora_tensors(
                model, sub, sub_params, name, ah.LayerPaths(model), member, data["attn_matrices"]
            )
        else:
            what = _PENDING.get(member.method, member.method)
            raise CheckpointError(
                f"AdapterHub format: adapter {name!r}'s ConfigUnion member {what} cannot be written, because "
                f"fxadapt has no writer for AdapterHub's {what} weights yet"
            )
        dicts.append(data)
        tensors.update(t)
    return {"architecture": "union", "configs": dicts}, tensors

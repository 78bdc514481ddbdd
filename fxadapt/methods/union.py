"""Unions: one adapter built from several methods under one name (AdapterHub's ``ConfigUnion``): MAM
(He et al., 2021: prefix tuning + a parallel bottleneck) and UniPELT (Mao et al., 2022: gated prefix tuning, gated
``seq_bn`` and gated LoRA).

A union has no behaviour of its own: :meth:`UnionMethod.components` lists its members and every generic verb walks
them (``parts.place`` selects and builds each member's sites; the layer plans give each site its member's config,
so composition at a site sees plain bottleneck, LoRA or prefix adapters; ``merge`` asks each member; ``eject``
ejects the members that can). Members must not attach to the same site kind; AdapterHub's own check (two members
of one method only for bottlenecks at different places) holds too.

Composition of a union is what each of its members allows at its own sites: bottleneck sites the full set, LoRA
sites LoRA's, prefix sites prefix tuning's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import AdapterConfig, Method, config_from_dict, method_for, register_method, register_preset

__all__ = ["ConfigUnion"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigUnion(AdapterConfig):
    """Several methods under one adapter name (AdapterHub's ``ConfigUnion``).

    Args:
        configs: the member configs (each a config object, or its ``to_dict()`` form); no member may itself be a
            union.
    """

    method = "union"

    configs: tuple[AdapterConfig, ...]

    def __post_init__(self) -> None:
        configs = self.configs
        if isinstance(configs, (AdapterConfig, Mapping)) or not isinstance(configs, (list, tuple)):
            raise ConfigError(
                f"ConfigUnion.configs={configs!r} is invalid; expected a list of member configs, e.g. "
                "ConfigUnion(configs=(PrefixTuningConfig(), preset('par_bn')))"
            )
        members = []
        for c in configs:
            member = config_from_dict(c) if isinstance(c, Mapping) else c
            if not isinstance(member, AdapterConfig):
                raise ConfigError(
                    f"ConfigUnion member {c!r} is not an adapter config; expected a config object or its dict"
                )
            method_for(member)  # registered?
            if isinstance(member, ConfigUnion):
                raise ConfigError(
                    "ConfigUnion members cannot be unions themselves; list their members instead"
                )
            members.append(member)
        if not members:
            raise ConfigError("ConfigUnion.configs is empty; expected at least one member config")
        for i, a in enumerate(members):
            for b in members[:i]:
                if a.method != b.method or getattr(a, "leave_out", ()) or getattr(b, "leave_out", ()):
                    continue
                sites_a, sites_b = set(getattr(a, "sites", ())), set(getattr(b, "sites", ()))
                if a.method == "bottleneck" and not sites_a & sites_b:
                    continue
                raise ConfigError(
                    f"ConfigUnion members {b!r} and {a!r} are both {a.method} adapters at the same places; a union "
                    "holds one adapter per method and place"
                )
        object.__setattr__(self, "configs", tuple(members))


@register_method
class UnionMethod(Method):
    name = "union"
    config_class = ConfigUnion

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        return ()  # the members select their sites

    def components(self, config: AdapterConfig) -> tuple[tuple[Method, AdapterConfig], ...]:
        assert isinstance(config, ConfigUnion)
        return tuple((method_for(c), c) for c in config.configs)

    def eject(self, config: AdapterConfig, modules: dict) -> AdapterConfig | None:
        assert isinstance(config, ConfigUnion)
        ejected = [method_for(c).eject(c, modules) for c in config.configs]
        if all(e is None for e in ejected):
            return None
        return ConfigUnion(configs=tuple(e if e is not None else c for e, c in zip(ejected, config.configs)))


def mam(**prefix_tuning: Any) -> ConfigUnion:
    """AdapterHub's ``MAMConfig()``: prefix tuning (bottleneck 800) and a parallel bottleneck (``par_bn``)."""
    from .base import preset
    from .prefix import PrefixTuningConfig

    return ConfigUnion(
        configs=(PrefixTuningConfig(**{"bottleneck_size": 800, **prefix_tuning}), preset("par_bn"))
    )


register_preset("mam", mam)


def unipelt() -> ConfigUnion:
    """AdapterHub's ``UniPELTConfig()``: gated prefix tuning (length 10), gated ``seq_bn`` and gated LoRA (r=8,
    alpha=2), each with AdapterHub's gates."""
    from .bottleneck import BottleneckConfig
    from .lora import LoRAConfig
    from .prefix import PrefixTuningConfig

    return ConfigUnion(
        configs=(
            PrefixTuningConfig(prefix_length=10, use_gating=True),
            BottleneckConfig(reduction_factor=16, use_gating=True),
            LoRAConfig(r=8, alpha=2, use_gating=True),
        )
    )


register_preset("unipelt", unipelt)

"""What every adapter method provides, and the registry that maps configs and preset names to methods.

A method is one file in ``fxadapt/methods/``: a frozen config dataclass, the module(s) holding its weights with
their reference math, and a ``Method`` subclass that says which sites it uses and how it rewrites a site.
It registers itself with :func:`register_method`; nothing else in fxadapt names it.

Design note: capabilities, not special cases
--------------------------------------------
The generic verbs (``inject``, ``remove``, ``merge``, ``add_fusion``, ``eject_prefix``, the formats) never test
which method an adapter is. They ask the method, through these declared capabilities (each with a default that
means "not this method's business"):

==============================  =================================================================================
capability                      what a verb gets from it
==============================  =================================================================================
:meth:`Method.select_sites`,    the layer sites an adapter attaches to, and the module built at each; the
:meth:`Method.build_all`,       layers' generated code then calls it there (:meth:`Method.compose_site`)
:meth:`Method.compose_site`
:meth:`Method.build_model_parts`  modules that act *outside* the layers' generated code: prompt tuning's soft
                                prompt in front of the input embeddings, an invertible adapter on the embedding
                                output, LoRA on a projection that lies in no layer (``pooler.dense``), ReFT on
                                a layer's output positions. Keyed ``(layer index, part name)``: the module is kept
                                in that layer's ``fxadapt.<adapter>`` container like a site's module (so it is
                                saved, loaded, trained and removed with the adapter), but no layer code calls it
:meth:`Method.model_hooks`      the hooks that apply those parts: ``{key: install}``, where ``install(model)``
                                registers forward (pre-)hooks on any module of the model and returns a handle
                                with ``remove()``. One hook per (method, key) serves every adapter that asks for
                                it; it is removed when the last of them is. At run time a hook finds the active
                                adapters' parts with :func:`fxadapt.parts.active_parts`
:meth:`Method.why_not_mergeable`  ``None`` if :meth:`Method.merge` can fold the adapter into the base weights, else
                                the reason, which ``merge`` puts in its error
:meth:`Method.fusion_kinds`     the site kinds at which AdapterFusion can attend over this adapter's output
:meth:`Method.eject`            a training-time reparameterisation replaced by the weights it produces
                                (prefix tuning's MLP → flat prefixes): the config to record from then on
:meth:`Method.components`       an adapter built from several methods under one name (AdapterHub's
                                ``ConfigUnion``: MAM, UniPELT): its ``(method, config)`` parts. Every verb walks
                                the components, so a union needs no case of its own anywhere
:meth:`Method.supported_compositions`,  what ``docs/methods.md``'s table (``scripts/methods_table.py``) says a
:meth:`Method.supported_formats`  config composes with and is saved in (class attributes ``compositions`` /
                                ``formats`` by default; a union: what all its members have)
==============================  =================================================================================

The model-level context a method gets when it builds parts or hooks is :class:`fxadapt.parts.ModelContext`
(the model, its layers, their site reports, and the ``embed`` site: the module whose output the first layer
receives, found by one forward).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from ..errors import ConfigError, nearest

if TYPE_CHECKING:
    from ..parts import ModelContext
    from ..rewrite import Emitter, SitePlan
    from ..sites import ModuleSite, ResidualSite, SiteReport

    Site = ResidualSite | ModuleSite

__all__ = [
    "AdapterConfig",
    "HookHandle",
    "Method",
    "config_from_dict",
    "method_for",
    "preset",
    "preset_names",
    "register_method",
    "register_preset",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base of all method configs: frozen, keyword-only, validated in ``__post_init__``."""

    method: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> AdapterConfig:
        # serve: unknown keywords / scalars for sequence fields raise typed errors naming the field (fields.py)
        from .fields import check_config_call

        check_config_call(cls, args, kwargs)
        return super().__new__(cls)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"method": ..., <fields>}``; tuples become lists, nested configs their dicts."""

        def plain(value: Any) -> Any:
            if isinstance(value, AdapterConfig):
                return value.to_dict()
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = plain(getattr(self, f.name))
        return out

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


class HookHandle(Protocol):
    """What ``install(model)`` of :meth:`Method.model_hooks` returns (``torch.utils.hooks.RemovableHandle`` is one)."""

    def remove(self) -> None: ...


class Method:
    """Per-method behaviour. Subclasses set ``name`` and ``config_class`` and implement the hooks.

    The capabilities the generic verbs call are listed in the module docstring; each has a default that means the
    method does not have it.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    #: shortcut for :meth:`why_not_mergeable`: a method whose every config folds into the base weights
    mergeable: ClassVar[bool] = False
    #: composition blocks its sites compose (``compose.py`` names); documentation, checked by its tests
    compositions: ClassVar[tuple[str, ...]] = ("Stack",)
    #: checkpoint formats it is read from and written to (``"fxadapt"``, ``"adapterhub"``, ``"peft"``)
    formats: ClassVar[tuple[str, ...]] = ("fxadapt",)

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        """Site kinds this config attaches to (in every layer that has them)."""
        raise NotImplementedError

    def applies_to_layer(self, config: AdapterConfig, layer_index: int) -> bool:
        return layer_index not in getattr(config, "leave_out", ())

    def select_sites(
        self, config: AdapterConfig, report: SiteReport, layer: nn.Module
    ) -> list[tuple[str, Site]]:
        """``(request, site)`` pairs this config attaches to in one layer. A *request* is what the user asked
        for (a site kind, a module-name pattern ...); a request no layer satisfies is reported as an error.
        The default selects the sites of :meth:`site_kinds`; ``linear:<path>`` kinds select a projection by path."""
        out = []
        for kind in self.site_kinds(config):
            site = report.site(kind)
            if site is not None:
                out.append((kind, site))
        return out

    def requests(self, config: AdapterConfig) -> tuple[str, ...]:
        """Everything :meth:`select_sites` may satisfy; default: the site kinds."""
        return self.site_kinds(config)

    def build(self, config: AdapterConfig, site: Site, layer: nn.Module, layer_index: int) -> nn.Module:
        """The module holding this adapter's weights at one site of one layer.

        ``site`` is a :class:`~fxadapt.sites.ResidualSite` (with ``hidden_size``) or a
        :class:`~fxadapt.sites.ModuleSite` (``layer.get_submodule(site.module)`` is the projection).
        """
        raise NotImplementedError

    def build_all(
        self,
        config: AdapterConfig,
        sites: dict[tuple[int, str], Site],
        layers: list[nn.Module],
        paths: list[str],
    ) -> dict[tuple[int, str], nn.Module]:
        """Modules for every selected ``(layer index, site kind)``. The default builds each independently; methods
        whose weights are shared across layers (prefix tuning) override it."""
        return {(i, kind): self.build(config, site, layers[i], i) for (i, kind), site in sites.items()}

    def merge(
        self, config: AdapterConfig, module: nn.Module, site: Site, layer: nn.Module, sign: int
    ) -> None:
        """Fold the adapter into the base weights (``sign=+1``) or take it out again (``sign=-1``).

        Only methods with ``mergeable = True`` implement it; the adapter's own weights stay untouched.
        """
        raise NotImplementedError

    def why_not_mergeable(self, config: AdapterConfig) -> str | None:
        """``None`` if :meth:`merge` folds this config into the base weights; else why not, as a clause that
        follows "cannot be merged into the base weights: " in the error of :func:`fxadapt.merge`."""
        if self.mergeable:
            return None
        return f"{self.name} is not a linear reparametrisation of the base weights"

    def fusion_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        """Residual site kinds where AdapterFusion can attend over this adapter's output (none by default)."""
        return ()

    def build_model_parts(
        self, config: AdapterConfig, context: ModelContext
    ) -> dict[tuple[int, str], nn.Module]:
        """Modules acting outside the layers' generated code, keyed ``(layer index, part name)`` (the layer whose
        container keeps the module; the part name is its key there). No layer code calls them: the hooks of
        :meth:`model_hooks` apply them. Default: none. Raise :class:`~fxadapt.SiteNotFoundError` where the model
        lacks what a part needs (the model is untouched then)."""
        return {}

    def model_hooks(
        self, config: AdapterConfig, context: ModelContext
    ) -> dict[str, Callable[[nn.Module], Any]]:
        """``{key: install}`` for the hooks that apply this config's model parts; ``install(model)`` registers them
        and returns a :class:`HookHandle`. A key already installed on the model (by another adapter of this
        method) is not installed again; its hook is removed with the last adapter that asked for it. The hooks
        must apply only the *active* adapters' parts (:func:`fxadapt.parts.active_parts`)."""
        return {}

    def eject(self, config: AdapterConfig, modules: dict[tuple[int, str], nn.Module]) -> AdapterConfig | None:
        """Replace a training-time reparameterisation by the weights it produces, in ``modules`` (the adapter's
        modules by ``(layer index, site or part)``), and return the config to record from then on; ``None``: this
        method has nothing to eject."""
        return None

    def components(self, config: AdapterConfig) -> tuple[tuple[Method, AdapterConfig], ...]:
        """The ``(method, config)`` pairs this adapter is built from: itself, or the members of a union."""
        return ((self, config),)

    def supported_compositions(self, config: AdapterConfig) -> tuple[str, ...]:
        """Composition blocks an adapter of this config takes part in (see :attr:`compositions`)."""
        return self.compositions

    def supported_formats(self, config: AdapterConfig) -> tuple[str, ...]:
        """Checkpoint formats an adapter of this config is read from and written to (see :attr:`formats`)."""
        return self.formats

    def compose_site(self, emitter: Emitter, site: Site, setup: Any, plan: SitePlan) -> None:
        """Emit the active setup's adapters at one site. The default supports a flat ``Stack`` (each adapter's
        :meth:`rewrite` in setup order); methods with richer composition override it (see ``bottleneck.py``)."""
        from ..compose import Stack

        if not (isinstance(setup, Stack) and all(isinstance(c, str) for c in setup.children)):
            from ..errors import CompositionError

            raise CompositionError(
                f"{self.name} adapters support only Stack(...) of adapter names at a site, not {setup!r}"
            )
        for ref in plan.adapters:
            emitter.name = ref.node_name(site.kind)
            self.rewrite(emitter, site, ref.target, ref.config)

    def rewrite(self, emitter: Emitter, site: Any, target: str, config: AdapterConfig) -> None:
        """Insert this adapter at ``site`` of the graph; ``target`` is the module path of its weights."""
        raise NotImplementedError


_METHODS: dict[str, Method] = {}
_BY_CONFIG: dict[type, Method] = {}
_PRESETS: dict[str, Callable[[], AdapterConfig]] = {}


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the dtype weight algebra (merging, folding, magnitudes) is done in: fp32 for half precision and
    fp32 weights, fp64 for fp64 ones (``.float()`` would round those): the kernels' compute dtype."""
    from ..kernels._common import compute_dtype  # not at import: ``import fxadapt`` does not load the kernels

    return t.to(compute_dtype(t))


def register_method(method_cls: type[Method]) -> type[Method]:
    """Class decorator: make a method known by name and by config class."""
    method = method_cls()
    _METHODS[method_cls.name] = method
    _BY_CONFIG[method_cls.config_class] = method
    return method_cls


def register_preset(name: str, factory: Callable[[], AdapterConfig]) -> None:
    _PRESETS[name] = factory


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset(name: str) -> AdapterConfig:
    """The config behind an AdapterHub-style string name (``"seq_bn"``, ``"double_seq_bn"``, ...)."""
    if not isinstance(name, str) or name not in _PRESETS:
        raise ConfigError(
            f"unknown adapter method {name!r}; expected one of {preset_names()}{nearest(str(name), _PRESETS)}"
        )
    return _PRESETS[name]()


def method_for(config: AdapterConfig) -> Method:
    for cls in type(config).__mro__:
        if cls in _BY_CONFIG:
            return _BY_CONFIG[cls]
    raise ConfigError(
        f"{type(config).__name__} is not a registered adapter config; expected one of "
        f"{sorted(c.__name__ for c in _BY_CONFIG)}"
    )


def config_from_dict(data: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a config from :meth:`AdapterConfig.to_dict` output; unknown keys or wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"adapter config must be a JSON object, got {type(data).__name__}")
    name = data.get("method")
    if name not in _METHODS:
        raise ConfigError(
            f"config names unknown method {name!r}; expected one of {sorted(_METHODS)}"
            f"{nearest(str(name), _METHODS)}"
        )
    cls = _METHODS[name].config_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"method"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {cls.__name__} config; expected keys among {sorted(fields)}"
            f"{nearest(unknown[0], fields)}"
        )
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k != "method"}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid {cls.__name__} config: {exc}") from exc

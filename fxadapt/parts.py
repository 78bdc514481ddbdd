"""Placing an adapter in a model, through its methods' declared capabilities (see ``methods/base.py``).

:func:`place` turns one adapter config into modules: for each of its components (one, or the members of a union),
the layer sites the method selects and the module it builds at each, plus the *model parts* it builds
(:meth:`~fxadapt.methods.base.Method.build_model_parts`): modules that act outside the layers' generated code,
applied by hooks (:meth:`~fxadapt.methods.base.Method.model_hooks`). Both kinds live in a layer's
``fxadapt.<adapter>`` container; a part differs from a site only in that no layer code calls it.

Hooks are shared: :func:`attach_hooks` installs each ``(method, key)`` hook once per model and records which adapters
asked for it; :func:`detach_hooks` removes a hook with the last of them. At run time a hook applies the parts of
the active setup's adapters, found with :func:`active_parts`.

:class:`ModelContext` is what a method sees of the model while building: the layers, their site reports and the
``embed`` site (the module whose output tensor the first layer receives, found with one forward), each computed on
first use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, SiteNotFoundError, nearest
from .methods.base import AdapterConfig, Method, method_for

__all__ = [
    "ModelContext",
    "Placed",
    "active_parts",
    "adapter_modules",
    "attach_hooks",
    "components",
    "detach_hooks",
    "find_embed_module",
    "fusion_kinds",
    "governing_config",
    "place",
    "why_not_mergeable",
]

_HOOKS = "_fxadapt_hooks"  # model.__dict__ entry: {(method, key): [handle, {adapter names}]}


@dataclass
class ModelContext:
    """The model as the methods see it while an adapter is placed (one priming forward behind it)."""

    model: nn.Module
    paths: list[str]
    layers: list[nn.Module]
    primed: list[tuple[tuple, Any]]  # per layer: (guard key, Traced) of the priming call
    example_inputs: Any = None
    _embed: tuple[str, nn.Module] | None = field(default=None, repr=False)

    @property
    def reports(self) -> list[Any]:
        """Per layer, its :class:`~fxadapt.sites.SiteReport`."""
        return [traced.report for _, traced in self.primed]

    @property
    def hidden_size(self) -> int | None:
        """Width of the first layer's residual stream (None where it has no residual site)."""
        return next((s.hidden_size for s in self.primed[0][1].report.residual), None)

    def embed(self) -> tuple[str, nn.Module]:
        """``(path, module)`` of the ``embed`` site: the outermost module whose output is the first layer's input."""
        if self._embed is None:
            self._embed = find_embed_module(self.model, self.layers[0], self.example_inputs)
        return self._embed

    def input_embeddings(self) -> nn.Module | None:
        get = getattr(self.model, "get_input_embeddings", None)
        try:
            out = get() if callable(get) else None
        except NotImplementedError:
            return None
        return out if isinstance(out, nn.Module) else None

    def output_embeddings(self) -> nn.Module | None:
        get = getattr(self.model, "get_output_embeddings", None)
        try:
            out = get() if callable(get) else None
        except NotImplementedError:
            return None
        return out if isinstance(out, nn.Module) else None

    def placement(self, index: int = 0) -> dict[str, Any]:
        """Device and float dtype of layer ``index`` (new modules follow it)."""
        for p in self.layers[index].parameters():
            if p.is_floating_point():
                return {"device": p.device, "dtype": p.dtype}
        return {}


def find_embed_module(model: nn.Module, first_layer: nn.Module, example_inputs: Any) -> tuple[str, nn.Module]:
    """The module whose output tensor is the first layer's hidden-state input (found with one forward)."""
    from .model import _call, default_example_inputs

    outputs: list[tuple[str, nn.Module, torch.Tensor]] = []  # the tensors are kept alive: ids are not reused
    handles = []
    for name, module in model.named_modules():
        if module is model or module is first_layer:
            continue

        def hook(m, a, out, name=name):
            if isinstance(out, torch.Tensor):
                outputs.append((name, m, out))

        handles.append(module.register_forward_hook(hook))
    seen: list[Any] = []
    handles.append(
        first_layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(a[0] if a else kw.get("hidden_states")), with_kwargs=True
        )
    )
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            was = model.training
            model.eval()
            try:
                _call(model, example_inputs if example_inputs is not None else default_example_inputs(model))
            finally:
                model.train(was)
    finally:
        for h in handles:
            h.remove()
    # the outermost module returning the very tensor the first layer receives (its hook fires last)
    match = [(name, m) for name, m, out in outputs if seen and out is seen[0]]
    if not match:
        raise SiteNotFoundError(
            f"no 'embed' site in {type(model).__name__}: no module's output is the first layer's input "
            "(methods acting on the embedding output need an embedding module feeding the layers)"
        )
    return match[-1]


# ------------------------------------------------------------------------------------------------------------
# placing an adapter


def components(config: AdapterConfig) -> tuple[tuple[Method, AdapterConfig], ...]:
    """The ``(method, config)`` pairs adapter ``config`` is built from (one, or a union's members)."""
    return method_for(config).components(config)


@dataclass
class Placed:
    """One adapter, placed: its modules by ``(layer index, site kind or part)`` and what the record keeps."""

    modules: dict[tuple[int, str], nn.Module]
    placements: dict[int, tuple[str, ...]]
    sites: dict[tuple[int, str], Any]  # layer sites only: the generated code calls their modules
    members: dict[str, int]  # site kind or part -> index of the union member that governs it (unions only)


def place(name: str, config: AdapterConfig, context: ModelContext) -> Placed:
    """Select sites and build modules for adapter ``name`` (nothing is attached to the model yet)."""
    placements: dict[int, list[str]] = {}
    sites: dict[tuple[int, str], Any] = {}
    modules: dict[tuple[int, str], nn.Module] = {}
    governing: dict[str, int] = {}
    owner: dict[str, int] = {}  # kind -> member that placed it (union members must not collide)
    members = components(config)
    for position, (method, member) in enumerate(members):
        located: dict[tuple[int, str], Any] = {}
        satisfied: set[str] = set()
        for index, (layer, (_, traced)) in enumerate(zip(context.layers, context.primed)):
            if not method.applies_to_layer(member, index):
                continue
            for request, site in method.select_sites(member, traced.report, layer):
                satisfied.add(request)
                if (index, site.kind) not in located:
                    located[(index, site.kind)] = site
        missing = [r for r in method.requests(member) if r not in satisfied]
        if missing:
            raise _missing_sites(name, missing, context)
        built = dict(method.build_all(member, located, context.layers, context.paths))
        parts = method.build_model_parts(member, context)
        for (index, kind), module in [*built.items(), *parts.items()]:
            if owner.setdefault(kind, position) != position:
                raise ConfigError(
                    f"adapter {name!r}: its members {members[owner[kind]][0].name!r} and {method.name!r} both "
                    f"attach to {kind!r}; a union may use each site once"
                )
            if len(members) > 1:
                governing[kind] = position
            index_kinds = placements.setdefault(index, [])
            if kind not in index_kinds:
                index_kinds.append(kind)
            if (index, kind) in located:
                sites[(index, kind)] = located[(index, kind)]
            placement = context.placement(index)
            modules[(index, kind)] = module.to(**placement).train(context.layers[index].training)
    return Placed(modules, {i: tuple(k) for i, k in placements.items()}, sites, governing)


def _missing_sites(name: str, missing: list[str], context: ModelContext) -> SiteNotFoundError:
    available = sorted({k for _, t in context.primed for k in t.report.kinds()})
    opaque = {
        f"{context.paths[i]}.{leaf}": why
        for i, (_, t) in enumerate(context.primed)
        for leaf, why in t.capture.leaf_reasons.items()
    }
    hint = f". Tracing left these submodules opaque, which can hide sites: {opaque}" if opaque else ""
    notes = sorted({note for _, t in context.primed for note in t.report.notes})
    if notes:
        hint += f". Notes: {'; '.join(notes)}"
    blocks = sorted({_class_name(layer) for layer in context.layers})
    return SiteNotFoundError(
        f"adapter {name!r}: site(s) {missing} not found in the blocks ({', '.join(blocks)}) of "
        f"{type(context.model).__name__}; they have {available}{nearest(missing[0], available)}{hint}"
    )


def _class_name(layer: nn.Module) -> str:
    """The layer's own class name (not fxadapt's installed subclass)."""
    return getattr(type(layer), "_fxadapt_orig_class", type(layer)).__name__


# ------------------------------------------------------------------------------------------------------------
# hooks


def attach_hooks(model: nn.Module, name: str, config: AdapterConfig, context: ModelContext) -> None:
    """Install the hooks adapter ``name``'s members ask for (each ``(method, key)`` once per model)."""
    registry = model.__dict__.setdefault(_HOOKS, {})
    for method, member in components(config):
        for key, install in method.model_hooks(member, context).items():
            entry = registry.get((method.name, key))
            if entry is None:
                entry = registry[(method.name, key)] = [install(model), set()]
            entry[1].add(name)


def detach_hooks(model: nn.Module, name: str) -> None:
    """Forget that adapter ``name`` needs its hooks; remove the hooks no adapter needs any more."""
    registry = model.__dict__.get(_HOOKS)
    if not registry:
        return
    for key in list(registry):
        handle, names = registry[key]
        names.discard(name)
        if not names:
            handle.remove()
            del registry[key]
    if not registry:
        del model.__dict__[_HOOKS]


def active_parts(model: nn.Module, part: str) -> list[tuple[str, nn.Module]]:
    """``(adapter name, module)`` of part ``part`` for the active setup's adapters that have it, in setup order."""
    from .model import CONTAINER, get_state, layers_of
    from .rewrite import site_key

    state = get_state(model)
    if state is None or state.active is None:
        return []
    key = site_key(part)
    _, layers = layers_of(model)
    out = []
    for name in state.active.names():
        record = state.adapters.get(name)
        if record is None:
            continue
        for index, kinds in record.placements.items():
            if part in kinds and (index, part) not in record.sites:
                container = layers[index]._modules.get(CONTAINER)
                if container is not None and name in container and key in container[name]:
                    out.append((name, container[name][key]))
    return out


# ------------------------------------------------------------------------------------------------------------
# what the verbs ask about an adapter


def adapter_modules(model: nn.Module, name: str) -> Iterator[tuple[tuple[int, str], nn.Module]]:
    """Every module of adapter ``name`` (sites and parts) by ``(layer index, kind)``."""
    from .model import CONTAINER, get_state, layers_of
    from .rewrite import site_key

    state = get_state(model)
    record = state.record(name)
    _, layers = layers_of(model)
    for index, kinds in record.placements.items():
        container = layers[index]._modules[CONTAINER][name]
        for kind in kinds:
            yield (index, kind), container[site_key(kind)]


def governing_config(record: Any, kind: str) -> AdapterConfig:
    """The config that governs adapter ``record`` at site ``kind``: its own, or that of the union member there."""
    position = record.members.get(kind)
    return record.config if position is None else components(record.config)[position][1]


def why_not_mergeable(config: AdapterConfig) -> str | None:
    """Why adapter ``config`` cannot be merged (the first member's reason), or None."""
    members = components(config)
    for method, member in members:
        why = method.why_not_mergeable(member)
        if why is not None:
            return f"its {method.name} member: {why}" if len(members) > 1 else why
    return None


def fusion_kinds(config: AdapterConfig) -> tuple[str, ...]:
    """Site kinds where AdapterFusion can attend over this adapter's output."""
    return tuple(k for method, member in components(config) for k in method.fusion_kinds(member))

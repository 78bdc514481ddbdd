"""The verbs users call: inject, activate, remove, train_adapter (``explain`` lives in ``explain.py``).

Every verb validates everything before it touches the model, and a failure while committing rolls back, so
a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .compose import Block, Fuse, Stack, parse_setup, validate
from .errors import (
    AdapterNotFoundError,
    CompositionError,
    ConfigError,
    FxAdaptError,
    NameCollisionError,
    SiteNotFoundError,
)
from .explain import explain
from .fusion import AdapterFusion, FusionConfig, fusion_config
from .install import Siblings, install, layer_state, uninstall
from .methods.base import AdapterConfig, method_for, preset
from .model import (
    CONTAINER,
    AdapterRecord,
    FusionRecord,
    ModelState,
    _fuse_blocks,
    get_state,
    layers_of,
    model_type_of,
    plan_for,
    prime,
    prime_variants,
    priming_memo,
    set_state,
)
from .parallel_inputs import sync_parallel_hooks
from .parts import (
    ModelContext,
    adapter_modules,
    attach_hooks,
    detach_hooks,
    fusion_kinds,
    governing_config,
    place,
    why_not_mergeable,
)
from .progress import track
from .quantized import float_weights
from .rewrite import site_key
from .rollback import WeightSnapshot, check_adapter_name, check_materialized
from .routing import sync_routing_hook
from .tracing import serialized

__all__ = [
    "activate",
    "active_adapters",
    "active_setup",
    "adapter_parameters",
    "adapter_state",
    "add_fusion",
    "eject_prefix",
    "explain",
    "fusion_parameters",
    "fusion_regularization_loss",
    "inject",
    "list_adapters",
    "merge",
    "remove",
    "remove_fusion",
    "train_adapter",
    "train_fusion",
    "unmerge",
]

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
AdapterSpec = Mapping[str, "str | AdapterConfig"]


def _normalise_spec(spec: AdapterSpec) -> list[tuple[str, AdapterConfig]]:
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"adapter spec must be a non-empty mapping of name -> method, e.g. {{'sst-2': 'seq_bn'}}; got {spec!r}"
        )
    items = []
    for name, value in spec.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(
                f"invalid adapter name {name!r}: use letters, digits, '_' and '-' (it becomes part of state_dict keys)"
            )
        check_adapter_name(name)  # serve: names like 'keys' / 'forward' cannot key a ModuleDict
        if isinstance(value, str):
            config = preset(value)
        elif isinstance(value, AdapterConfig):
            config = value
        else:
            raise ConfigError(
                f"adapter {name!r}: expected a method name like 'seq_bn' or a config such as BottleneckConfig(...), "
                f"got {type(value).__name__}"
            )
        method_for(config)  # registered?
        items.append((name, config))
    return items


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def inject(
    model: nn.Module,
    spec: AdapterSpec,
    *,
    example_inputs: Any = None,
    activate: bool = True,
) -> nn.Module:
    """Insert adapters into ``model``'s layers, in place, and return the model.

    Args:
        model: a Hugging Face (or any) model whose layers sit in ModuleLists of same-class blocks.
        spec: ``{name: method}``, where method is a preset name (``"seq_bn"``, ``"double_seq_bn"``, ``"par_bn"``,
            ``"scaled_par_bn"``, ...) or a config object (``BottleneckConfig(...)``).
        example_inputs: a small batch (dict of model kwargs) for the one priming forward; built from the model's
            config when omitted.
        activate: make the injected adapters the active setup.

    Raises:
        ConfigError, NameCollisionError, SiteNotFoundError, CaptureError: nothing is changed when raised.
    """
    items = _normalise_spec(spec)
    check_materialized(model)  # serve: a meta-device model cannot be primed
    state = get_state(model)
    for name, _ in items:
        if state is not None and name in state.adapters:
            raise NameCollisionError(
                f"an adapter named {name!r} already exists in this model (existing: {sorted(state.adapters)}); "
                "choose another name or remove it first with fxadapt.remove(model, name)"
            )
    paths, layers = layers_of(model)
    # shared by the priming call and its variants (trusted siblings, model.prime_variants); the layers' structure
    # does not change until the commit below, so their signatures and hook dicts are found once for both
    primer = Siblings()
    with priming_memo(primer):
        primed = prime(model, layers, example_inputs, primer)
        context = ModelContext(model, paths, layers, primed, example_inputs)
        staged: list[tuple[int, str, str, nn.Module]] = []
        records: dict[str, AdapterRecord] = {}
        for name, config in items:
            # sites and model-level parts, through the method's capabilities (nothing is attached yet)
            placed = place(name, config, context)
            staged.extend((index, name, kind, module) for (index, kind), module in placed.modules.items())
            records[name] = AdapterRecord(config, placed.placements, placed.sites, members=placed.members)

        # the other common kinds of call (mask/no mask, train/eval), captured now: one trace per layer class each
        try:
            variants = prime_variants(model, layers, example_inputs, primer)
        except FxAdaptError:  # traced lazily at the first such call instead
            variants = []
    siblings = next((ls.siblings for ls in map(layer_state, layers) if ls is not None), None) or primer

    # commit, with rollback
    new_state = state is None
    if state is None:
        state = ModelState(layer_paths=list(paths))
    installed_now: list[nn.Module] = []
    added: list[tuple[nn.Module, str]] = []
    containers_now: list[nn.Module] = []  # layers that got their adapter container in this call
    previous_active = state.active
    try:
        for index, name, kind, module in staged:
            layer = layers[index]
            if layer_state(layer) is None:
                installed_now.append(layer)
            lstate = install(layer, index, model_type_of(model), siblings)
            for key, traced in [primed[index]] + [v[index] for v in variants]:
                if not lstate.traced.get(key) and not traced.capture.value_guards:
                    lstate.add_traced(layer, key, traced)
            container = layer._modules.get(CONTAINER)
            if container is None:
                container = nn.ModuleDict()
                layer.add_module(CONTAINER, container)
                containers_now.append(layer)
            if name not in container:
                container[name] = nn.ModuleDict()
                added.append((layer, name))
            container[name][site_key(kind)] = module
        state.adapters.update(records)
        for name, record in records.items():
            attach_hooks(model, name, record.config, context)
        if activate:
            state.active = Stack(*records)
        set_state(model, state)
        _apply_plans(model, state)
    except BaseException:
        for layer, name in added:
            del layer._modules[CONTAINER][name]
        for layer in [x for x, _ in added] + containers_now:
            if CONTAINER in layer._modules and not layer._modules[CONTAINER]:
                del layer._modules[CONTAINER]
        for layer in installed_now:
            uninstall(layer)
        for name in records:
            state.adapters.pop(name, None)
            detach_hooks(model, name)
        state.active = previous_active
        if new_state:
            set_state(model, None)
        else:
            _apply_plans(model, state)
        raise
    return model


def _placement(layer: nn.Module) -> dict[str, Any]:
    for p in layer.parameters():
        if p.is_floating_point():
            return {"device": p.device, "dtype": p.dtype}
    return {}


def _apply_plans(model: nn.Module, state: ModelState) -> None:
    """Give every layer its plan under the active setup, compiling each once on its known captures so that an
    invalid setup fails here (and the caller can roll back) instead of in the next forward."""
    if state.active is not None:
        validate(state.active, state.adapters)
        for fuse in _fuse_blocks(state.active):
            if fuse.name not in state.fusions:
                raise CompositionError(
                    f"{fuse!r} has no fusion layers; add them with fxadapt.add_fusion(model, {fuse!r}) first"
                )
    sync_routing_hook(model, state)  # serve: for a PerRow setup, active or per call (routing.py)
    sync_parallel_hooks(model, state)  # a decoder's encoder-side inputs under Parallel (parallel_inputs.py)
    _, layers = layers_of(model)
    for index, layer in enumerate(track(layers, desc="fxadapt: compiling layers", unit="layer")):
        lstate = layer_state(layer)
        if lstate is not None:
            lstate.set_plan(plan_for(state, index))
            lstate.warm(layer)


def _no_adapters(model: nn.Module) -> Exception:
    from .errors import AdapterNotFoundError

    return AdapterNotFoundError(
        f"{type(model).__name__} has no fxadapt adapters; add one with fxadapt.inject(model, {{'name': 'seq_bn'}})"
    )


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def activate(model: nn.Module, setup: str | Sequence[Any] | Block | None) -> nn.Module:
    """Make ``setup`` the active adapter setup and compile it into the layers.

    ``setup`` is an adapter name, a list of names (a ``Stack``), a composition block (``Stack``, ``Fuse``,
    ``Parallel``, ``BatchSplit``, ``Split``, ``Average``), or ``None`` to run the base model (bit-identical).
    Invalid setups raise :class:`CompositionError` and leave the previous setup active.
    """
    state = get_state(model)
    wanted = None if setup is None or (isinstance(setup, (list, tuple)) and not setup) else parse_setup(setup)
    if state is None:
        if wanted is not None:
            raise _no_adapters(model)
        return model
    if wanted is not None:
        for name in wanted.names():
            if name not in state.adapters:
                state.record(name)  # raises AdapterNotFoundError with the known names
    previous = state.active
    state.active = wanted
    try:
        _apply_plans(model, state)
    except BaseException:
        state.active = previous
        _apply_plans(model, state)
        raise
    return model


_activate_setup = activate  # for verbs whose ``activate`` flag shadows the verb


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the adapters in the active setup."""
    state = get_state(model)
    return tuple(state.active.names()) if state is not None and state.active is not None else ()


def active_setup(model: nn.Module) -> Block | None:
    """The active composition setup (``Stack("name")`` for a single adapter), or None."""
    state = get_state(model)
    return state.active if state is not None else None


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    """Every adapter in the model with its config, in injection order."""
    state = get_state(model)
    return {n: r.config for n, r in state.adapters.items()} if state is not None else {}


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def _merge(model: nn.Module, name: str, sign: int) -> None:
    from .errors import NotMergeableError

    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    record = state.record(name)
    why = why_not_mergeable(record.config)
    if why is not None:
        raise NotMergeableError(
            f"adapter {name!r} ({record.config.method}) cannot be merged into the base weights: {why}"
        )
    if record.merged == (sign > 0):
        return
    _, layers = layers_of(model)
    bases = [layers[i].get_submodule(s.module) for (i, _), s in record.sites.items() if hasattr(s, "module")]
    verb = f"{'merge' if sign > 0 else 'unmerge'} adapter {name!r}"
    snapshot = WeightSnapshot()  # serve: an interrupted merge restores every weight it already wrote
    for (index, _), site in record.sites.items():
        projection = getattr(site, "module", None)
        snapshot.save(layers[index].get_submodule(projection) if projection else layers[index])
    try:
        with torch.no_grad(), float_weights(bases, verb):  # quantized bases: dequantize → merge → requantize
            for (index, kind), site in record.sites.items():
                module = layers[index]._modules[CONTAINER][name][site_key(kind)]
                config = governing_config(record, kind)
                method_for(config).merge(config, module, site, layers[index], sign)
        record.merged = sign > 0
        _apply_plans(model, state)
    except BaseException:
        snapshot.restore()
        record.merged = sign < 0
        _apply_plans(model, state)
        raise


def merge(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter ``name`` into the base weights: the forward then costs exactly the base model's."""
    _merge(model, name, +1)
    return model


def unmerge(model: nn.Module, name: str) -> nn.Module:
    """Undo :func:`merge`: restore the base weights and run the adapter as graph nodes again."""
    _merge(model, name, -1)
    return model


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def remove(model: nn.Module, name: str) -> nn.Module:
    """Delete adapter ``name`` and its weights. With no adapter left the model is exactly the original."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    if state.record(name).merged:
        unmerge(model, name)
    _, layers = layers_of(model)
    del state.adapters[name]
    if state.active is not None and name in state.active.names():
        state.active = None  # as AdapterHub does: a setup naming a deleted adapter is no longer valid
    for fuse_name in [f for f, rec in state.fusions.items() if name in rec.children]:
        _drop_fusion(model, state, fuse_name)
    for layer in layers:
        container = layer._modules.get(CONTAINER)
        if container is not None and name in container:
            del container[name]
            if not container:
                del layer._modules[CONTAINER]
    _apply_plans(model, state)
    detach_hooks(model, name)
    for layer in layers:
        if CONTAINER not in layer._modules:
            uninstall(layer)
    if not state.adapters:
        set_state(model, None)
    return model


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def add_fusion(
    model: nn.Module,
    setup: Fuse | Sequence[Any],
    config: str | FusionConfig | dict | None = "dynamic",
    *,
    activate: bool = False,
) -> Fuse:
    """Add AdapterFusion layers for ``setup`` (a ``Fuse`` or a list of adapter names/Stacks) at every residual
    site where all fused adapters sit. Returns the ``Fuse`` block (pass it to :func:`activate`)."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    fuse = setup if isinstance(setup, Fuse) else Fuse(*setup)
    validate(Stack(fuse), state.adapters)
    cfg = fusion_config(config)
    if fuse.name in state.fusions:
        raise NameCollisionError(
            f"a fusion layer for {fuse!r} already exists; remove it with remove_fusion first"
        )
    children = tuple(c if isinstance(c, str) else c.last() for c in fuse.children)
    fusable = {c: set(fusion_kinds(state.adapters[c].config)) for c in children}
    for child in children:
        if not fusable[child]:
            raise CompositionError(
                f"Fuse needs adapters whose outputs AdapterFusion can attend over (bottleneck adapters); {child!r} "
                f"is {state.adapters[child].config.method}"
            )
    _, layers = layers_of(model)
    placements: dict[int, tuple[str, ...]] = {}
    for index in range(len(layers)):
        common = [set(state.adapters[c].placements.get(index, ())) & fusable[c] for c in children]
        kinds = tuple(
            k for k in state.adapters[children[0]].placements.get(index, ()) if all(k in c for c in common)
        )
        if kinds:
            placements[index] = kinds
    if not placements:
        raise SiteNotFoundError(f"the adapters of {fuse!r} share no site, so there is nowhere to fuse them")
    dropout = float(getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0)
    for index, kinds in placements.items():
        layer = layers[index]
        modules = nn.ModuleDict()
        for kind in kinds:
            site = state.adapters[children[0]].sites[(index, kind)]
            fusion = AdapterFusion(site.hidden_size, cfg, dropout).to(**_placement(layer))
            modules[site_key(kind)] = fusion.train(layer.training)
        layer._modules[CONTAINER][fuse.name] = modules
    state.fusions[fuse.name] = FusionRecord(cfg, children, placements)
    if activate:
        _activate_setup(model, fuse)
    return fuse


def _drop_fusion(model: nn.Module, state: ModelState, fuse_name: str) -> None:
    _, layers = layers_of(model)
    for layer in layers:
        container = layer._modules.get(CONTAINER)
        if container is not None and fuse_name in container:
            del container[fuse_name]
    del state.fusions[fuse_name]
    if state.active is not None and any(f.name == fuse_name for f in _fuse_blocks(state.active)):
        state.active = None


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def remove_fusion(model: nn.Module, setup: Fuse | Sequence[Any]) -> nn.Module:
    """Delete the fusion layers of ``setup``."""
    state = get_state(model)
    fuse = setup if isinstance(setup, Fuse) else Fuse(*setup)
    if state is None or fuse.name not in state.fusions:
        raise AdapterNotFoundError(
            f"no fusion layers for {fuse!r}; existing: {sorted(state.fusions) if state else []}"
        )
    _drop_fusion(model, state, fuse.name)
    _apply_plans(model, state)
    return model


def fusion_parameters(model: nn.Module, setup: Fuse | Sequence[Any]) -> dict[str, nn.Parameter]:
    state = get_state(model)
    fuse = setup if isinstance(setup, Fuse) else Fuse(*setup)
    if state is None or fuse.name not in state.fusions:
        raise AdapterNotFoundError(f"no fusion layers for {fuse!r}")
    out = {}
    for path in state.layer_paths:
        container = model.get_submodule(path)._modules.get(CONTAINER)
        if container is not None and fuse.name in container:
            for pname, p in container[fuse.name].named_parameters():
                out[f"{path}.{CONTAINER}.{fuse.name}.{pname}"] = p
    return out


def train_fusion(
    model: nn.Module, setup: Fuse | Sequence[Any], *, unfreeze_adapters: bool = False, train_head: bool = True
) -> nn.Module:
    """Train AdapterFusion: freeze everything except the fusion layers of ``setup`` (and the head; the fused
    adapters too with ``unfreeze_adapters``), activate the setup, set train mode."""
    fuse = setup if isinstance(setup, Fuse) else Fuse(*setup)
    trainable = set(map(id, fusion_parameters(model, fuse).values()))
    if unfreeze_adapters:
        for name in fuse.names():
            trainable |= set(map(id, adapter_parameters(model, name).values()))
    if train_head:
        trainable |= set(map(id, head_parameters(model).values()))
    activate(model, fuse)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.train()
    return model


def fusion_regularization_loss(model: nn.Module) -> torch.Tensor:
    """AdapterHub's regulariser for "dynamic" fusion: 0.01 · Σ ||I - W_value||² over all fusion layers."""
    total = torch.zeros(())
    for module in model.modules():
        if isinstance(module, AdapterFusion) and module.config.regularization:
            total = total + 0.01 * module.regularization_loss().to(total.device)
    return total


@serialized()  # serve: mutating verbs and lazy builds take turns (tracing.py)
def eject_prefix(model: nn.Module, name: str) -> nn.Module:
    """Replace adapter ``name``'s training-time reparameterisation by the weights it produces (prefix tuning: the
    MLP by the prefixes it makes, ``flat``): the same outputs, fewer parameters and no MLP per forward. Saved
    configs record the ejected form (``flat=True``) from then on. Unions eject their members that can."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    record = state.record(name)
    modules = dict(adapter_modules(model, name))
    ejected = method_for(record.config).eject(record.config, modules)
    if ejected is None:
        raise ConfigError(
            f"adapter {name!r} ({record.config.method}) has no reparameterisation to eject; eject_prefix applies "
            "to prefix tuning (and unions holding it)"
        )
    record.config = ejected
    _apply_plans(model, state)
    return model


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter ``name``, keyed by their full state_dict name."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    state.record(name)
    out = {}
    for path in state.layer_paths:
        layer = model.get_submodule(path)
        container = layer._modules.get(CONTAINER)
        if container is not None and name in container:
            for pname, p in container[name].named_parameters():
                out[f"{path}.{CONTAINER}.{name}.{pname}"] = p
    return out


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Everything saved for adapter ``name``: its parameters and persistent buffers (an orthogonal
    parametrization's base, ...), keyed by their full state_dict name."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    state.record(name)
    out: dict[str, torch.Tensor] = {}
    for path in state.layer_paths:
        container = model.get_submodule(path)._modules.get(CONTAINER)
        if container is not None and name in container:
            # parameters as the module holds them (not state_dict(): FSDP2's hooks turn those into shards) and
            # persistent buffers
            adapter = container[name]
            for key, t in adapter.named_parameters(remove_duplicate=False):
                out[f"{path}.{CONTAINER}.{name}.{key}"] = t
            for mod_name, module in adapter.named_modules(remove_duplicate=False):
                for buf_name, t in module._buffers.items():
                    if t is not None and buf_name not in module._non_persistent_buffers_set:
                        key = f"{mod_name}.{buf_name}" if mod_name else buf_name
                        out[f"{path}.{CONTAINER}.{name}.{key}"] = t
    return out


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of the model's prediction head: those outside ``model.base_model`` that are not tied to it."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return {}
    base_ids = {id(p) for p in base.parameters()}
    # a language-model head (the output embeddings) is part of the pretrained model, not a task head
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if isinstance(out_emb, nn.Module):
        base_ids |= {id(p) for p in out_emb.parameters()}
    prefix = getattr(model, "base_model_prefix", "")
    return {
        n: p
        for n, p in model.named_parameters(remove_duplicate=False)
        if not (prefix and n.startswith(prefix + "."))
        and id(p) not in base_ids
        and CONTAINER not in n.split(".")
    }


def train_adapter(model: nn.Module, name: str, *, train_head: bool = True) -> nn.Module:
    """Freeze everything except adapter ``name`` (and the prediction head), activate it, set train mode."""
    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    state.record(name)
    trainable = set(map(id, adapter_parameters(model, name).values()))
    if train_head:
        trainable |= set(map(id, head_parameters(model).values()))
    activate(model, name)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.train()
    return model

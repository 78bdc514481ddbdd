"""The verbs users call: inject, activate, remove, train_adapter, explain.

Every verb validates everything before it touches the model, and a failure while committing rolls back, so
a failed call leaves the model exactly as it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compose import Block, Fuse, Stack, parse_setup, validate
from .errors import (
    AdapterNotFoundError,
    CompositionError,
    ConfigError,
    NameCollisionError,
    SiteNotFoundError,
    nearest,
)
from .fusion import AdapterFusion, FusionConfig, fusion_config
from .install import install, layer_state, uninstall
from .methods.base import AdapterConfig, method_for, preset
from .methods.prompt import SoftPrompt, find_embed_module, install_prompt_hooks, remove_prompt_hooks
from .model import (
    CONTAINER,
    AdapterRecord,
    FusionRecord,
    ModelState,
    _fuse_blocks,
    get_state,
    layers_of,
    plan_for,
    prime,
    set_state,
)
from .rewrite import site_key
from .rollback import WeightSnapshot, check_adapter_name, check_materialized
from .routing import sync_routing_hook
from .tracing import serialized

__all__ = [
    "activate",
    "active_adapters",
    "active_setup",
    "adapter_parameters",
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
    primed = prime(model, layers, example_inputs)

    staged: list[tuple[int, str, str, nn.Module]] = []
    records: dict[str, AdapterRecord] = {}
    model_hooks: list[nn.Module] = []  # embedding modules that model-level methods (prompt tuning) hook
    for name, config in items:
        method = method_for(config)
        placements: dict[int, list[str]] = {}
        located = {}
        satisfied: set[str] = set()
        if getattr(method, "model_level", False):  # prompt tuning: the model's input, not a layer site
            _, embed = find_embed_module(model, layers[0], example_inputs)
            hidden = next((s.hidden_size for s in primed[0][1].report.residual), None)
            get_emb = getattr(model, "get_input_embeddings", None)
            module = SoftPrompt(config, hidden, get_emb() if callable(get_emb) else None)
            module.to(**_placement(layers[0])).train(layers[0].training)
            staged.append((0, name, "embed", module))
            records[name] = AdapterRecord(config, {0: ("embed",)}, {})
            model_hooks.append(embed)
            continue
        for index, (layer, (_, traced)) in enumerate(zip(layers, primed)):
            if not method.applies_to_layer(config, index):
                continue
            for request, site in method.select_sites(config, traced.report, layer):
                satisfied.add(request)
                if site.kind in placements.get(index, ()):
                    continue
                placements.setdefault(index, []).append(site.kind)
                located[(index, site.kind)] = site
        built = method.build_all(config, located, layers, paths)
        for (index, kind), module in built.items():
            module.to(**_placement(layers[index])).train(
                layers[index].training
            )  # new modules follow the mode
            staged.append((index, name, kind, module))
        missing = [r for r in method.requests(config) if r not in satisfied]
        if missing:
            available = sorted({k for _, t in primed for k in t.report.kinds()})
            opaque = {
                f"{paths[i]}.{leaf}": why
                for i, (_, t) in enumerate(primed)
                for leaf, why in t.capture.leaf_reasons.items()
            }
            hint = f". Tracing left these submodules opaque, which can hide sites: {opaque}" if opaque else ""
            raise SiteNotFoundError(
                f"adapter {name!r}: site(s) {missing} not found in {type(model).__name__}; it has {available}"
                f"{nearest(missing[0], available)}{hint}"
            )
        records[name] = AdapterRecord(config, {i: tuple(k) for i, k in placements.items()}, located)

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
            lstate = install(layer, index)
            key, traced = primed[index]
            if lstate.find_traced(layer, key, []) is None and not traced.capture.value_guards:
                lstate.add_traced(key, traced)
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
        for embed in model_hooks:
            install_prompt_hooks(model, embed)
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
    _, layers = layers_of(model)
    for index, layer in enumerate(layers):
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
    method = method_for(record.config)
    if not method.mergeable:
        raise NotMergeableError(
            f"adapter {name!r} ({record.config.method}) cannot be merged into the base weights: it is not a "
            "linear reparametrisation of them; mergeable methods are LoRA and (IA)^3"
        )
    if record.merged == (sign > 0):
        return
    _, layers = layers_of(model)
    snapshot = WeightSnapshot()  # serve: an interrupted merge restores every weight it already wrote
    try:
        with torch.no_grad():
            for (index, kind), site in record.sites.items():
                module = layers[index]._modules[CONTAINER][name][site_key(kind)]
                projection = getattr(site, "module", None)
                snapshot.save(layers[index].get_submodule(projection) if projection else layers[index])
                method.merge(record.config, module, site, layers[index], sign)
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
    if not any(getattr(method_for(r.config), "model_level", False) for r in state.adapters.values()):
        remove_prompt_hooks(model)
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
    for child in children:
        if state.adapters[child].config.method != "bottleneck":
            raise CompositionError(
                f"Fuse needs bottleneck adapters; {child!r} is {state.adapters[child].config.method}"
            )
    _, layers = layers_of(model)
    placements: dict[int, tuple[str, ...]] = {}
    for index in range(len(layers)):
        common = [set(state.adapters[c].placements.get(index, ())) for c in children]
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
    """Replace a prefix-tuning adapter's reparameterisation MLP by the prefixes it produces (``flat``): the same
    outputs, fewer parameters and no MLP per forward. Saved configs record ``flat=True`` from then on."""
    from .methods.prefix import PrefixSite, PrefixTuningConfig

    state = get_state(model)
    if state is None:
        raise _no_adapters(model)
    record = state.record(name)
    if not isinstance(record.config, PrefixTuningConfig):
        raise ConfigError(f"adapter {name!r} is {record.config.method}, not prefix tuning; nothing to eject")
    if record.config.flat:
        return model
    _, layers = layers_of(model)
    sites = []
    for layer in layers:
        container = layer._modules.get(CONTAINER)
        if container is not None and name in container:
            sites.extend(m for m in container[name].values() if isinstance(m, PrefixSite))
    ejected = {}
    for site in sites:
        pool = site.get_pool()
        if id(pool) not in ejected:
            ejected[id(pool)] = pool.ejected()
        site.set_pool(ejected[id(pool)])
    record.config = record.config.replace(flat=True)
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


# ------------------------------------------------------------------------------------------------------------
# explain


@dataclass
class LayerExplanation:
    path: str
    cls: str
    sites: list[str]
    module_sites: list[str]
    leaves: dict[str, str]
    rejected: list[tuple[str, str]]
    guard_keys: int
    plan: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)


@dataclass
class Explanation:
    model: str
    layers: list[LayerExplanation]

    def __str__(self) -> str:
        lines = [f"fxadapt: {self.model}, {len(self.layers)} layers"]
        for le in self.layers:
            lines.append(f"  {le.path} ({le.cls}): sites {', '.join(le.sites) or 'none'}")
            if le.module_sites:
                lines.append(f"      module sites: {', '.join(le.module_sites)}")
            if le.plan:
                lines.append(f"      active: {', '.join(le.plan)}")
            for leaf, why in le.leaves.items():
                lines.append(f"      opaque submodule {leaf}: {why}")
            for node, why in le.rejected:
                lines.append(f"      not a site: {node}: {why}")
            for note in le.kernels:
                lines.append(f"      kernels: {note}")
            if le.guard_keys:
                lines.append(f"      captured calls (guard keys): {le.guard_keys}")
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(str(self))


def explain(model: nn.Module, example_inputs: Any = None, *, verbose: bool = False) -> Explanation:
    """Per layer: sites found (and why other candidates were rejected), opaque submodules, captures, plan.

    Works on a model with or without adapters; it traces but never modifies the model.
    """
    paths, layers = layers_of(model)
    primed = prime(model, layers, example_inputs)
    out = []
    for path, layer, (_, traced) in zip(paths, layers, primed):
        lstate = layer_state(layer)
        report = traced.report
        out.append(
            LayerExplanation(
                path=path,
                cls=(lstate.orig_class if lstate else type(layer)).__name__,
                sites=[
                    f"{s.kind} (from {s.producer}{', post-norm' if s.norm else ''})" for s in report.residual
                ],
                module_sites=[f"{s.kind}={s.module}" for s in report.modules],
                leaves=dict(traced.capture.leaf_reasons),
                rejected=report.rejected if verbose else [],
                guard_keys=len(lstate.traced) if lstate else 0,
                plan=lstate.plan.describe() if lstate else [],
                kernels=list(lstate.notes) if lstate else [],
            )
        )
    explanation = Explanation(type(model).__name__, out)
    return explanation

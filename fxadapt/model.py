"""Model-level state: which adapters exist, where they sit, which are active; plus priming captures.

The state lives in the model's ``__dict__`` as plain data (layer paths, frozen configs), so deepcopy and pickle
carry it. Adapter weights live in each layer under ``fxadapt.<adapter>.<site_key>``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calls import using
from .capture import (
    VERIFY_SEED,
    find_layer_lists,
    record_layer_calls,
    seed_rng,
    trace_layer,
)
from .compose import Block, Fuse, parallel_channels
from .errors import AdapterNotFoundError, CaptureError, FxAdaptError, nearest
from .guards import call_key
from .install import LayerState, Siblings, Traced, layer_state
from .methods.base import AdapterConfig
from .parts import governing_config
from .progress import track
from .quantized import mode_bound
from .rewrite import AdapterRef, LayerPlan, SitePlan, site_key
from .rollback import preserved_buffers
from .sites import find_sites
from .tracing import tracing_scope

__all__ = [
    "AdapterRecord",
    "FusionRecord",
    "ModelState",
    "default_example_inputs",
    "get_state",
    "layers_of",
    "prime",
]

logger = logging.getLogger("fxadapt")
_MODEL_STATE = "_fxadapt_model"
CONTAINER = "fxadapt"


@dataclass
class AdapterRecord:
    config: AdapterConfig
    placements: dict[int, tuple[str, ...]]  # layer index -> site kinds and model parts held in its container
    sites: dict[tuple[int, str], Any] = field(
        default_factory=dict
    )  # (layer, kind) -> ResidualSite/ModuleSite; model parts (applied by hooks) have no entry
    merged: bool = False  # folded into the base weights: not in any plan while merged
    members: dict[str, int] = field(default_factory=dict)  # union adapters: site kind -> governing member


@dataclass
class FusionRecord:
    config: Any  # FusionConfig
    children: tuple[str, ...]  # the fused adapters' names (for a Fuse of Stacks: each Stack's last adapter)
    placements: dict[int, tuple[str, ...]]  # layer index -> residual site kinds


@dataclass
class ModelState:
    layer_paths: list[str]
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: Block | None = None
    fusions: dict[str, FusionRecord] = field(default_factory=dict)

    def record(self, name: str) -> AdapterRecord:
        if name not in self.adapters:
            known = sorted(self.adapters)
            raise AdapterNotFoundError(
                f"no adapter named {name!r} in this model; known adapters: {known or 'none'}{nearest(name, known)}"
            )
        return self.adapters[name]


def get_state(model: nn.Module) -> ModelState | None:
    return model.__dict__.get(_MODEL_STATE)


def set_state(model: nn.Module, state: ModelState | None) -> None:
    if state is None:
        model.__dict__.pop(_MODEL_STATE, None)
    else:
        model.__dict__[_MODEL_STATE] = state


def layers_of(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """Paths and modules of the model's repeating layers, in order (encoder before decoder)."""
    state = get_state(model)
    if state is not None:
        return state.layer_paths, [model.get_submodule(p) for p in state.layer_paths]
    lists = find_layer_lists(model)
    if not lists:
        raise CaptureError(
            f"no repeating layers found in {type(model).__name__}: expected a ModuleList of same-class transformer "
            "blocks (like encoder.layer or model.layers)"
        )
    paths = [f"{p}.{i}" for p, ml in lists for i in range(len(ml))]
    return paths, [m for _, ml in lists for m in ml]


def default_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, Any]:
    """Small example inputs built from the model's config: token ids (with a padded row), pixels, audio
    features or raw audio, for every modality the model's forward takes and its config describes."""
    config = getattr(model, "config", None)
    try:
        param = next(model.parameters())
        device = param.device
        float_dtype = param.dtype if param.is_floating_point() else torch.float32
    except StopIteration:
        device, float_dtype = torch.device("cpu"), torch.float32
    params = _forward_params(model)
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    wanted = [name]
    # multimodal models (a text and a vision tower) need every modality
    for sub, inp in (("text_config", "input_ids"), ("vision_config", "pixel_values")):
        if (
            config is not None
            and getattr(config, sub, None) is not None
            and inp in params
            and inp not in wanted
        ):
            wanted.append(inp)
    inputs: dict[str, Any] = {}
    for inp in wanted:
        value = _build_input(inp, config, batch, seq, gen)
        if value is None:
            raise CaptureError(
                f"cannot build example inputs for {type(model).__name__} (input {inp!r} from its config); pass "
                "example_inputs={...} with a small batch of real inputs"
            )
        inputs[inp] = value.to(device, float_dtype) if value.is_floating_point() else value.to(device)
    if "input_ids" in inputs and "attention_mask" in params:
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, -2:] = 0  # a padded row, so masks reach the layers as tensors (the usual training case)
        inputs["attention_mask"] = mask.to(device)
    if config is not None and getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        vocab = int(_config_value(config, "vocab_size") or 2)
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(seq // 2, 1)), generator=gen).to(
            device
        )
    return inputs


def _forward_params(model: nn.Module) -> dict[str, Any]:
    try:
        return dict(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def _takes_use_cache(model: nn.Module) -> bool:
    """Whether ``model(...)`` understands ``use_cache``: a parameter, or ``**kwargs`` of a model with a cache."""
    params = _forward_params(model)
    if "use_cache" in params:
        return True
    kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return kwargs and hasattr(getattr(model, "config", None), "use_cache")


def _config_value(config: Any, name: str, subs: tuple[str, ...] = ("text_config", "vision_config")) -> Any:
    value = getattr(config, name, None)
    if value is None:
        for sub in subs:
            value = getattr(getattr(config, sub, None), name, None)
            if value is not None:
                break
    return value


def _build_input(name: str, config: Any, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor | None:
    if config is None:
        return None
    if name == "input_ids":
        vocab = _config_value(config, "vocab_size", ("text_config",))
        return torch.randint(0, int(vocab), (batch, seq), generator=gen) if vocab else None
    if name == "pixel_values":
        size = _config_value(config, "image_size", ("vision_config",))
        if size is None:
            return None
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        channels = _config_value(config, "num_channels", ("vision_config",)) or 3
        return torch.randn(batch, channels, *size, generator=gen)
    if name == "input_features":
        mels = getattr(config, "num_mel_bins", None)
        if mels and getattr(config, "max_source_positions", None):  # Whisper: a fixed number of frames
            return torch.randn(batch, mels, 2 * config.max_source_positions, generator=gen)
        feat = getattr(config, "input_feat_per_channel", None) or mels
        if feat:  # Speech2Text-style [batch, frames, features]
            channels = getattr(config, "input_channels", 1)
            return torch.randn(batch, 4 * seq, feat * channels, generator=gen)
        return None
    if name == "input_values":  # raw audio: enough samples for ``seq`` frames of the conv feature encoder
        kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
        samples = 16000
        if kernels and strides:
            samples = seq
            for k, st in reversed(list(zip(kernels, strides))):
                samples = (samples - 1) * st + k
        return torch.randn(batch, samples, generator=gen)
    return None


def prepare_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The priming call's inputs: the config-built defaults, or the user's with ``use_cache=False`` added where
    the model takes it and the user did not set it (a live cache would be captured into every layer)."""
    inputs = default_example_inputs(model) if example_inputs is None else example_inputs
    if isinstance(inputs, dict) and "use_cache" not in inputs and _takes_use_cache(model):
        inputs = {**inputs, "use_cache": False}
    return inputs


def model_type_of(model: nn.Module) -> str | None:
    """The HF config's ``model_type`` (None for other models)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def prime(
    model: nn.Module, layers: list[nn.Module], example_inputs: Any = None, siblings: Siblings | None = None
) -> list[tuple[tuple, Traced]]:
    """Run one forward on example inputs; trace every layer on the call it received. Returns (key, traced).

    Sibling layers (same class, guard key, structure and read attributes) share one capture: it is traced once
    and checked bit-exactly against each sibling's own eager call."""
    inputs = prepare_inputs(model, example_inputs)
    # serve: priming and tracing must not advance BatchNorm statistics; the priming forward runs the base model
    # (whatever setup is active: a PerRow setup would need ids, a Parallel one replicates the batch)
    siblings = Siblings() if siblings is None else siblings
    with tracing_scope(), preserved_buffers(model), using(model, None), priming_memo(siblings):
        return _prime(model, layers, inputs, siblings)


def prime_variants(
    model: nn.Module, layers: list[nn.Module], example_inputs: Any = None, siblings: Siblings | None = None
) -> list[list[tuple[tuple, Traced]]]:
    """Captures of the other kinds of call a model commonly sees next, made now so that no first call pays for
    tracing: the batch with an all-ones mask when the priming one has padding (transformers then passes no mask
    to the layers) and the other way round, both in training mode, and the model's default call with its KV
    cache (decoders). One trace per layer class each. The priming forwards run the whole model in each mode
    (with its buffers preserved). ``siblings``: those of the priming call; a layer verified there to share a
    sibling's capture shares that sibling's captures of these calls too (no second eager check)."""
    inputs = prepare_inputs(model, example_inputs)
    batches = [inputs]
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] > 2:
        other = torch.ones_like(mask)
        if bool((mask != 0).all()):
            other[-1, -2:] = 0  # a padded row
        batches.append({**inputs, "attention_mask": other})
    if (
        isinstance(inputs, dict)
        and inputs.get("use_cache") is False
        and not (isinstance(example_inputs, dict) and "use_cache" in example_inputs)
        and _generates(model)
    ):
        # the model's default call builds a KV cache (decoders): its layers get a cache object
        batches += [{k: v for k, v in b.items() if k != "use_cache"} for b in batches]
    siblings = Siblings() if siblings is None else siblings
    primary = model.training
    bound = mode_bound(
        model
    )  # a forward in the other mode would change quantized weights (bitsandbytes 4-bit)
    # a new batch's forward stops once one layer of each group of siblings was called: the others share its
    # capture of that call (trusted, model._prime_calls), so the rest of the forward is not needed
    until = siblings.representatives(layers)
    out: list[list[tuple[tuple, Traced]]] = []
    # each batch is recorded once, in the model's own mode; the other mode reuses its recorded layer calls (same
    # arguments, another mode flag): one trace per layer class, verified against a fresh eager call, no second
    # model forward. Mode-major order: the model switches mode once, not once per batch.
    records: dict[int, tuple[dict, dict]] = {} if siblings.recorded is None else {0: siblings.recorded}
    with tracing_scope(), preserved_buffers(model), using(model, None), priming_memo(siblings):
        for training in (primary,) if bound else (primary, not primary):
            # the model's own mode is left as it is (submodules the user put in another mode stay so)
            with _mode(model, None if training == primary else training):
                for n, batch in enumerate(batches):
                    if n == 0 and training == primary:
                        continue  # the priming call itself (model.prime)
                    try:
                        if n not in records:
                            records[n] = _record(model, layers, batch, until)
                            out.append(_prime_calls(model, layers, *records[n], siblings))
                        else:
                            out.append(_prime_calls(model, layers, records[n][0], {}, siblings))
                    except FxAdaptError as exc:  # this kind of call is traced lazily at its first use instead
                        logger.debug(
                            "fxadapt: not priming a call variant (%s): %s",
                            "train" if training else "eval",
                            exc,
                        )
    return out


@contextlib.contextmanager
def priming_memo(siblings: Siblings) -> Iterator[None]:
    """Layer signatures and hook dicts computed once per layer for the duration of a priming call
    (``Siblings.signature``, ``Siblings.hooks``): the layers' structure does not change while priming. Nested
    uses share the outer memo (``inject`` holds one over ``prime`` and ``prime_variants``)."""
    if siblings.signatures is not None:
        yield
        return
    siblings.signatures, siblings.hook_memo = {}, {}
    try:
        yield
    finally:
        siblings.signatures, siblings.hook_memo = None, None


def _generates(model: nn.Module) -> bool:
    """A model with ``generate()`` (an LM head): its default call builds a KV cache worth priming."""
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # a model's own can_generate may need more than it has here
        return False


def _record(
    model: nn.Module, layers: list[nn.Module], inputs: Any, until: set[int] | None = None
) -> tuple[dict, dict]:
    """One forward: each layer's first call (args, kwargs) and its output under the verification seed (only up to
    the layers in ``until`` when given)."""
    outputs: dict[int, Any] = {}
    with torch.random.fork_rng(devices=[]):
        calls = record_layer_calls(
            model,
            layers,
            lambda: _call(model, inputs),
            outputs,
            lambda args: seed_rng(VERIFY_SEED, args),
            until,
        )
    return calls, outputs


def _prime(
    model: nn.Module, layers: list[nn.Module], inputs: Any, siblings: Siblings
) -> list[tuple[tuple, Traced]]:
    siblings.recorded = _record(model, layers, inputs)
    return _prime_calls(model, layers, *siblings.recorded, siblings)


def _prime_calls(
    model: nn.Module, layers: list[nn.Module], calls: dict, outputs: dict, siblings: Siblings
) -> list[tuple[tuple, Traced]]:
    out: list[tuple[tuple, Traced]] = []
    done: dict[int, tuple[tuple, Traced]] = {}
    for index, layer in enumerate(track(layers, desc="fxadapt: tracing layers", unit="layer")):
        if id(layer) in calls:
            args, kwargs = calls[id(layer)]
            done[id(layer)] = _prime_layer(model, layer, args, kwargs, siblings, outputs.get(id(layer)))
        else:  # not reached by a forward that stopped early: its group's representative's capture, if it fits
            entry = done.get(siblings.group.get(id(layer), -1))
            if entry is None or not siblings.takes(layer, *entry):
                raise CaptureError(
                    f"layer {index} ({type(layer).__name__}) was not called by the example forward; pass "
                    "example_inputs that run the whole model"
                )
            done[id(layer)] = entry
        out.append(done[id(layer)])
    return out


def _prime_layer(
    model: nn.Module, layer: nn.Module, args: tuple, kwargs: dict, siblings: Siblings, recorded: Any = None
):
    """The capture for this call of ``layer``: an installed one whose guards hold, a sibling's (verified against
    this layer's own eager output), or a new trace. ``recorded``: the output of the recorded call, the eager
    reference when the layer is not installed yet (an installed layer's recorded call ran its captured code)."""
    leaves, _, key = call_key(layer, args, kwargs, siblings.hooks(layer))
    state: LayerState | None = layer_state(layer)
    traced = state.find_traced(layer, key, leaves) if state is not None else None
    if traced is not None:
        return key, traced
    expected = recorded if state is None else None
    orig = state.orig_class if state is not None else type(layer)
    traced = siblings.reuse(orig, key, layer, args, kwargs, leaves, expected)
    if traced is not None:
        return key, traced
    capture = trace_layer(layer, orig.forward, args, kwargs, expected=expected)
    traced = Traced(capture, find_sites(layer, capture.graph, model_type_of(model)))
    siblings.add(orig, key, traced, layer)
    return key, traced


class _mode:
    """Temporarily put every module of ``module`` in train (``True``) or eval (``False``) mode."""

    def __init__(self, module: nn.Module, training: bool | None):
        self.layer, self.training = module, training

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for m in self.layer.modules()] if self.training is not None else []
        if self.training is not None:
            self.layer.train(self.training)

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.saved:
            m.training = flag


def plan_for(state: ModelState, index: int) -> LayerPlan:
    """What layer ``index`` runs under the active setup."""
    setup = state.active
    if setup is None:
        return LayerPlan()
    sites: dict[str, list[AdapterRef]] = {}
    for name in setup.names():
        record = state.adapters[name]
        if record.merged:
            continue
        for kind in record.placements.get(index, ()):
            if (index, kind) not in record.sites:  # a model part: its method's hooks apply it, not layer code
                continue
            sites.setdefault(kind, []).append(
                AdapterRef(name, f"{CONTAINER}.{name}.{site_key(kind)}", governing_config(record, kind))
            )
    fusions: dict[str, list[tuple[str, str, Any]]] = {}
    for fuse in _fuse_blocks(setup):
        record = state.fusions.get(fuse.name)
        if record is None:
            continue
        for kind in record.placements.get(index, ()):
            fusions.setdefault(kind, []).append(
                (fuse.name, f"{CONTAINER}.{fuse.name}.{site_key(kind)}", record.config)
            )
    parallel = parallel_channels(setup)
    # only a Parallel setup's code differs in a list's first layer (it replicates the batch): other setups give
    # all layers one plan, so siblings share one piece of generated code
    first = parallel > 1 and state.layer_paths[index].rsplit(".", 1)[-1] == "0"
    plans = tuple(SitePlan(kind, tuple(refs), tuple(fusions.get(kind, ()))) for kind, refs in sites.items())
    return LayerPlan(setup, plans, parallel, first)


def _fuse_blocks(setup: Block | str) -> list[Fuse]:
    if isinstance(setup, str):
        return []
    own = [setup] if isinstance(setup, Fuse) else []
    return own + [f for c in setup.children for f in _fuse_blocks(c)]

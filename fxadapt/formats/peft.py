"""PEFT checkpoints: LoRA and (IA)^3 folders as ``PeftModel.save_pretrained`` writes them (peft 0.21).

``adapter_config.json`` (``peft_type``, ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
``modules_to_save``, ...) + ``adapter_model.safetensors`` (or the pickle ``adapter_model.bin``), keys

    base_model.model.<module path>.lora_A.weight / .lora_B.weight       LoRA   (A: [r, in], B: [out, r])
    base_model.model.<module path>.ia3_l                                 (IA)^3 ([out, 1]; [1, in] on feed-forward)
    base_model.model.<head path>.weight                                  modules_to_save (the adapter name stripped)

The module paths, not ``target_modules``, say where the adapter sits: each is located among the model's layers and
becomes the module site of that projection (``attention.self.query`` → ``attn.q``; a projection the graph knows by
no role → ``linear:<path>``; GPT-2's whole ``c_attn`` → ``attn.qkv``). So regex ``target_modules``,
``"all-linear"``, ``layers_to_transform`` and ``exclude_modules`` load as what they selected. PEFT's (IA)^3 on
``feedforward_modules`` scales the projection's *input*; fxadapt's (IA)^3 scales outputs, so those are refused.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..methods.lora_outside import MODEL_PREFIX
from ..graphs import is_linear_like
from . import LayerPaths, Translated, listed, ordered, read_json, read_tensors, site_reports
from .peft_prompts import KINDS as PROMPT_KINDS

__all__ = ["read_adapter", "write_adapter"]

logger = logging.getLogger("fxadapt")

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
PREFIX = "base_model.model."
_PARAM = {
    "LORA": re.compile(
        r"(?P<module>.+)\.(?:(?P<param>lora_A|lora_B)(?:\.[^.]+)?\.weight|(?P<dora>lora_magnitude_vector)"
        r"(?:\.[^.]+)?(?:\.weight)?)"
    ),
    "IA3": re.compile(r"(?P<module>.+)\.(?P<param>ia3_l)(?:\.[^.]+)?"),
    "VERA": re.compile(r"(?P<module>.+)\.(?P<param>vera_lambda_b|vera_lambda_d)(?:\.[^.]+)?"),
}
# PEFT parameter -> fxadapt module parameter
_OURS = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "magnitude", "ia3_l": "lora_B",
         "vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"}  # fmt: skip
_VERA_SHARED = re.compile(r"base_model\.(?P<param>vera_A|vera_B)(?:\.[^.]+)?")
# adapter tensors of PEFT features fxadapt has no place for
_OTHER_ADAPTER_TENSORS = re.compile(r"\.(lora_|ia3_|hada_|lokr_|oft_|boft_|vera_)")
# config fields answered by the saved keys themselves, or bookkeeping
_FROM_KEYS = ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules", "modules_to_save")
_IA3_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "fan_in_fan_out", "init_ia3_weights", "feedforward_modules", *_FROM_KEYS}  # fmt: skip


def _sites(model, modules: dict[tuple[int, str], dict], reports, source: str):
    """Each saved projection's module site: ``{(layer, kind): (path, params)}``, and the kinds in order."""
    layers = LayerPaths(model)
    out: dict[tuple[int, str], dict] = {}
    kinds: dict[str, None] = {}
    unmapped = []
    for (index, path), params in sorted(modules.items(), key=lambda item: (item[0][0] is None, item[0])):
        if index is None:  # outside the layers: a model part (lora_outside.py)
            if not is_linear_like(model.get_submodule(path)):
                unmapped.append(path)
                continue
            out[(0, MODEL_PREFIX + path)] = (path, params)
            kinds[MODEL_PREFIX + path] = None
            continue
        report = reports[index]
        whole = [s.kind for s in report.modules if s.module == path and s.out_ranges is None]
        kind = whole[0] if whole else (f"linear:{path}" if path in report.linears else None)
        if kind is None:
            unmapped.append(f"{layers.paths[index]}.{path}")
            continue
        out[(index, kind)] = (path, params)
        kinds[kind] = None
    if unmapped:
        raise CheckpointError(
            f"{source}: adapted modules that map to no projection site of {type(model).__name__}: "
            f"{listed(sorted(unmapped))}"
        )
    return out, ordered(kinds)


def read_adapter(
    model: nn.Module,
    folder: Path,
    name: str | None = None,
    *,
    load_head: bool = True,
    example_inputs: Any = None,
) -> Translated:
    """Translate the PEFT LoRA / (IA)^3 adapter in ``folder`` for ``model``."""
    from ..api import head_parameters
    from ..methods.ia3 import IA3Config
    from ..methods.lora import LoRAConfig

    source = f"PEFT adapter {str(folder)!r}"
    meta = read_json(folder / CONFIG_NAME)
    peft_type = str(meta.get("peft_type", "")).upper()
    if peft_type in PROMPT_KINDS:
        return _read_prompt_learning(model, folder, meta, name, load_head, example_inputs, source)
    if peft_type not in _PARAM:
        raise CheckpointError(
            f"{source}: PEFT method peft_type={meta.get('peft_type')!r} is not supported by fxadapt; it reads "
            f"{[*sorted(_PARAM), *PROMPT_KINDS]}"
        )
    if peft_type in (
        "LORA",
        "VERA",
    ):  # the settings first: an unsupported feature is named before its tensors
        data = {k: v for k, v in meta.items() if k not in _FROM_KEYS}
        try:
            config = LoRAConfig.from_peft({**data, "target_modules": ["*"]})
        except ConfigError as exc:
            raise CheckpointError(f"{source}: {exc}") from exc
    else:
        bad = {k: v for k, v in meta.items() if k not in _IA3_IGNORED and v not in (None, False, {}, [])}
        if bad:
            raise CheckpointError(
                f"{source}: unsupported (IA)^3 setting(s) {bad}; fxadapt reads PEFT's defaults"
            )
        config = IA3Config()
    tensors = read_tensors(folder, WEIGHTS_NAME, PICKLE_NAME)
    layers = LayerPaths(model)
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    unmapped = []
    shared: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        vera = _VERA_SHARED.fullmatch(key) if peft_type == "VERA" else None
        if vera is not None:
            shared[vera.group("param")] = value
            continue
        inner = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        inner = re.sub(r"\.modules_to_save\.[^.]+\.", ".", inner)  # PEFT < 0.6 kept the wrapper's path
        m = _PARAM[peft_type].fullmatch(inner)
        located = layers.locate(m.group("module")) if m else None
        if located is None and m is not None:  # a projection outside the layers (pooler.dense, a head)
            outside = layers.model_path(m.group("module"))
            located = (None, outside) if outside is not None else None
        if located is not None:
            param = m.group("param") or m.groupdict().get("dora")
            modules.setdefault(located, {})[param] = value
        elif m is not None or _OTHER_ADAPTER_TENSORS.search("." + inner):
            unmapped.append(key)
        else:  # modules_to_save
            head[inner] = value
    if unmapped:
        raise CheckpointError(
            f"{source}: keys that map to no site of {type(model).__name__}: {listed(sorted(unmapped))}"
        )
    if not modules:
        raise CheckpointError(f"{source}: holds no {peft_type} weights")
    reports = site_reports(model, example_inputs)
    placed, kinds = _sites(model, modules, reports, source)
    leave_out = tuple(
        i for i in range(len(reports)) if all(index != i or k.startswith(MODEL_PREFIX) for index, k in placed)
    )
    changes: dict[str, Any] = {"target_modules": None, "sites": kinds, "leave_out": leave_out}
    if peft_type == "IA3":  # feed-forward modules: (IA)^3 scales their input
        feedforward = set(_feedforward(meta.get("feedforward_modules"), layers, placed))
        changes["feedforward_modules"] = ordered(
            kind for (i, kind), (path, _) in placed.items() if _full(layers, i, kind, path) in feedforward
        )
    if any("lora_magnitude_vector" in params for _, params in placed.values()) and not config.use_dora:
        raise CheckpointError(
            f"{source}: holds DoRA magnitudes (lora_magnitude_vector) but use_dora is not set"
        )
    config = config.replace(**changes)
    weights = {
        (i, kind, _OURS[p]): t.reshape(-1, 1) if p == "ia3_l" else t
        for (i, kind), (_, params) in placed.items()
        for p, t in params.items()
    }
    if peft_type == "VERA":
        if set(shared) != {"vera_A", "vera_B"}:
            raise CheckpointError(
                f"{source}: a VeRA adapter without its projections base_model.vera_A/vera_B (saved with "
                "save_projection=False?); fxadapt needs them"
            )
        first = min(placed)  # the owner of the shared projections (LoRAMethod.build_all)
        weights[(*first, "shared.lora_A")] = shared["vera_A"]
        weights[(*first, "shared.lora_B")] = shared["vera_B"]
    if head and load_head and not head_parameters(model):
        logger.warning(
            "%s has no prediction head; loading %s without its modules_to_save", type(model).__name__, source
        )
    if not load_head or not head_parameters(model):
        head = {}
    return Translated(name or "default", config, weights, head, source)


def _read_prompt_learning(model, folder, meta, name, load_head, example_inputs, source) -> Translated:
    """PEFT prompt / prefix tuning (``peft_prompts.py``); ``modules_to_save`` heads as for LoRA."""
    from ..api import head_parameters
    from .peft_prompts import prefix_weights, read_prompt_learning

    tensors = read_tensors(folder, WEIGHTS_NAME, PICKLE_NAME)
    ours = {k: v for k, v in tensors.items() if k == "prompt_embeddings"}
    head = {
        re.sub(r"\.modules_to_save\.[^.]+\.", ".", k[len(PREFIX) :] if k.startswith(PREFIX) else k): v
        for k, v in tensors.items()
        if k != "prompt_embeddings"
    }
    config, weights = read_prompt_learning(meta, ours, source)
    if "prefix" in weights:
        weights = prefix_weights(model, weights["prefix"], source, example_inputs)
    if not load_head or not head_parameters(model):
        if head and load_head:
            logger.warning(
                "%s has no prediction head; loading %s without its modules_to_save",
                type(model).__name__,
                source,
            )
        head = {}
    return Translated(name or "default", config, weights, head, source)


def _scales_input(model: nn.Module, name: str, key: tuple[int, str]) -> bool:
    """Whether adapter ``name``'s module at ``(layer, kind)`` scales the projection's input (feed-forward (IA)^3)."""
    from ..model import CONTAINER, layers_of
    from ..rewrite import site_key

    _, layers = layers_of(model)
    return getattr(layers[key[0]]._modules[CONTAINER][name][site_key(key[1])], "scales_input", False)


def _full(layers: LayerPaths, index: int, kind: str, path: str) -> str:
    """The model path of a placed projection (a model part's path is already one)."""
    return path if kind.startswith(MODEL_PREFIX) else f"{layers.paths[index]}.{path}"


def _feedforward(patterns: Any, layers: LayerPaths, placed: dict) -> list[str]:
    """The placed projections PEFT treats as feed-forward (``feedforward_modules``: names or one regex)."""
    if not patterns:
        return []
    out = []
    for (index, kind), (path, _) in placed.items():
        full = _full(layers, index, kind, path)
        if isinstance(patterns, str):
            hit = re.fullmatch(patterns, full) is not None
        else:
            hit = any(full == p or full.endswith("." + p) for p in patterns)
        if hit:
            out.append(full)
    return out


# ------------------------------------------------------------------------------------------------------------
# writing


def write_adapter(model: nn.Module, folder: Path, name: str, *, with_head: bool = False) -> Path:
    """Write LoRA / (IA)^3 adapter ``name`` as a folder ``peft.PeftModel.from_pretrained(model, folder)`` loads."""
    from safetensors.torch import save_file

    from ..api import adapter_parameters, head_parameters
    from ..methods.lora import projection_features
    from ..model import get_state
    from . import module_parameters

    adapter_parameters(model, name)  # raises for an unknown adapter
    record = get_state(model).record(name)
    config = record.config
    if config.method in ("prompt_tuning", "prefix_tuning"):
        return _write_prompt_learning(model, folder, name, record, with_head)
    if config.method not in ("lora", "ia3"):
        raise CheckpointError(
            f"PEFT format: fxadapt writes LoRA, DoRA, VeRA, (IA)^3, prompt and prefix tuning, not {config.method!r}"
        )
    if (config.use_dora or config.is_vera) and config.variant != "peft":
        which = "DoRA" if config.use_dora else "VeRA"
        raise CheckpointError(
            f"{which} adapter {name!r} computes AdapterHub's formula (variant='adapterhub'), which PEFT's {which} "
            "does not; write it with format='adapterhub', or train it with variant='peft'"
        )
    if config.use_dora and config.is_vera:
        raise CheckpointError(f"adapter {name!r} combines DoRA and VeRA, which PEFT has no form for")
    if getattr(config, "use_gating", False):
        raise CheckpointError(
            f"adapter {name!r} is a gated LoRA (use_gating=True, UniPELT's), which PEFT has no form for; write it "
            "with format='adapterhub'"
        )
    params = module_parameters(model, name)
    paths = get_state(model).layer_paths
    tensors: dict[str, torch.Tensor] = {}
    targets, conv1d, feedforward_modules = set(), False, set()
    input_scaled = {
        (i, k) for i, kinds in record.placements.items() for k in kinds if _scales_input(model, name, (i, k))
    }
    if config.is_vera:
        first = min(record.sites)
        tensors["base_model.vera_A"] = params[(*first, "shared.lora_A")]
        tensors["base_model.vera_B"] = params[(*first, "shared.lora_B")]
    entries = [
        (i, k, getattr(site, "out_ranges", None), f"{paths[i]}.{site.module}")
        for (i, k), site in record.sites.items()
    ]
    entries += [  # model parts: projections outside the layers (lora_outside.py)
        (i, k, None, k[len(MODEL_PREFIX) :])
        for i, kinds in record.placements.items()
        for k in kinds
        if (i, k) not in record.sites and k.startswith(MODEL_PREFIX)
    ]
    for index, kind, out_slice, full in sorted(entries):
        if out_slice is not None:
            raise CheckpointError(
                f"PEFT adapts whole modules, but site {kind!r} of adapter {name!r} is a slice of the fused "
                f"projection {full!r}; adapt the whole projection (sites=('attn.qkv',)) to export to PEFT"
            )
        targets.add(full)
        conv1d |= projection_features(model.get_submodule(full))[2]
        if config.composition_mode == "scale":  # PEFT has no alpha: fold the scale into the vector
            vector = params[(index, kind, "lora_B")] * config.scaling
            feedforward = (index, kind) in input_scaled
            tensors[f"{PREFIX}{full}.ia3_l"] = vector.reshape(1, -1) if feedforward else vector
            if feedforward:
                feedforward_modules.add(full)
        elif config.is_vera:  # PEFT's VeRA has no scaling: fold it into lambda_b
            tensors[f"{PREFIX}{full}.vera_lambda_b"] = params[(index, kind, "lambda_b")] * config.scaling
            tensors[f"{PREFIX}{full}.vera_lambda_d"] = params[(index, kind, "lambda_d")]
        else:
            for p in ("lora_A", "lora_B"):
                tensors[f"{PREFIX}{full}.{p}.weight"] = params[(index, kind, p)]
            if config.use_dora:
                tensors[f"{PREFIX}{full}.lora_magnitude_vector"] = params[(index, kind, "magnitude")]
    head = head_parameters(model) if with_head else {}
    if with_head and not head:
        raise CheckpointError(
            f"with_head=True, but {type(model).__name__} has no prediction head outside its base model"
        )
    modules_to_save = sorted({k.split(".")[0] for k in head}) or None
    for key, p in head.items():
        tensors[PREFIX + key] = p
    cfg = getattr(model, "config", None)
    common = {
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "fan_in_fan_out": conv1d,
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        "target_modules": sorted(targets),
        "task_type": None,
    }
    if config.composition_mode == "scale":
        meta = {
            **common,
            "peft_type": "IA3",
            "feedforward_modules": sorted(feedforward_modules),
            "init_ia3_weights": True,
        }
    elif config.is_vera:
        meta = {
            **common,
            "peft_type": "VERA",
            "r": config.r,
            "d_initial": config.vera_d,
            "vera_dropout": config.dropout,
            "save_projection": True,
            "projection_prng_key": 0,
            "init_weights": True,
            "bias": "none",
        }
    else:
        inits = {"lora": True, "gaussian": "gaussian"}
        meta = {
            **common,
            "peft_type": "LORA",
            "r": config.r,
            "lora_alpha": config.alpha,
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "init_lora_weights": inits.get(config.init_weights, False),
            "bias": "none",
            "use_dora": config.use_dora,
        }
    import json

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()},
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def _write_prompt_learning(model: nn.Module, folder: Path, name: str, record: Any, with_head: bool) -> Path:
    import json

    from safetensors.torch import save_file

    from ..api import head_parameters
    from . import module_parameters
    from .peft_prompts import write_prompt_learning

    meta, tensors = write_prompt_learning(model, record, module_parameters(model, name), name)
    head = head_parameters(model) if with_head else {}
    if with_head and not head:
        raise CheckpointError(
            f"with_head=True, but {type(model).__name__} has no prediction head outside its base model"
        )
    meta["modules_to_save"] = sorted({k.split(".")[0] for k in head}) or None
    tensors.update({PREFIX + k: p for k, p in head.items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()},
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder

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
from . import LayerPaths, Translated, listed, ordered, read_json, read_tensors, site_reports

__all__ = ["read_adapter", "write_adapter"]

logger = logging.getLogger("fxadapt")

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
PREFIX = "base_model.model."
_PARAM = {
    "LORA": re.compile(r"(?P<module>.+)\.(?P<param>lora_A|lora_B)(?:\.[^.]+)?\.weight"),
    "IA3": re.compile(r"(?P<module>.+)\.(?P<param>ia3_l)(?:\.[^.]+)?"),
}
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
    for (index, path), params in sorted(modules.items()):
        report = reports[index]
        whole = [s.kind for s in report.modules if s.module == path and s.out_slice is None]
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
    if peft_type not in _PARAM:
        raise CheckpointError(
            f"{source}: PEFT method peft_type={meta.get('peft_type')!r} is not supported by fxadapt; it reads "
            "'LORA' and 'IA3'"
        )
    if peft_type == "LORA":  # the settings first: an unsupported feature is named before its tensors are
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
    for key, value in tensors.items():
        inner = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        inner = re.sub(r"\.modules_to_save\.[^.]+\.", ".", inner)  # PEFT < 0.6 kept the wrapper's path
        m = _PARAM[peft_type].fullmatch(inner)
        located = layers.locate(m.group("module")) if m else None
        if located is not None:
            modules.setdefault(located, {})[m.group("param")] = value
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
    feedforward = _feedforward(meta.get("feedforward_modules"), layers, placed) if peft_type == "IA3" else []
    if feedforward:
        raise CheckpointError(
            f"{source}: (IA)^3 on feed-forward modules scales their input (PEFT feedforward_modules="
            f"{meta.get('feedforward_modules')!r}, here {listed(feedforward)}); fxadapt's (IA)^3 scales "
            "projection outputs only"
        )
    leave_out = tuple(i for i in range(len(reports)) if all(index != i for index, _ in placed))
    config = config.replace(target_modules=None, sites=kinds, leave_out=leave_out)
    param = "lora_B" if peft_type == "IA3" else None
    weights = {
        (i, kind, param or p): t.reshape(-1, 1) if param else t
        for (i, kind), (_, params) in placed.items()
        for p, t in params.items()
    }
    if head and load_head and not head_parameters(model):
        logger.warning(
            "%s has no prediction head; loading %s without its modules_to_save", type(model).__name__, source
        )
    if not load_head or not head_parameters(model):
        head = {}
    return Translated(name or "default", config, weights, head, source)


def _feedforward(patterns: Any, layers: LayerPaths, placed: dict) -> list[str]:
    """The placed projections PEFT treats as feed-forward (``feedforward_modules``: names or one regex)."""
    if not patterns:
        return []
    out = []
    for (index, _), (path, _) in placed.items():
        full = f"{layers.paths[index]}.{path}"
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
    if config.method not in ("lora", "ia3"):
        raise CheckpointError(f"PEFT format: fxadapt writes LoRA and (IA)^3 adapters, not {config.method!r}")
    params = module_parameters(model, name)
    paths = get_state(model).layer_paths
    tensors: dict[str, torch.Tensor] = {}
    targets, conv1d = set(), False
    for (index, kind), site in sorted(record.sites.items()):
        if site.out_slice is not None:
            raise CheckpointError(
                f"PEFT adapts whole modules, but site {kind!r} of adapter {name!r} is a slice of the fused "
                f"projection {site.module!r}; adapt the whole projection (sites=('attn.qkv',)) to export to PEFT"
            )
        full = f"{paths[index]}.{site.module}"
        targets.add(full)
        conv1d |= projection_features(model.get_submodule(full))[2]
        if config.composition_mode == "scale":  # PEFT has no alpha: fold the scale into the vector
            tensors[f"{PREFIX}{full}.ia3_l"] = params[(index, kind, "lora_B")] * config.scaling
        else:
            for p in ("lora_A", "lora_B"):
                tensors[f"{PREFIX}{full}.{p}.weight"] = params[(index, kind, p)]
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
        meta = {**common, "peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": True}
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
        }
    import json

    save_file(
        {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()},
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder

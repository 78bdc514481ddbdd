"""AdapterHub ``adapters`` checkpoints: adapter folders (bottleneck, LoRA, (IA)^3), their heads, AdapterFusion.

Folders, as ``adapters`` 1.x writes them (``adapters/utils.py``):

- adapter: ``adapter_config.json`` (``{"config", "hidden_size", "model_class", "model_name", "model_type", "name",
  "version"}``) + ``pytorch_adapter.bin`` or ``adapter.safetensors``;
- head, beside it: ``head_config.json`` + ``pytorch_model_head.bin`` or ``model_head.safetensors``;
- fusion: ``adapter_fusion_config.json`` (``"adapter_names"``) + ``pytorch_model_adapter_fusion.bin`` or
  ``model_adapter_fusion.safetensors``.

Saved keys name a module path; which fxadapt site it is comes from the layer's graph, not from per-model tables:

- bottleneck ``<layer>.<owner>[.<x>_adapters].adapters.<name>.<param>``: a ``*_adapters`` container is named
  after AdapterHub's location key (``attention_adapters`` → ``attn.out``, ``output_adapters`` → ``ffn.out``,
  ``cross_attention_adapters`` → ``cross.out``); without one, the owner is the module that holds the sublayer's
  output projection (BERT's ``attention.output``, T5's ``layer.1``): the site is the residual site whose producer
  lies inside it. Fusion layers sit beside the adapters: ``...adapter_fusion_layer.<a,b>.<query|key|value>``.
- LoRA / (IA)^3 ``<layer>.<projection>.loras.<name>.lora_A|lora_B``: the module site of that projection; a fused
  projection (GPT-2's ``c_attn``, AdapterHub's ``LoRAMergedLinear``) holds its enabled q/k/v parts stacked and
  splits into fxadapt's slice sites. The sites come from the keys, so AdapterHub's per-model choices carry over
  (LLaMA's "intermediate" LoRA is on ``down_proj``; ``selfattn_lora`` also adapts cross-attention).

Writing must put weights where AdapterHub will look, which differs per family: :data:`HOMES` (bottleneck) and
``adapterhub_lora.FFN_LORA`` (LoRA), one row per family; :data:`STATIC_HEADS` says which HF heads equal which
AdapterHub heads. The LoRA family's keys are read and written in ``adapterhub_lora.py``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, nearest
from . import (
    LayerPaths,
    Translated,
    adapterhub_union,
    check_model,
    listed,
    module_parameters,
    read_json,
    read_tensors,
    site_reports,
    split_key,
    unmapped_keys,
)
from . import adapterhub_bottleneck as bn
from .adapterhub_lora import lora_config_dict, lora_tensors, read_lora_weights

__all__ = ["read_adapter", "write_adapter"]

logger = logging.getLogger("fxadapt")

# (config, safetensors, pickle) file names of an adapter, a head and a fusion folder
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin")
HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
FUSION_FILES = (
    "adapter_fusion_config.json",
    "model_adapter_fusion.safetensors",
    "pytorch_model_adapter_fusion.bin",
)

# fmt: off
# AdapterHub's location keys: the container a model keeps on the layer for each residual site
CONTAINERS = {"attention_adapters": "attn.out", "output_adapters": "ffn.out", "cross_attention_adapters": "cross.out"}
# Where AdapterHub keeps bottleneck (and fusion) layers, relative to the layer: "parent" = the module owning the
# site's output projection (BERT's BertSelfOutput / BertOutput), "sublayer" = the layer's sublayer holding it
# (T5's layer.N), or a path per site kind. Other model types: the CONTAINERS on the layer.
HOMES: dict[str, str | dict[str, str]] = {
    "bert": "parent", "roberta": "parent", "xlm-roberta": "parent", "electra": "parent", "deberta": "parent",
    "deberta-v2": "parent", "xmod": "parent", "bert-generation": "parent",
    "t5": "sublayer", "mt5": "sublayer",
    "vit": {"attn.out": "attention_adapters", "ffn.out": "output.output_adapters"},
}
# HF head class -> the AdapterHub flex head it equals (adapters' head_utils.STATIC_TO_FLEX_HEAD_MAP): head_type,
# layers, activation (compared when layers > 1), use_pooler, {flex-head index: module of the HF head}
_POOLED = ("classification", 1, None, True, {1: "classifier"})
_DENSE = ("classification", 2, "tanh", False, {1: "classifier.dense", 4: "classifier.out_proj"})
_HEAD = ("classification", 2, "tanh", False, {1: "classification_head.dense", 4: "classification_head.out_proj"})
_SCORE = ("classification", 1, None, False, {1: "score"})
_TAGGING = ("tagging", 1, None, False, {1: "classifier"})
STATIC_HEADS: dict[str, tuple[str, int, str | None, bool, dict[int, str]]] = {
    "BertForSequenceClassification": _POOLED, "BertForTokenClassification": _TAGGING,
    "RobertaForSequenceClassification": _DENSE, "RobertaForTokenClassification": _TAGGING,
    "XLMRobertaForSequenceClassification": _DENSE, "XLMRobertaForTokenClassification": _TAGGING,
    "DistilBertForSequenceClassification": ("classification", 2, "relu", False, {1: "pre_classifier", 4: "classifier"}),
    "DistilBertForTokenClassification": _TAGGING,
    "ElectraForSequenceClassification": ("classification", 2, "gelu", False, {1: "classifier.dense", 4: "classifier.out_proj"}),
    "ElectraForTokenClassification": _TAGGING,
    "DebertaV2ForSequenceClassification": ("classification", 2, "gelu", False, {1: "pooler.dense", 4: "classifier"}),
    "GPT2ForSequenceClassification": _SCORE, "GPT2ForTokenClassification": _TAGGING,
    "LlamaForSequenceClassification": _SCORE, "MistralForSequenceClassification": _SCORE,
    "BartForSequenceClassification": _HEAD, "T5ForSequenceClassification": _HEAD,
    "ViTForImageClassification": ("image_classification", 1, None, False, {1: "classifier"}),
}

# AdapterHub's BnConfig defaults, and its string presets (adapters' ADAPTER_CONFIG_MAP)
_BN = dict(
    original_ln_before=False, original_ln_after=True, ln_before=False, ln_after=False, init_weights="bert",
    init_weights_seed=None, is_parallel=False, scaling=1.0, use_gating=False, residual_before_ln=True,
    adapter_residual_before_ln=False, inv_adapter=None, inv_adapter_reduction_factor=None, cross_adapter=False,
    leave_out=[], dropout=0.0, phm_layer=False, stochastic_depth=0.0,
)
_SEQ = {**_BN, "original_ln_before": True, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu",
        "reduction_factor": 16}
_DOUBLE = {**_BN, "mh_adapter": True, "output_adapter": True, "non_linearity": "swish", "reduction_factor": 16}
_PAR = {**_BN, "mh_adapter": False, "output_adapter": True, "non_linearity": "relu", "reduction_factor": 2,
        "init_weights": "mam_adapter", "is_parallel": True, "scaling": 4.0}
_INV = {"inv_adapter": "nice", "inv_adapter_reduction_factor": 2}
_IA3 = {"architecture": "lora", "intermediate_lora": True, "r": 1, "alpha": 1, "attn_matrices": ["k", "v"],
        "composition_mode": "scale", "init_weights": "ia3"}
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": _SEQ, "pfeiffer": _SEQ, "double_seq_bn": _DOUBLE, "houlsby": _DOUBLE, "par_bn": _PAR,
    "parallel": _PAR, "scaled_par_bn": {**_PAR, "scaling": "learned"}, "scaled_parallel": {**_PAR, "scaling": "learned"},
    "seq_bn_inv": {**_SEQ, **_INV}, "pfeiffer+inv": {**_SEQ, **_INV},
    "double_seq_bn_inv": {**_DOUBLE, **_INV}, "houlsby+inv": {**_DOUBLE, **_INV},
    "compacter++": {**_SEQ, "phm_layer": True, "reduction_factor": 32, "non_linearity": "gelu"},
    "compacter": {**_DOUBLE, "phm_layer": True, "reduction_factor": 32, "non_linearity": "gelu"},
    "lora": {"architecture": "lora"}, "ia3": _IA3, "vera": {"architecture": "lora", "vera_d": 0.1, "vera_b": 0.0},
    "dora": {"architecture": "lora", "use_dora": True},
    "dvora": {"architecture": "lora", "use_dora": True, "vera_d": 0.1, "vera_b": 0.0},
    "prefix_tuning": {"architecture": "prefix_tuning"}, "prefix_tuning_flat": {"architecture": "prefix_tuning", "flat": True},
    "prompt_tuning": {"architecture": "prompt_tuning"}, "mtl_lora": {"architecture": "mtl_lora"},
    "loreft": {"architecture": "reft"}, "noreft": {"architecture": "reft", "orthogonality": False},
    "direft": {"architecture": "reft", "orthogonality": False, "subtract_projection": False},
    "mam": {"architecture": "union"}, "unipelt": {"architecture": "union"},
}
UNSUPPORTED_ARCHITECTURES = {
}
# architectures read and written by their own modules (adapterhub_reft.py, ...): architecture -> (reader,) and
# fxadapt method -> writer; filled at the end of this module
OTHER_ARCHITECTURES: dict[str, tuple[Any, ...]] = {}
WRITERS: dict[str, Any] = {}
# adapter-transformers 1/2: activation names (configs without "version") and key names
_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_LEGACY_KEYS = {"attention_text_task_adapters": "adapters", "attention_text_lang_adapters": "adapters",
                "layer_text_task_adapters": "adapters", "layer_text_lang_adapters": "adapters",
                "invertible_lang_adapters": "invertible_adapters"}
_BOTTLENECK_PARAMS = {"adapter_up": "up", "adapter_norm_before": "norm_before", "adapter_norm_after": "norm_after",
                      "scaling": "scaling", "gate": "gate"}
# fmt: on


# ------------------------------------------------------------------------------------------------------------
# configs


def resolve_config(raw: Any, version: Any, source: str) -> dict[str, Any]:
    """The full config dict of an ``adapter_config.json`` ``"config"`` entry (a dict or a preset name)."""
    if isinstance(raw, str):
        if raw not in PRESETS:
            raise CheckpointError(
                f"{source}: unknown AdapterHub config name {raw!r}; expected one of {sorted(PRESETS)}"
                f"{nearest(raw, PRESETS)}"
            )
        raw = PRESETS[raw]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: 'config' must be a dict or a preset name, got {type(raw).__name__}")
    architecture = raw.get("architecture")
    if architecture in OTHER_ARCHITECTURES:
        return dict(raw)
    if architecture in UNSUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{source}: {UNSUPPORTED_ARCHITECTURES[architecture]} is not supported by fxadapt"
        )
    if architecture in ("lora", "mtl_lora"):
        return dict(raw)
    if architecture not in (None, "bottleneck"):
        raise CheckpointError(f"{source}: unknown AdapterHub architecture {architecture!r}")
    data = {**_BN, **raw}
    if not version and data.get("non_linearity") in _ACTIVATION_RENAME:
        data["non_linearity"] = _ACTIVATION_RENAME[data["non_linearity"]]
    return data


def lora_config(data: dict[str, Any], version: Any, source: str) -> Any:
    from ..methods.lora import LoRAConfig

    data = dict(data)
    # adapters < 1.1.0 trained LoRA with a faulty scaling; its loader sets alpha = r for them (its #770)
    old = isinstance(version, str) and version.startswith("adapters.")
    if old and tuple(int(x) for x in re.findall(r"\d+", version)[:3]) < (1, 1, 0):
        data["alpha"] = data.get("r", 8)
    target = LoRAConfig
    if data.get("architecture") == "mtl_lora":
        from ..methods.mtl_lora import MTLLoRAConfig

        target = MTLLoRAConfig
    try:
        return target.from_adapterhub(data)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------------
# keys -> sites


def _residual_kind(report: Any, inner: str) -> str | None:
    """The residual site kind of a bottleneck home ``inner`` (a path inside the layer)."""
    parts = inner.split(".") if inner else []
    if parts and parts[-1] in CONTAINERS:
        kind = CONTAINERS[parts[-1]]
        return kind if any(s.kind == kind for s in report.residual) else None
    owner = ".".join(parts)
    found = [s.kind for s in report.residual if owner and (s.producer + ".").startswith(owner + ".")]
    return found[0] if len(found) == 1 else None


def _bottleneck_param(param: str, ln_before: bool) -> str | None:
    """fxadapt's name for an AdapterHub ``Adapter`` parameter; ``""`` for a duplicate entry to skip."""
    head, _, rest = param.partition(".")
    if head == "adapter_down":
        index, _, rest = rest.partition(".")
        if index == ("1" if ln_before else "0"):
            return "down." + rest
        return "" if ln_before and index == "0" else None  # adapter_down.0 is adapter_norm_before
    ours = _BOTTLENECK_PARAMS.get(head)
    return None if ours is None else ours + ("." + rest if rest else "")


def _residual_weights(model, tensors, marker, name, reports, param_of, source):
    """``...<marker>.<name>.<param>`` keys at residual sites → ``{(layer, kind, our param): tensor}``."""
    layers = LayerPaths(model)
    weights, unmapped = {}, []
    for key, value in tensors.items():
        split = split_key(key, marker, name)
        located = layers.locate(split[0]) if split else None
        kind = _residual_kind(reports[located[0]], located[1]) if located else None
        param = param_of(split[1]) if split else None
        if kind is None or param is None:
            unmapped.append(key)
        elif param:
            weights[(located[0], kind, param)] = value
    if unmapped:
        raise unmapped_keys(model, source, unmapped)
    return weights


# ------------------------------------------------------------------------------------------------------------
# reading


def read_adapter(
    model: nn.Module,
    folder: Path,
    name: str | None = None,
    *,
    load_head: bool = True,
    example_inputs: Any = None,
) -> Translated:
    """Translate the AdapterHub adapter in ``folder`` (see the module docstring) for ``model``."""
    source = f"AdapterHub adapter {str(folder)!r}"
    meta = read_json(folder / ADAPTER_FILES[0])
    check_model(model, meta.get("model_type"), meta.get("hidden_size"), source)
    saved = meta.get("name")
    if not isinstance(saved, str) or not saved:
        raise CheckpointError(f"{source}: adapter_config.json names no adapter ('name': {saved!r})")
    data = resolve_config(meta.get("config"), meta.get("version"), source)
    tensors = {}
    for key, value in read_tensors(folder, *ADAPTER_FILES[1:]).items():
        for old, new in _LEGACY_KEYS.items():
            key = key.replace(old, new)
        tensors[key] = value
    if data.get("architecture") in OTHER_ARCHITECTURES:
        config, weights = OTHER_ARCHITECTURES[data["architecture"]][0](model, data, tensors, saved, source)
    elif data.get("architecture") in ("lora", "mtl_lora"):
        config = lora_config(data, meta.get("version"), source)
        reports = site_reports(model, example_inputs)
        weights, sites, used = read_lora_weights(model, tensors, saved, reports, config, source)
        if not sites:
            raise CheckpointError(f"{source}: holds no LoRA weights for adapter {saved!r}")
        config = config.replace(sites=sites, leave_out=tuple(i for i in range(len(reports)) if i not in used))
    else:
        tensors, extra = bn.split_model_level(tensors, saved)  # invertible block, shared PHM weights
        config = bn.bottleneck_config(data, bool(extra["invertible"]), source)
        reports = site_reports(model, example_inputs)
        ln_before = config.ln_before
        weights = _residual_weights(
            model, tensors, "adapters", saved, reports, lambda p: _bottleneck_param(p, ln_before), source
        )
        weights.update(bn.model_level_weights(config, extra, weights, source))
    head = _read_head(model, folder, source) if load_head else {}
    return Translated(name or saved, config, weights, head, source)


def _read_head(model: nn.Module, folder: Path, source: str) -> dict[str, torch.Tensor]:
    """The head saved beside the adapter, keyed by the model's head parameter names."""
    from ..api import head_parameters

    if not (folder / HEAD_FILES[0]).is_file():
        return {}
    meta = read_json(folder / HEAD_FILES[0])
    tensors = read_tensors(folder, *HEAD_FILES[1:])
    if not head_parameters(model):
        logger.warning("%s has no prediction head; loading %s without its head", type(model).__name__, source)
        return {}
    flex = meta.get("config")
    if flex is None:  # a static HF head, saved under the model's own parameter names
        return tensors
    cls = type(model).__name__
    spec = STATIC_HEADS.get(cls)
    theirs = (
        flex.get("head_type"),
        flex.get("layers"),
        flex.get("activation_function"),
        bool(flex.get("use_pooler")),
    )
    if (
        spec is None
        or spec[:2] != theirs[:2]
        or (spec[1] > 1 and spec[2] != theirs[2])
        or spec[3] != theirs[3]
    ):

        def show(h):
            return f"{h[0]} head (layers={h[1]}, activation_function={h[2]!r}, use_pooler={h[3]})"

        ours = (
            f"its head equals AdapterHub's {show(spec)}"
            if spec
            else "fxadapt knows no AdapterHub head equal to it"
        )
        raise CheckpointError(
            f"{source}: its AdapterHub {show(theirs)} has no equivalent in {cls} ({ours}); pass load_head=False "
            "to load the adapter alone"
        )
    out, unmapped = {}, []
    for key, value in tensors.items():
        m = re.fullmatch(rf"heads\.{re.escape(str(meta.get('name')))}\.(\d+)\.(.+)", key)
        module = spec[4].get(int(m.group(1))) if m else None
        if module is None:
            unmapped.append(key)
        else:
            out[f"{module}.{m.group(2)}"] = value
    if unmapped:
        raise CheckpointError(f"{source}: head weights {listed(unmapped)} have no place in {cls}'s head")
    return out


# ------------------------------------------------------------------------------------------------------------
# writing


def _home(model_type: str | None, kind: str, producer: str) -> str:
    """Where AdapterHub keeps the bottleneck layer of site ``kind`` (a path inside the layer)."""
    home = HOMES.get(model_type or "")
    if home == "parent":
        return producer.rpartition(".")[0]
    if home == "sublayer":
        return ".".join(producer.split(".")[:2])
    table = home if isinstance(home, dict) else {v: k for k, v in CONTAINERS.items()}
    if kind not in table:
        raise CheckpointError(f"AdapterHub keeps no bottleneck adapter at {kind!r} in {model_type!r} models")
    return table[kind]


def _meta(model: nn.Module, name: str | None, config: Any) -> dict[str, Any]:
    from .. import __version__

    cfg = getattr(model, "config", None)
    return {
        "config": config,
        "hidden_size": getattr(cfg, "hidden_size", None),
        "model_class": type(model).__name__,
        "model_name": getattr(cfg, "_name_or_path", "") or "",
        "model_type": getattr(cfg, "model_type", None),
        "name": name,
        "version": f"fxadapt.{__version__}",
    }


def _write(
    folder: Path, files: tuple[str, str, str], meta: dict, tensors: dict, use_safetensors: bool
) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    if use_safetensors:
        save_file(tensors, str(folder / files[1]), metadata={"format": "pt"})
    else:  # what `adapters` reads by default; a plain dict of tensors (torch.load(weights_only=True) reads it)
        torch.save(tensors, str(folder / files[2]))
    (folder / files[0]).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_adapter(
    model: nn.Module, folder: Path, name: str, *, with_head: bool = False, use_safetensors: bool = False
) -> Path:
    """Write adapter ``name`` as an AdapterHub folder that ``adapters``' ``model.load_adapter(folder)`` loads.

    ``use_safetensors=False`` writes ``pytorch_adapter.bin`` (what ``load_adapter`` reads by default: a plain dict
    of tensors); ``True`` writes ``adapter.safetensors`` (load it with ``use_safetensors=True``).
    """
    from ..api import adapter_parameters
    from ..model import get_state

    adapter_parameters(model, name)  # raises for an unknown adapter / a model without adapters
    record = get_state(model).record(name)
    config = record.config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = LayerPaths(model)
    params = module_parameters(model, name)
    if config.method == "bottleneck":
        data, tensors = write_bottleneck(model, record, params, name)
    elif config.method in WRITERS:
        data, tensors = WRITERS[config.method](model, record, params, name)
    elif config.method in ("lora", "ia3", "mtl_lora"):
        outside = sorted({k for i, ks in record.placements.items() for k in ks if (i, k) not in record.sites})
        if outside:
            raise CheckpointError(
                f"AdapterHub's LoRA adapts projections inside the layers only; adapter {name!r} also adapts "
                f"{outside}; write it with format='peft'"
            )
        data = lora_config_dict(config, model_type, {k for _, k in record.sites})
        if config.method == "mtl_lora":
            data.update(
                architecture="mtl_lora",
                n_up_projection=config.n_up_projection,
                task_specific_matrix_type=config.task_specific_matrix_type,
                weights_sharpness=config.weights_sharpness,
            )
        tensors = lora_tensors(model, record, params, name, layers, config, data["attn_matrices"])
    else:
        raise CheckpointError(f"AdapterHub format: cannot write {config.method} adapters")
    _write(folder, ADAPTER_FILES, _meta(model, name, data), tensors, use_safetensors)
    if with_head:
        _write_head(model, folder, use_safetensors)
    return folder


def write_bottleneck(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    """AdapterHub's ``BnConfig`` dict and tensors of a bottleneck adapter (``record``: its sites)."""
    config = record.config
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = LayerPaths(model)
    data = bn.bottleneck_dict(config)
    tensors, used = bn.model_level_tensors(model, record, params, name)
    for (index, kind, pname), p in params.items():
        if (index, kind, pname) in used:
            continue
        home = _home(model_type, kind, record.sites[(index, kind)].producer)
        base = f"{layers.saved_path(index, home)}.adapters.{name}"
        head, _, rest = pname.partition(".")
        if head == "down":
            tensors[f"{base}.adapter_down.{int(config.ln_before)}.{rest}"] = p
        if head == "norm_before":  # AdapterHub's Sequential holds the same LayerNorm at adapter_down.0
            tensors[f"{base}.adapter_down.0.{rest}"] = p
        if head != "down":
            theirs = {v: k for k, v in _BOTTLENECK_PARAMS.items()}[head]
            tensors[f"{base}.{theirs}{'.' + rest if rest else ''}"] = p
    return data, tensors


def _write_head(model: nn.Module, folder: Path, use_safetensors: bool) -> None:
    """The model's HF head as AdapterHub's static head (``"config": null``, the model's own parameter names)."""
    from ..api import head_parameters

    head = head_parameters(model)
    if not head:
        raise CheckpointError(
            f"with_head=True, but {type(model).__name__} has no prediction head outside its base model"
        )
    cfg = getattr(model, "config", None)
    meta = _meta(model, None, None)
    meta["num_labels"] = getattr(cfg, "num_labels", None)
    meta["label2id"] = {str(v): int(k) for k, v in (getattr(cfg, "id2label", None) or {}).items()}
    _write(folder, HEAD_FILES, meta, head, use_safetensors)


# ------------------------------------------------------------------------------------------------------------
# other architectures (one module each)


def _read_reft(model: nn.Module, data: dict, tensors: dict, saved: str, source: str) -> tuple[Any, dict]:
    from .adapterhub_reft import reft_config, reft_weights

    return reft_config(data, source), reft_weights(model, tensors, saved, source)


def _write_reft(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    from .adapterhub_reft import reft_tensors

    if not record.config.subtract_projection:
        raise CheckpointError(
            f"adapter {name!r} is a DiReFT (subtract_projection=False), which adapters 1.3.0 cannot load: it rebuilds "
            "ReFT configs from their fields and subtract_projection is not one, so it would run it as NoReFT"
        )

    return record.config.to_adapterhub(), reft_tensors(model, record, params, name)


OTHER_ARCHITECTURES["reft"] = (_read_reft,)
WRITERS["reft"] = _write_reft


def _read_prefix(model: nn.Module, data: dict, tensors: dict, saved: str, source: str) -> tuple[Any, dict]:
    from .adapterhub_prompts import prefix_config, prefix_weights

    config = prefix_config(data, source)
    return config, prefix_weights(model, config, tensors, saved, source)


def _write_prefix(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    from .adapterhub_prompts import prefix_dict, prefix_tensors

    return prefix_dict(record.config), prefix_tensors(model, record, params, name)


def _read_prompt(model: nn.Module, data: dict, tensors: dict, saved: str, source: str) -> tuple[Any, dict]:
    from .adapterhub_prompts import prompt_config, prompt_weights

    return prompt_config(data, source), prompt_weights(model, tensors, saved, source)


def _write_prompt(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    from .adapterhub_prompts import prompt_dict, prompt_tensors

    return prompt_dict(record.config), prompt_tensors(model, record, params, name)


OTHER_ARCHITECTURES["prefix_tuning"] = (_read_prefix,)
OTHER_ARCHITECTURES["prompt_tuning"] = (_read_prompt,)
WRITERS["prefix_tuning"] = _write_prefix
WRITERS["prompt_tuning"] = _write_prompt

OTHER_ARCHITECTURES["union"] = (adapterhub_union.read_union,)
WRITERS["union"] = adapterhub_union.write_union

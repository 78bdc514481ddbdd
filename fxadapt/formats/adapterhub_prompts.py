"""AdapterHub prefix-tuning and prompt-tuning checkpoints ↔ fxadapt's.

**Prefix tuning** (``"architecture": "prefix_tuning"``). AdapterHub keeps one ``PrefixTuningPool`` on the base model;
per adapter a group of prefix modules, one per *location*: ``[<base prefix>.]prefix_tuning.prefix_tunings.<name>.
<location>.<param>`` (the layers hold references to the pool, saved again as ``<layer>...prefix_tuning.pool.
prefix_tunings...``: the same tensors, skipped here). A location's module covers the prefixes of all layers at it
(``adapters/methods/prefix_tuning.py``): ``wte`` + ``control_trans`` (``Linear → tanh → Linear``) or, flat, one
``control_trans`` parameter. These are fxadapt's :class:`~fxadapt.methods.prefix.PrefixPool` parameters, under the
first layer of the group (``pool.<param>``). Locations: names starting with ``encoder`` are the encoder's
self-attention of an encoder-decoder model, ``cross`` its cross-attention, any other the (decoder's) self-attention;
written as ``encoder_prefix`` / ``cross_prefix`` / ``self_prefix`` (DistilBERT: ``self``, one row in
:data:`SELF_LOCATION`). Gated prefixes (``use_gating``, UniPELT) are refused.

**Prompt tuning** (``"architecture": "prompt_tuning"``): ``[<base prefix>.]prompt_tuning.prompt_tunings.<name>.
prompt_embedding.weight`` ``[prompt_length, hidden]``; AdapterHub inserts the prompt into the output of the
model's embeddings module, which is fxadapt's ``PromptTuningConfig(placement="embeddings_output")``.
``random_uniform_scale`` is a class attribute there (not saved), ``prompt_init_text`` a string fxadapt cannot
tokenize without the tokenizer: neither matters for loaded weights.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from . import LayerPaths, listed, site_reports

__all__ = [
    "prefix_config",
    "prefix_tensors",
    "prefix_weights",
    "prompt_config",
    "prompt_tensors",
    "prompt_weights",
]

# model type -> AdapterHub's location name of (decoder) self-attention prefixes, where it is not "self_prefix"
SELF_LOCATION = {"distilbert": "self"}
_IGNORED = {"architecture", "init_weights_seed", "shared_gating"}


# ------------------------------------------------------------------------------------------------------------
# prefix tuning


def prefix_config(data: dict[str, Any], source: str) -> Any:
    from ..methods.prefix import PrefixTuningConfig

    if data.get("use_gating"):
        raise CheckpointError(
            f"{source}: gated prefix tuning (use_gating=True, as in UniPELT) is not supported"
        )
    fields = ("prefix_length", "bottleneck_size", "non_linearity", "flat", "dropout", "encoder_prefix",
              "cross_prefix", "leave_out")  # fmt: skip
    unknown = sorted(set(data) - set(fields) - _IGNORED - {"use_gating"})
    if unknown:
        raise CheckpointError(f"{source}: unknown prefix-tuning setting(s) {unknown}")
    kwargs = {k: data[k] for k in fields if k in data}
    kwargs["leave_out"] = tuple(kwargs.get("leave_out") or ())
    try:
        return PrefixTuningConfig(**kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def _groups(model: Any, config: Any, example_inputs: Any = None) -> list[tuple[str, int]]:
    """``(location role, owner layer index, kind)`` of each fxadapt prefix pool, as ``PrefixTuningMethod.build_all``
    groups them: per layer list and site kind; the encoder's self-attention only with ``encoder_prefix``."""
    layers = LayerPaths(model)
    lists = {p.rsplit(".", 1)[0] for p in layers.paths}
    groups: dict[tuple[str, str], int] = {}
    for index, report in enumerate(site_reports(model, example_inputs)):
        if index in config.leave_out:
            continue
        for site in report.attention:
            if site.kind == "cross.kv" and not config.cross_prefix:
                continue
            layer_list = layers.paths[index].rsplit(".", 1)[0]
            encoder = site.kind == "attn.kv" and len(lists) > 1 and "encoder" in layer_list
            if encoder and not config.encoder_prefix:
                continue
            groups.setdefault((layer_list, site.kind), index)
    out = []
    for (layer_list, kind), index in groups.items():
        encoder = kind == "attn.kv" and len(lists) > 1 and "encoder" in layer_list
        out.append(("cross" if kind == "cross.kv" else "encoder" if encoder else "self", index, kind))
    return out


def _role(location: str) -> str:
    return (
        "cross" if location.startswith("cross") else "encoder" if location.startswith("encoder") else "self"
    )


def prefix_weights(
    model: Any, config: Any, tensors: dict, name: str, source: str, example_inputs: Any = None
):
    """``{(owner layer, kind, "pool.<param>"): tensor}`` from AdapterHub's pool keys."""
    marker = f"prefix_tuning.prefix_tunings.{name}."
    by_location: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in tensors.items():
        if f".prefix_tuning.pool.prefix_tunings.{name}." in "." + key:
            continue  # a layer's reference to the pool: the same tensors again
        at = key.find(marker)
        if at < 0 or (at > 0 and key[at - 1] != "."):
            unmapped.append(key)
            continue
        location, _, param = key[at + len(marker) :].partition(".")
        by_location.setdefault(location, {})[param] = value
    if unmapped:
        raise CheckpointError(
            f"{source}: keys that are no prefix-tuning weights of {name!r}: {listed(sorted(unmapped))}"
        )
    groups = {role: (index, kind) for role, index, kind in _groups(model, config, example_inputs)}
    weights = {}
    for location, params in by_location.items():
        role = _role(location)
        if role not in groups:
            raise CheckpointError(
                f"{source}: prefixes at AdapterHub location {location!r} have no place in {type(model).__name__} "
                f"(its prefix groups: {sorted(groups)})"
            )
        index, kind = groups[role]
        weights.update({(index, kind, f"pool.{p}"): v for p, v in params.items()})
    if not weights:
        raise CheckpointError(f"{source}: holds no prefix-tuning weights for adapter {name!r}")
    return weights


def prefix_tensors(model: Any, record: Any, params: dict, name: str) -> dict[str, torch.Tensor]:
    layers = LayerPaths(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    names = {
        "cross": "cross_prefix",
        "encoder": "encoder_prefix",
        "self": SELF_LOCATION.get(model_type, "self_prefix"),
    }
    owners = {(index, kind): role for role, index, kind in _groups(model, record.config)}
    base = f"{layers.prefix}.prefix_tuning" if layers.prefix else "prefix_tuning"
    out = {}
    for (index, kind, pname), p in params.items():
        if not pname.startswith("pool."):
            continue  # only the owners hold the pool
        role = owners.get((index, kind))
        if role is None:
            raise CheckpointError(
                f"prefix pool of adapter {name!r} at layer {index} {kind} has no AdapterHub location"
            )
        out[f"{base}.prefix_tunings.{name}.{names[role]}.{pname[len('pool.') :]}"] = p
    return out


def prefix_dict(config: Any) -> dict[str, Any]:
    return {
        "architecture": "prefix_tuning",
        "encoder_prefix": config.encoder_prefix,
        "cross_prefix": config.cross_prefix,
        "leave_out": list(config.leave_out),
        "flat": config.flat,
        "prefix_length": config.prefix_length,
        "bottleneck_size": config.bottleneck_size,
        "non_linearity": config.non_linearity,
        "dropout": config.dropout,
        "use_gating": False,
        "shared_gating": True,
        "init_weights_seed": None,
    }


# ------------------------------------------------------------------------------------------------------------
# prompt tuning


def prompt_config(data: dict[str, Any], source: str) -> Any:
    from ..methods.prompt import PromptTuningConfig

    unknown = sorted(set(data) - {"prompt_length", "prompt_init", "prompt_init_text", "combine",
                                  "random_uniform_scale"} - _IGNORED)  # fmt: skip
    if unknown:
        raise CheckpointError(f"{source}: unknown prompt-tuning setting(s) {unknown}")
    try:
        return PromptTuningConfig(
            prompt_length=data.get("prompt_length", 10),
            combine=data.get("combine", "prefix"),
            random_uniform_scale=data.get("random_uniform_scale", 0.5),
            placement="embeddings_output",
        )
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def prompt_weights(model: Any, tensors: dict, name: str, source: str) -> dict:
    suffix = f"prompt_tuning.prompt_tunings.{name}.prompt_embedding.weight"
    found = {k: v for k, v in tensors.items() if k == suffix or k.endswith("." + suffix)}
    others = sorted(set(tensors) - set(found))
    if len(found) != 1 or others:
        raise CheckpointError(
            f"{source}: expected one tensor '{suffix}' (behind an optional base-model prefix); found "
            f"{listed(sorted(found))}, others {listed(others)}"
        )
    return {(0, "embed", "prompt"): next(iter(found.values()))}


def prompt_tensors(model: Any, record: Any, params: dict, name: str) -> dict[str, torch.Tensor]:
    if record.config.placement != "embeddings_output":
        raise CheckpointError(
            f"prompt-tuning adapter {name!r} has placement={record.config.placement!r} (in front of the word "
            "embeddings); AdapterHub inserts prompts into the embeddings' output, where this prompt means something "
            "else: train it with PromptTuningConfig(placement='embeddings_output'), or write format='peft'"
        )
    layers = LayerPaths(model)
    base = f"{layers.prefix}.prompt_tuning" if layers.prefix else "prompt_tuning"
    return {f"{base}.prompt_tunings.{name}.prompt_embedding.weight": params[(0, "embed", "prompt")]}


def prompt_dict(config: Any) -> dict[str, Any]:
    return {
        "architecture": "prompt_tuning",
        "prompt_length": config.prompt_length,
        "prompt_init": "random_uniform",
        "prompt_init_text": None,
        "combine": config.combine,
        "init_weights_seed": None,
    }

"""AdapterHub's LoRA-family tensors (DoRA, VeRA, MTL-LoRA) ↔ fxadapt's LoRA modules.

Per projection, ``<layer>.<projection>.loras.<name>.<param>`` (``adapters/methods/lora.py``):

=================================  ==============================  ============================================
AdapterHub                         fxadapt (module parameter)      shape
=================================  ==============================  ============================================
``lora_A`` / ``lora_B``            ``lora_A`` / ``lora_B``         [r, in] / [out, r] (MTL-LoRA: [n, out, r])
``m.weight`` (DoRA)                ``magnitude``                   [out, 1] there, [out] here
``vera_D`` / ``vera_B`` (VeRA)     ``vera_D`` / ``vera_B``         [r, r] / [out, out]
``task_specific.values``,          ``task_specific``, ``weights``  [r], [n] (MTL-LoRA)
``weights`` (MTL-LoRA)
=================================  ==============================  ============================================

VeRA's frozen random projections are one pair per adapter, ``[<base prefix>.]shared_parameters.<name>.lora_A`` /
``lora_B``; fxadapt keeps them in the first adapted projection (``shared.lora_A``). AdapterHub 1.3.0 saves and
loads them only under a base-model prefix (its filter looks for ``.shared_parameters.``): a VeRA adapter of a bare
``BertModel`` is saved without them there, which this reader reports.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import CheckpointError
from ..methods.base import widened
from . import LayerPaths, ordered, site_reports, split_key, unmapped_keys

__all__ = [
    "FFN_LORA",
    "SHARED",
    "from_adapterhub_param",
    "lora_config_dict",
    "lora_tensors",
    "noop_tensors",
    "read_lora_weights",
    "shared_keys",
    "to_adapterhub_param",
]

logger = logging.getLogger("fxadapt")

# AdapterHub's LoRA locations of FFN projections; LLaMA-style models wrap down_proj as "intermediate"
FFN_LORA = {
    "llama": {"ffn.down": "intermediate", "ffn.up": "output"},
    "mistral": {"ffn.down": "intermediate", "ffn.up": "output"},
}
FFN_LORA_DEFAULT = {"ffn.up": "intermediate", "ffn.down": "output"}

SHARED = "shared_parameters"
# AdapterHub parameter name -> (fxadapt name, reshape to ours)
_IN = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "m.weight": "magnitude",
    "vera_D": "vera_D",
    "vera_B": "vera_B",
    "task_specific.values": "task_specific",
    "weights": "weights",
    "gate.weight": "gate.weight",  # gated LoRA (UniPELT)
    "gate.bias": "gate.bias",
}
_OUT = {v: k for k, v in _IN.items()}


def from_adapterhub_param(param: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """fxadapt's name and tensor for an AdapterHub LoRA-module parameter; None for an unknown one."""
    ours = _IN.get(param)
    if ours is None:
        return None
    return ours, value.reshape(-1) if ours == "magnitude" else value


def to_adapterhub_param(param: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """AdapterHub's name and tensor for an fxadapt LoRA-module parameter; None for the shared VeRA ones."""
    if param.startswith("shared."):
        return None
    theirs = _OUT.get(param)
    if theirs is None:
        raise CheckpointError(f"AdapterHub's LoRA modules have no parameter for fxadapt's {param!r}")
    return theirs, value.reshape(-1, 1) if param == "magnitude" else value


def shared_keys(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """VeRA's shared projections in a checkpoint: ``{"lora_A": ..., "lora_B": ...}`` (keys behind any prefix)."""
    out = {}
    for key, value in tensors.items():
        head, _, param = key.rpartition(".")
        if (head == f"{SHARED}.{name}" or head.endswith(f".{SHARED}.{name}")) and param in (
            "lora_A",
            "lora_B",
        ):
            out[param] = value
    return out


def noop_tensors(
    config: Any, rows: int, in_features: int, weight_rows: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """AdapterHub tensors of a LoRA-family module that changes nothing (for projections AdapterHub adapts but the
    fxadapt adapter does not, e.g. cross-attention under ``selfattn_lora``): a zero update, DoRA's magnitude
    ``‖W‖`` (so that ``m / ‖W + 0‖ = 1``), (IA)^3 ``1 / alpha``."""
    if config.composition_mode == "scale":
        return {"lora_B": torch.full((rows, 1), 1 / config.alpha)}
    out: dict[str, torch.Tensor] = {}
    if config.is_vera:
        out["vera_D"] = torch.zeros(config.r, config.r)
        out["vera_B"] = torch.zeros(rows, rows)
    elif config.method == "mtl_lora":
        n = config.n_up_projection
        out.update(lora_A=torch.zeros(config.r, in_features), lora_B=torch.zeros(n, rows, config.r))
        out.update({"task_specific.values": torch.ones(config.r), "weights": torch.ones(n)})
    else:
        out["lora_A"] = torch.zeros(config.r, in_features)
        out["lora_B"] = torch.zeros(rows, config.r)
    if getattr(config, "use_gating", False):  # any gate: the update is zero
        out["gate.weight"] = torch.zeros(1, in_features)
        out["gate.bias"] = torch.zeros(1)
    if config.use_dora:
        assert weight_rows is not None
        out["m.weight"] = torch.linalg.norm(widened(weight_rows.detach()), dim=1).reshape(-1, 1)
    return out


# ------------------------------------------------------------------------------------------------------------
# folders: reading and writing the LoRA family


def read_lora_weights(model, tensors, name, reports, config, source):
    """LoRA keys → (weights, site kinds in order, layers with weights)."""
    layers = LayerPaths(model)
    by_module: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    shared = shared_keys(tensors, name) if config.is_vera else {}
    for key, value in tensors.items():
        split = split_key(key, "loras", name)
        located = layers.locate(split[0]) if split else None
        param = from_adapterhub_param(split[1], value) if located is not None else None
        if param is not None:
            by_module.setdefault(located, {})[param[0]] = param[1]
        elif not (shared and key.rpartition(".")[0].endswith(f"{SHARED}.{name}")):
            unmapped.append(key)
    if config.is_vera and set(shared) != {"lora_A", "lora_B"}:
        raise CheckpointError(
            f"{source}: a VeRA adapter, but the checkpoint lacks its shared projections "
            f"'shared_parameters.{name}.lora_A/lora_B' (AdapterHub 1.3.0 saves them only from a model with a base-"
            "model prefix, e.g. BertForSequenceClassification, not from a bare BertModel); it cannot be reproduced"
        )
    roles = [m for m in "qkv" if f"attn.{m}" in config.sites]
    weights: dict[tuple[int, str, str], torch.Tensor] = {}
    kinds: dict[str, None] = {}
    for (index, path), params in sorted(by_module.items()):
        report = reports[index]
        at = [s for s in report.modules if s.module == path]
        sliced = sorted((s for s in at if s.out_ranges is not None), key=lambda s: s.out_ranges)
        whole = [s.kind for s in at if s.out_ranges is None and s.kind != "attn.qkv"]
        if any(s.interleaved for s in sliced):
            raise CheckpointError(
                f"AdapterHub LoRA weights of the fused projection {path!r} cannot be placed: in this model its "
                "q/k/v features are interleaved per head, and AdapterHub's merged format stacks contiguous parts"
            )
        gates = {"gate.weight", "gate.bias"}  # gated LoRA (UniPELT): one gate row per enabled part
        if sliced and (config.use_dora or config.is_vera or set(params) - {"lora_A", "lora_B"} - gates):
            raise CheckpointError(
                f"{source}: AdapterHub's fused-projection LoRA (LoRAMergedLinear, at {layers.paths[index]}.{path}) "
                "has no DoRA / VeRA / MTL-LoRA forward (it ignores use_dora and fails for VeRA); such a checkpoint "
                "has no defined meaning to reproduce"
            )
        if sliced:  # AdapterHub's LoRAMergedLinear: the enabled parts stacked in q, k, v order
            for j, site in enumerate(s for s in sliced if s.kind.rsplit(".", 1)[1] in roles):
                width = site.out_slice[1] - site.out_slice[0]
                rows = {
                    "lora_A": slice(j * config.r, (j + 1) * config.r),
                    "lora_B": slice(j * width, (j + 1) * width),
                    "gate.weight": slice(j, j + 1),
                    "gate.bias": slice(j, j + 1),
                }
                for p, value in params.items():
                    weights[(index, site.kind, p)] = value[rows[p]]
                kinds[site.kind] = None
            continue
        kind = whole[0] if whole else (f"linear:{path}" if path in report.linears else None)
        if kind is None:
            unmapped += [f"{layers.paths[index]}.{path}.loras.{name}.{p}" for p in params]
            continue
        kinds[kind] = None
        weights.update({(index, kind, p): value for p, value in params.items()})
    if unmapped:
        raise unmapped_keys(model, source, unmapped)
    if shared and weights:  # owned by the first adapted projection (LoRAMethod.build_all)
        first = min((i, k) for i, k, _ in weights)
        for p, value in shared.items():
            weights[(*first, f"shared.{p}")] = value
    return weights, ordered(kinds), {i for i, _ in by_module}


def lora_config_dict(config: Any, model_type: str | None, kinds: set[str]) -> dict[str, Any]:
    """The ``config`` of an AdapterHub LoRA-family adapter folder for ``config`` adapting site ``kinds``."""
    if (config.use_dora or config.is_vera) and config.variant != "adapterhub":
        which = "DoRA" if config.use_dora else "VeRA"
        raise CheckpointError(
            f"{which} with variant={config.variant!r} computes PEFT's formula, which AdapterHub's {which} does not; "
            "write it with format='peft', or use variant='adapterhub'"
        )
    if getattr(config, "feedforward_modules", ()):
        raise CheckpointError(
            f"(IA)^3 on the input of feed-forward modules {list(config.feedforward_modules)} (PEFT's "
            "feedforward_modules) has no AdapterHub form (its (IA)^3 scales outputs); write it with format='peft'"
        )
    ffn = FFN_LORA.get(model_type or "", FFN_LORA_DEFAULT)
    allowed = {f"{p}.{m}" for p in ("attn", "cross") for m in "qkv"} | set(ffn)
    if kinds - allowed:
        raise CheckpointError(
            f"AdapterHub's LoRA cannot adapt {sorted(kinds - allowed)} in {model_type!r} models; it adapts "
            f"{sorted(allowed)} (attn_matrices, intermediate_lora, output_lora)"
        )
    locations = {ffn[k] for k in kinds if k in ffn}
    return {
        "architecture": "lora",
        "selfattn_lora": bool(kinds - set(ffn)),
        "intermediate_lora": "intermediate" in locations,
        "output_lora": "output" in locations,
        "attn_matrices": [m for m in "qkv" if f"attn.{m}" in kinds or f"cross.{m}" in kinds],
        "r": config.r,
        "alpha": config.alpha * math.sqrt(config.r)
        if config.use_rslora
        else config.alpha,  # theirs: alpha / r
        "dropout": config.dropout,
        "composition_mode": config.composition_mode,
        "init_weights": config.init_weights
        if config.init_weights in ("lora", "bert", "ia3", "vera")
        else "lora",
        "init_weights_seed": None,
        "leave_out": list(config.leave_out),
        "use_gating": config.use_gating,
        "use_dora": config.use_dora,
        "vera_d": config.vera_d,
        "vera_b": config.vera_b,
        "dtype": None,
    }


def lora_tensors(model, record, params, name, layers, config, roles) -> dict[str, torch.Tensor]:
    """LoRA-family weights under AdapterHub's keys (``adapterhub_lora.py``), fused projections stacked.
    AdapterHub's ``selfattn_lora`` adapts self- and cross-attention alike: sites it adds that fxadapt's adapter
    lacks get no-op weights (``noop_tensors``)."""
    from ..methods.lora import projection_features

    by_module: dict[tuple[int, str], list] = {}
    for (index, _), site in record.sites.items():
        by_module.setdefault((index, site.module), []).append((site, True))
    for index, report in enumerate(site_reports(model)):
        for site in report.modules:
            kind, role = site.kind, site.kind.rsplit(".", 1)[1]
            wanted = kind.startswith(("attn.", "cross.")) and role in roles and index not in config.leave_out
            if wanted and (index, kind) not in record.sites:
                by_module.setdefault((index, site.module), []).append((site, False))
    out = {}
    for (index, path), sites in by_module.items():
        parts: dict[str, list[torch.Tensor]] = {}
        if any(site.interleaved for site, _ in sites):
            raise CheckpointError(
                f"AdapterHub format: the fused projection {path!r} holds q/k/v interleaved per head; AdapterHub's "
                "merged LoRA format stores contiguous parts only"
            )
        for site, present in sorted(sites, key=lambda s: s[0].out_ranges or ((0, 0),)):
            if site.out_ranges is not None and (
                config.use_dora or config.is_vera or config.method == "mtl_lora"
            ):
                raise CheckpointError(
                    f"AdapterHub's fused-projection LoRA (LoRAMergedLinear, {path!r}) has no DoRA, VeRA or MTL-LoRA "
                    "forward; "
                    f"adapter {name!r} at the slice site {site.kind!r} cannot be written for it"
                )
            if present:
                for (i, kind, p), value in params.items():
                    mapped = to_adapterhub_param(p, value) if (i, kind) == (index, site.kind) else None
                    if mapped is not None:
                        parts.setdefault(mapped[0], []).append(mapped[1])
                continue
            proj = model.get_submodule(f"{layers.paths[index]}.{path}")
            in_f, out_f, transposed = projection_features(proj)
            start, stop = site.out_slice if site.out_slice else (0, out_f)
            w = (proj.weight.t() if transposed else proj.weight)[start:stop] if config.use_dora else None
            for p, value in noop_tensors(config, stop - start, in_f, w).items():
                parts.setdefault(p, []).append(value)
        base = f"{layers.saved_path(index, path)}.loras.{name}"
        out.update({f"{base}.{p}": torch.cat(ts, 0) for p, ts in parts.items()})
    if config.is_vera:
        first = min(record.sites)
        shared = f"{layers.prefix}.{SHARED}" if layers.prefix else SHARED
        if not layers.prefix:
            logger.warning(
                "VeRA adapter %r of %s (no base-model prefix): AdapterHub 1.3.0 loads its shared projections "
                "only under a prefix ('.shared_parameters.'); load it into a model with a head there",
                name,
                type(model).__name__,
            )
        for p in ("lora_A", "lora_B"):
            out[f"{shared}.{name}.{p}"] = params[(*first, f"shared.{p}")]
    return out

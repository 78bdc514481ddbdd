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

from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["SHARED", "from_adapterhub_param", "noop_tensors", "shared_keys", "to_adapterhub_param"]

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
        out["m.weight"] = torch.linalg.norm(weight_rows.detach().float(), dim=1).reshape(-1, 1)
    return out

"""AdapterHub ReFT checkpoints (``"architecture": "reft"``: LoReFT, NoReFT, DiReFT) ↔ fxadapt's ReFT.

Keys ``<layer>.reft_layer.refts.<name>.units.<i>.<param>`` (``adapters/methods/reft.py``): fxadapt's per-layer
:class:`~fxadapt.methods.reft.ReftModule` has the same ``units.<i>...`` names, the orthogonal parametrization's
``projection.parametrizations.weight.original`` and ``.0.base`` included (both are saved: the weight is computed
from both).

``subtract_projection`` is a class attribute of AdapterHub's ``ReftConfig``, not a field: ``adapters`` 1.3.0 saves
none and reloads every ReFT adapter with ``True``, so its own DiReFT checkpoints come back as NoReFT there. fxadapt
reads a missing one the same way (equal to what ``adapters`` loads). Writing a DiReFT is refused: ``adapters``
rebuilds the config from its fields when it adds the adapter and would run it as NoReFT.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from . import LayerPaths, listed

__all__ = ["HOME", "reft_config", "reft_tensors", "reft_weights"]

HOME = "reft_layer"  # AdapterHub's ReftLayer, an attribute of each layer


def reft_config(data: dict[str, Any], source: str) -> Any:
    from ..methods.reft import ReftConfig

    try:
        return ReftConfig.from_adapterhub(data)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc


def reft_weights(model: Any, tensors: dict[str, torch.Tensor], name: str, source: str) -> dict:
    """``{(layer, "reft", param): tensor}`` and the layers that have weights."""
    from ..methods.reft import PART

    layers = LayerPaths(model)
    weights, unmapped = {}, []
    marker = f".{HOME}.refts.{name}."
    for key, value in tensors.items():
        at = ("." + key).find(marker)
        located = layers.locate(("." + key)[1:at] + "." + HOME) if at >= 0 else None
        if located is None or located[1] != HOME:
            unmapped.append(key)
            continue
        weights[(located[0], PART, ("." + key)[at + len(marker) :])] = value
    if unmapped:
        raise CheckpointError(
            f"{source}: keys that map to no layer of {type(model).__name__}: {listed(sorted(unmapped))}"
        )
    if not weights:
        raise CheckpointError(f"{source}: holds no ReFT weights for adapter {name!r}")
    return weights


def reft_tensors(model: Any, record: Any, params: dict, name: str) -> dict[str, torch.Tensor]:
    layers = LayerPaths(model)
    return {
        f"{layers.saved_path(index, HOME)}.refts.{name}.{pname}": p for (index, _, pname), p in params.items()
    }

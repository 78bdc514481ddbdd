"""AdapterHub's AdapterFusion folders (``save_adapter_fusion``/``load_adapter_fusion``): the fusion layers of a
``Fuse`` block, read and written in AdapterHub's key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, FxAdaptError
from . import LayerPaths, check_model, describe, listed, read_json, read_tensors, site_reports
from .adapterhub import FUSION_FILES, _home, _meta, _residual_weights, _write

__all__ = ["load_adapter_fusion", "save_adapter_fusion"]

# ------------------------------------------------------------------------------------------------------------
# AdapterFusion


def _fusion_parameters(model: nn.Module, fuse: Any) -> dict[tuple[int, str, str], nn.Parameter]:
    from ..api import fusion_parameters
    from ..model import get_state
    from ..rewrite import site_key

    params = fusion_parameters(model, fuse)  # raises for an unknown fusion
    state = get_state(model)
    out = {}
    for index, kinds in state.fusions[fuse.name].placements.items():
        for kind in kinds:
            prefix = f"{state.layer_paths[index]}.fxadapt.{fuse.name}.{site_key(kind)}."
            out.update(
                {(index, kind, k[len(prefix) :]): p for k, p in params.items() if k.startswith(prefix)}
            )
    return out


def load_adapter_fusion(
    model: nn.Module,
    path_or_id: Any,
    *,
    activate: bool = False,
    example_inputs: Any = None,
    revision: str | None = None,
    cache_dir: Any = None,
) -> Any:
    """Add the AdapterFusion layers that AdapterHub's ``save_adapter_fusion`` wrote (a folder or a hub id).

    The fused adapters must already be in the model (load them first). Returns the :class:`~fxadapt.Fuse` block;
    ``activate=True`` makes it the active setup. A checkpoint that does not fit leaves the model unchanged.
    """
    from ..api import activate as activate_setup
    from ..api import active_setup, add_fusion, remove_fusion
    from ..compose import Fuse
    from ..model import get_state
    from .hub import resolve

    folder = resolve(path_or_id, model=model, revision=revision, cache_dir=cache_dir)
    source = f"AdapterHub fusion {str(folder)!r}"
    meta = read_json(folder / FUSION_FILES[0])
    check_model(model, meta.get("model_type"), meta.get("hidden_size"), source)
    names = meta.get("adapter_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{source}: 'adapter_names' must list the fused adapters, got {names!r}")
    state = get_state(model)
    absent = [n for n in names if state is None or n not in state.adapters]
    if absent:
        raise CheckpointError(f"{source}: fuses {names}, but {absent} are not in the model; load them first")
    fuse = Fuse(*names)
    tensors = read_tensors(folder, *FUSION_FILES[1:])
    saved = str(meta.get("name") or ",".join(names))
    reports = site_reports(model, example_inputs)
    weights = _residual_weights(model, tensors, "adapter_fusion_layer", saved, reports, lambda p: p, source)
    previous = active_setup(model)
    try:
        add_fusion(model, fuse, meta.get("config") or "dynamic")
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    try:
        expected = _fusion_parameters(model, fuse)
        missing = sorted(describe(k) for k in set(expected) - set(weights))
        extra = sorted(describe(k) for k in set(weights) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"{source}: weights do not match: missing {listed(missing)}, unexpected {listed(extra)}"
            )
        for key, p in expected.items():
            if tuple(weights[key].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{source}: {describe(key)} has shape {tuple(weights[key].shape)}, not {tuple(p.shape)}"
                )
        with torch.no_grad():
            for key, p in expected.items():
                p.copy_(weights[key])
        if activate:
            activate_setup(model, fuse)
    except BaseException as exc:
        remove_fusion(model, fuse)
        activate_setup(model, previous)
        if isinstance(exc, FxAdaptError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"loading {source} failed: {exc}") from exc
    return fuse


def save_adapter_fusion(
    model: nn.Module, directory: Any, setup: Any, *, use_safetensors: bool = False
) -> Path:
    """Write the fusion layers of ``setup`` (a ``Fuse`` of adapter names) as AdapterHub's fusion folder."""
    from ..compose import Fuse
    from ..model import get_state

    fuse = setup if isinstance(setup, Fuse) else Fuse(*setup)
    params = _fusion_parameters(model, fuse)
    if not all(isinstance(c, str) for c in fuse.children):
        raise CheckpointError(f"AdapterHub saves fusions of adapter names only, not {fuse!r}")
    state = get_state(model)
    record = state.fusions[fuse.name]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = LayerPaths(model)
    tensors = {}
    for (index, kind, pname), p in params.items():
        home = _home(model_type, kind, state.adapters[record.children[0]].sites[(index, kind)].producer)
        tensors[f"{layers.saved_path(index, home)}.adapter_fusion_layer.{fuse.name}.{pname}"] = p
    meta = {**_meta(model, fuse.name, record.config.to_dict()), "adapter_names": list(fuse.children)}
    from ..atomic import atomic_folder

    with atomic_folder(directory) as out:
        _write(out, FUSION_FILES, meta, tensors, use_safetensors)
    return Path(directory)

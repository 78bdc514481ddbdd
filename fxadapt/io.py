"""Save and load adapters in fxadapt's own format: one folder per adapter, Hugging Face hub style.

``adapter_config.json``
    ``{"format": "fxadapt", "fxadapt_version", "name", "config": {...method config...},
    "base_model": {"model_type", "architecture", "hidden_size", "num_layers", "name_or_path"},
    "sites": {"<layer>": [kinds]},
    "head": {...} | null}``
``adapter_model.safetensors``
    adapter weights keyed ``layers.<index>.<site_key>.<param>`` (independent of the model wrapper, so an adapter
    trained on ``BertForSequenceClassification`` loads into ``BertModel`` and back).
``head_model.safetensors``
    prediction-head weights keyed by their name in the model (``classifier.weight``), when saved with a head.

Never pickle. Loading is atomic: a checkpoint that does not fit leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .api import activate as fxadapt_activate
from .api import active_adapters, adapter_state, head_parameters, inject, remove
from .errors import CheckpointError, ConfigError, FxAdaptError
from .methods.base import config_from_dict
from .model import CONTAINER, get_state, layers_of

__all__ = ["load_adapter", "save_adapter"]

logger = logging.getLogger("fxadapt")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HEAD_WEIGHTS_NAME = "head_model.safetensors"


def _model_info(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    paths, _ = layers_of(model)
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": len(paths),
        # where `fxadapt convert` finds the base model
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str,
    *,
    with_head: bool = False,
    format: str = "fxadapt",
    **options: Any,
) -> Path:
    """Write adapter ``name`` (and, with ``with_head=True``, the model's prediction head) to ``directory``.

    ``format="adapterhub"`` or ``"peft"`` writes a folder the peer library loads (see ``docs/formats.md``);
    ``options`` go to that writer (``use_safetensors`` for AdapterHub).
    """
    if format != "fxadapt":
        from .formats import save

        return save(model, directory, name, fmt=format, with_head=with_head, **options)
    if options:
        raise ConfigError(
            f"save_adapter: options {sorted(options)} apply to format='adapterhub' / 'peft' only"
        )
    state = get_state(model)
    if state is None:
        from .api import _no_adapters

        raise _no_adapters(model)
    record = state.record(name)
    params = adapter_state(model, name)  # parameters and persistent buffers
    tensors: dict[str, torch.Tensor] = {}
    for full, p in params.items():
        layer_path, rest = full.split(f".{CONTAINER}.{name}.", 1)
        index = state.layer_paths.index(layer_path)
        tensors[f"layers.{index}.{rest}"] = p.detach().contiguous().cpu()
    head_info = None
    head_tensors: dict[str, torch.Tensor] = {}
    if with_head:
        head = head_parameters(model)
        if not head:
            raise CheckpointError(
                f"with_head=True, but {type(model).__name__} has no prediction head outside its base model"
            )
        head_tensors = {k: p.detach().contiguous().cpu() for k, p in head.items()}
        config = getattr(model, "config", None)
        head_info = {
            "architecture": type(model).__name__,
            "num_labels": getattr(config, "num_labels", None),
            "id2label": {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()},
        }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "fxadapt",
        "fxadapt_version": __version__,
        "name": name,
        "config": record.config.to_dict(),
        "base_model": _model_info(model),
        "sites": {str(i): list(k) for i, k in sorted(record.placements.items())},
        "head": head_info,
    }
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    if head_tensors:
        save_file(head_tensors, str(out / HEAD_WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(
            f"no {path.name} in {str(path.parent)!r}; expected a folder written by save_adapter"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weight file {str(path)!r}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} (corrupt or truncated safetensors file?): {exc}"
        ) from exc


_META_KEYS = {"format", "fxadapt_version", "name", "config", "base_model", "sites", "head"}


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str | None = None,
    *,
    load_head: bool = True,
    activate: bool = True,
    example_inputs: Any = None,
    format: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """Inject and load an adapter in one step; returns its name.

    ``directory`` is a folder written by fxadapt, AdapterHub (``model.save_adapter``) or PEFT
    (``save_pretrained``), or a Hugging Face hub id (``"org/name"``, or a legacy AdapterHub id like
    ``"sentiment/sst-2@ukp"``) resolved through the local cache (``revision``, ``cache_dir``, ``HF_HUB_OFFLINE``).

    Args:
        name: name to give the adapter in this model (default: the saved name).
        load_head: also load saved prediction-head weights into the model's head (shapes must match).
        format: ``"fxadapt"``, ``"adapterhub"`` or ``"peft"``; detected from the folder when omitted.

    Raises:
        CheckpointError: missing/corrupt files, unknown config keys, a model of another hidden size or layer count,
            weights that do not match the adapter's shapes. The model is unchanged when it is raised.
    """
    from . import formats
    from .formats.hub import resolve

    folder = resolve(directory, model=model, revision=revision, cache_dir=cache_dir)
    fmt = format or formats.detect_format(folder)
    if fmt != "fxadapt":
        return formats.load(
            model, folder, fmt, name, load_head=load_head, activate=activate, example_inputs=example_inputs
        )
    meta = _read_json(folder / CONFIG_NAME)
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown or meta.get("format") != "fxadapt":
        raise CheckpointError(
            f"{str(folder / CONFIG_NAME)!r} is not an fxadapt adapter config (unknown keys {unknown}, "
            f"format={meta.get('format')!r}); expected keys {sorted(_META_KEYS)} with format 'fxadapt'"
        )
    try:
        config = config_from_dict(meta["config"])
    except ConfigError as exc:
        raise CheckpointError(f"invalid adapter config in {str(folder / CONFIG_NAME)!r}: {exc}") from exc
    adapter_name = name or meta.get("name")
    if not isinstance(adapter_name, str):
        raise CheckpointError(f"adapter name must be a string, got {adapter_name!r}")

    info = meta.get("base_model") or {}
    ours = _model_info(model)
    for field in ("hidden_size", "num_layers"):
        if info.get(field) is not None and ours[field] is not None and info[field] != ours[field]:
            raise CheckpointError(
                f"adapter {adapter_name!r} was saved for a model with {field}={info[field]} "
                f"({info.get('architecture')}), but {ours['architecture']} has {field}={ours[field]}"
            )
    tensors = _read_weights(folder / WEIGHTS_NAME)
    head_tensors = None
    if load_head and (folder / HEAD_WEIGHTS_NAME).exists():
        if head_parameters(model):
            head_tensors = _read_weights(folder / HEAD_WEIGHTS_NAME)
            _check_head(model, head_tensors)
        else:
            logger.warning(
                "%s has no prediction head; loading adapter %r without the head saved beside it",
                type(model).__name__,
                adapter_name,
            )

    previous_active = active_adapters(model)
    inject(model, {adapter_name: config}, example_inputs=example_inputs, activate=activate)

    def undo() -> None:
        remove(model, adapter_name)
        fxadapt_activate(model, previous_active)

    try:
        state = get_state(model)
        assert state is not None
        params = adapter_state(model, adapter_name)
        expected = {}
        for full, p in params.items():
            layer_path, rest = full.split(f".{CONTAINER}.{adapter_name}.", 1)
            expected[f"layers.{state.layer_paths.index(layer_path)}.{rest}"] = p
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"weights in {str(folder / WEIGHTS_NAME)!r} do not match adapter {adapter_name!r} in this model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for key, p in expected.items():
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"weight {key!r} has shape {tuple(tensors[key].shape)} in the checkpoint, "
                    f"but {tuple(p.shape)} in this model"
                )
        with torch.no_grad():
            for key, p in expected.items():
                p.copy_(tensors[key])
            if head_tensors:
                head = head_parameters(model)
                for key, value in head_tensors.items():
                    head[key].copy_(value)
    except FxAdaptError:
        undo()
        raise
    except Exception as exc:
        undo()
        raise CheckpointError(f"loading adapter {adapter_name!r} failed: {exc}") from exc
    return adapter_name


def _check_head(model: nn.Module, head_tensors: dict[str, torch.Tensor]) -> None:
    head = head_parameters(model)
    missing = sorted(set(head_tensors) - set(head))
    if missing:
        raise CheckpointError(
            f"the saved head has weights {missing} that {type(model).__name__} lacks (its head: {sorted(head)}); "
            "load into the same head class, or pass load_head=False"
        )
    for key, value in head_tensors.items():
        if tuple(value.shape) != tuple(head[key].shape):
            raise CheckpointError(
                f"head weight {key!r} has shape {tuple(value.shape)} in the checkpoint but {tuple(head[key].shape)} "
                f"in {type(model).__name__} (different num_labels?)"
            )

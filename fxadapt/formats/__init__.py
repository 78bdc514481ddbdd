"""Checkpoint formats: fxadapt's own (``io.py``), AdapterHub ``adapters`` and PEFT folders, and hub ids.

``fxadapt.load_adapter(model, path_or_id)`` runs **resolve → detect → translate → commit**:

- *resolve* (``hub.py``): a local folder, or a Hugging Face hub id fetched with ``snapshot_download`` (cache,
  ``HF_HUB_OFFLINE``, ``revision``), or a legacy AdapterHub id mapped the way ``adapters`` maps it.
- *detect* (:func:`detect_format`): from the folder's files and ``adapter_config.json``.
- *translate* (``adapterhub.py``, ``peft.py``): the peer's config becomes an fxadapt config, and every saved tensor
  a :class:`Translated` weight keyed by ``(layer index, site kind, parameter)``. Saved module paths are located
  among the model's layers generically (:class:`LayerPaths`): a path names a layer (up to the base-model prefix
  and transformers' own checkpoint renamings), the rest of it names a site found in that layer's graph.
  Unsupported features and keys that map to no site raise :class:`~fxadapt.CheckpointError` here, before the
  model is touched.
- *commit* (:func:`commit`): inject, check the weights against the built adapter, copy; any failure removes the
  adapter again, so a checkpoint that does not fit leaves the model exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import CheckpointError, ConfigError, FxAdaptError, SiteNotFoundError

__all__ = [
    "FORMATS",
    "LayerPaths",
    "Translated",
    "commit",
    "detect_format",
    "load",
    "read_json",
    "read_tensors",
    "save",
    "site_reports",
    "split_key",
    "unmapped_keys",
]

logger = logging.getLogger("fxadapt")

FORMATS = ("fxadapt", "adapterhub", "peft")
CONFIG_NAME = "adapter_config.json"


# ------------------------------------------------------------------------------------------------------------
# files


def read_json(path: Path, missing: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; :class:`CheckpointError` (naming the file) when it is missing, not JSON, nested
    too deeply to read, or not an object. ``missing`` adds a hint to the missing-file message."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {str(path.parent)!r}{missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise CheckpointError(
            f"{str(path)!r} is nested too deeply to read (over {sys.getrecursionlimit()} levels); an adapter "
            "config is a few levels deep: the file is corrupt or not an adapter config"
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def read_tensors(folder: Path, safetensors_name: str, pickle_name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``safetensors_name`` or, failing that, of the pickle ``pickle_name``.

    Pickles are read with ``torch.load(weights_only=True)``: tensors, containers and primitive values only. A pickle
    that needs anything else (a custom class, a function) could run arbitrary code and is refused.
    """
    safe, pickled = folder / safetensors_name, folder / pickle_name
    if safe.is_file() and pickled.is_file():
        logger.warning(
            "%s holds two weight files for the same thing, %s and %s: loading %s (safetensors is preferred, as in "
            "the peer libraries); delete the other one to silence this",
            folder,
            safetensors_name,
            pickle_name,
            safetensors_name,
        )
    if safe.is_file():
        try:
            return load_file(str(safe))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read {str(safe)!r} (corrupt or truncated safetensors file?): {exc}"
            ) from exc
    if not pickled.is_file():
        raise CheckpointError(
            f"missing weight file in {str(folder)!r}: expected {safetensors_name} or {pickle_name}"
        )
    try:
        data = torch.load(str(pickled), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(pickled)!r}: the pickle needs more than tensors and plain containers "
            f"(torch.load(weights_only=True) rejected it; it could run arbitrary code): {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(pickled)!r} (corrupt or truncated?): {exc}") from exc
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise CheckpointError(
            f"{str(pickled)!r} must hold a dict of name -> tensor, got {type(data).__name__}"
        )
    return dict(data)


def detect_format(folder: Path) -> str:
    """``"fxadapt"``, ``"adapterhub"``, ``"adapterhub-fusion"`` or ``"peft"`` for a checkpoint folder."""
    config = folder / CONFIG_NAME
    if not config.is_file():
        if (folder / "adapter_fusion_config.json").is_file():
            return "adapterhub-fusion"
        raise CheckpointError(
            f"no {CONFIG_NAME} in {str(folder)!r}; expected a folder written by fxadapt.save_adapter, AdapterHub's "
            "model.save_adapter or PEFT's save_pretrained"
        )
    meta = read_json(config)
    if meta.get("format") == "fxadapt":
        return "fxadapt"
    if "peft_type" in meta:
        return "peft"
    if "config" in meta and ("model_type" in meta or "version" in meta or "hidden_size" in meta):
        return "adapterhub"
    raise CheckpointError(
        f"cannot tell the format of {str(config)!r} (keys {sorted(meta)[:8]}): expected fxadapt's "
        "('format': 'fxadapt'), PEFT's ('peft_type') or AdapterHub's ('config', 'model_type', 'version')"
    )


# ------------------------------------------------------------------------------------------------------------
# where saved module paths lie in this model


def _renamers(model: nn.Module) -> tuple[Callable[[str], str], Callable[[str], str]]:
    """(old → current, current → old) module-path renamings of transformers' checkpoint conversion mapping.

    transformers 5 renamed some modules (ViT: ``encoder.layer.N.attention.attention.query`` →
    ``layers.N.attention.q_proj``) and renames old checkpoints on load; checkpoints written by the peers under
    transformers 4 use the old paths. Identity where the mapping does not exist (transformers 4.57).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [
            t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)
        ]
        reverse = [t.reverse_transform() for t in renamings]
    except Exception:  # transformers 4, or a model the mapping does not know
        return (lambda p: p), (lambda p: p)
    if not renamings:
        return (lambda p: p), (lambda p: p)

    def forward(path: str) -> str:
        return rename_source_key(path + ".weight", renamings, [])[0][: -len(".weight")]

    def backward(path: str) -> str:
        return rename_source_key(path + ".weight", reverse, [], reverse=True)[0][: -len(".weight")]

    return forward, backward


def base_model_chain(model: nn.Module) -> tuple[str, list[str]]:
    """``(path of the innermost base model inside ``model``, the ``base_model_prefix`` of every model on the way)``.

    HF models with a head keep their base model under ``base_model_prefix`` (``BertForSequenceClassification.bert``);
    wrappers (``fxadapt.compat.AdapterModel.model``, AdapterHub's ``BertAdapterModel.bert``) add one more level. The
    innermost base model is where ``.base_model`` stops changing; checkpoints name paths relative to it, optionally
    behind any of the prefixes on the way (``bert.encoder.layer.0`` and ``encoder.layer.0`` are the same module).
    """
    prefixes: list[str] = []
    current, path = model, ""
    names = {id(m): n for n, m in model.named_modules()}
    for _ in range(8):  # a chain of wrappers, never a cycle
        prefix = getattr(current, "base_model_prefix", "") or ""
        if prefix and prefix not in prefixes:
            prefixes.append(prefix)
        inner = getattr(current, "base_model", current)
        if not isinstance(inner, nn.Module) or inner is current or id(inner) not in names:
            break
        current, path = inner, names[id(inner)]
    prefix = getattr(current, "base_model_prefix", "") or ""
    if prefix and prefix not in prefixes:
        prefixes.append(prefix)
    return path, prefixes


class LayerPaths:
    """Locates a module path of a saved model among this model's layers.

    A saved path ``[<prefix>.]<layer path>.<rest>`` names layer ``i`` when ``<layer path>`` is this model's i-th
    layer path relative to its innermost base model (:func:`base_model_chain`), and ``<prefix>`` is any base-model
    prefix on the way (``bert.``, ``model.``, ``transformer.``): a checkpoint saved from
    ``BertForSequenceClassification`` or AdapterHub's ``BertAdapterModel`` loads into ``BertModel`` or
    ``fxadapt.compat.AdapterModel`` and back, as in both peers. Written paths carry the innermost base model's
    prefix when the model has a head or a wrapper (``bert.encoder.layer.0``), none for a bare base model.
    """

    def __init__(self, model: nn.Module):
        from ..model import layers_of

        self.model = model
        self.paths, _ = layers_of(model)
        base, prefixes = base_model_chain(model)
        self.base = base
        self.prefixes = prefixes
        inner_prefix = prefixes[-1] if prefixes else ""
        self.prefix = inner_prefix if base else ""  # what written paths start with
        self.index = {self._relative(p): i for i, p in enumerate(self.paths)}
        self.to_current, self.to_saved = _renamers(model)

    def _relative(self, path: str) -> str:
        """``path`` (a path in this model) relative to the innermost base model."""
        return path[len(self.base) + 1 :] if self.base and path.startswith(self.base + ".") else path

    def _strip(self, path: str) -> str:
        """A saved path without its leading base-model prefix (at most one)."""
        for prefix in self.prefixes:
            if path.startswith(prefix + "."):
                return path[len(prefix) + 1 :]
        return path

    def locate(self, module_path: str) -> tuple[int, str] | None:
        """``(layer index, path inside the layer)``, or None when the path lies in no layer."""
        for candidate in dict.fromkeys((module_path, self.to_current(module_path))):
            parts = self._strip(candidate).split(".")
            for k in range(len(parts), 0, -1):
                index = self.index.get(".".join(parts[:k]))
                if index is not None:
                    return index, ".".join(parts[k:])
        return None

    def model_path(self, module_path: str) -> str | None:
        """The path in this model of a saved module path that lies outside the layers (``bert.pooler.dense`` →
        ``model.pooler.dense`` in an AdapterModel), or None when no such module exists."""
        for candidate in dict.fromkeys((module_path, self.to_current(module_path))):
            stripped = self._strip(candidate)
            for path in dict.fromkeys((f"{self.base}.{stripped}" if self.base else stripped, candidate)):
                if path and self._exists(path):
                    return path
        return None

    def _exists(self, path: str) -> bool:
        try:
            self.model.get_submodule(path)
        except (AttributeError, LookupError):
            return False
        return True

    def saved_path(self, index: int, inner: str) -> str:
        """The module path a peer under transformers 4 would save for ``inner`` in layer ``index``."""
        return self.saved(f"{self.paths[index]}.{inner}" if inner else self.paths[index])

    def saved(self, path: str) -> str:
        """The saved form of a module path of this model (relative to the base model, behind its prefix)."""
        relative = self._relative(self.to_saved(path))
        return f"{self.prefix}.{relative}" if self.prefix else relative


def site_reports(model: nn.Module, example_inputs: Any = None) -> list[Any]:
    """Per layer, the :class:`~fxadapt.sites.SiteReport` found in its graph (one priming forward; no change)."""
    from ..model import layers_of, prime

    _, layers = layers_of(model)
    return [traced.report for _, traced in prime(model, layers, example_inputs)]


def check_model(model: nn.Module, model_type: Any, hidden_size: Any, source: str) -> None:
    """A checkpoint's recorded model type and hidden size must be this model's."""
    config = getattr(model, "config", None)
    ours_type = getattr(config, "model_type", None)
    ours_hidden = getattr(config, "hidden_size", None)
    name = type(model).__name__
    if model_type and ours_type and model_type != ours_type:
        raise CheckpointError(
            f"{source} was saved for a {model_type!r} model, but {name} is a {ours_type!r} model; load it into "
            f"a {model_type} model"
        )
    if hidden_size and ours_hidden and hidden_size != ours_hidden:
        raise CheckpointError(
            f"{source} was saved for a model with hidden_size={hidden_size}, but {name} has hidden_size={ours_hidden}"
        )


# ------------------------------------------------------------------------------------------------------------
# commit


WeightKey = tuple[int, str, str]  # (layer index, site kind, parameter name in fxadapt's module)


@dataclass
class Translated:
    """A peer checkpoint in fxadapt's terms: the config to inject and the weights for every site."""

    name: str
    config: Any
    weights: dict[WeightKey, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # model parameter name -> tensor
    source: str = ""


def split_key(key: str, marker: str, name: str) -> tuple[str, str] | None:
    """``(module path, parameter)`` of ``<module path>.<marker>.<name>.<parameter>``."""
    dotted = "." + key
    at = dotted.find(f".{marker}.{name}.")
    return None if at < 0 else (dotted[1:at], dotted[at + len(marker) + len(name) + 3 :])


def unmapped_keys(model: nn.Module, source: str, keys: list[str]) -> CheckpointError:
    """The error for checkpoint keys that name no site of ``model``."""
    return CheckpointError(
        f"{source}: keys that map to no site of {type(model).__name__}: {listed(sorted(keys))}"
    )


def ordered(kinds: Any) -> tuple[str, ...]:
    """Site kinds in the site table's order (``attn.q`` before ``ffn.up``), ``linear:`` paths last."""
    from ..sites import SITE_KINDS

    table = list(SITE_KINDS)
    return tuple(sorted(set(kinds), key=lambda k: (table.index(k) if k in table else len(table), k)))


def describe(key: WeightKey) -> str:
    return f"layer {key[0]} {key[1]} {key[2]}"


def listed(items: list[str], limit: int = 8) -> str:
    return f"{items[:limit]}{f' (+{len(items) - limit} more)' if len(items) > limit else ''}"


def check_head(model: nn.Module, head: Mapping[str, torch.Tensor], source: str) -> None:
    from ..api import head_parameters

    ours = head_parameters(model)
    missing = sorted(set(head) - set(ours))
    if missing:
        raise CheckpointError(
            f"the head saved in {source} has weights {listed(missing)} that {type(model).__name__} lacks "
            f"(its head: {sorted(ours)}); load into the same head class, or pass load_head=False"
        )
    for key, value in head.items():
        if tuple(value.shape) != tuple(ours[key].shape):
            raise CheckpointError(
                f"head weight {key!r} has shape {tuple(value.shape)} in {source} but {tuple(ours[key].shape)} in "
                f"{type(model).__name__} (different num_labels?)"
            )


def module_parameters(model: nn.Module, name: str) -> dict[WeightKey, nn.Parameter]:
    """fxadapt's parameters of adapter ``name``, keyed like :attr:`Translated.weights`."""
    from ..model import CONTAINER, get_state, layers_of
    from ..rewrite import site_key

    state = get_state(model)
    assert state is not None
    _, layers = layers_of(model)
    out = {}
    placements = state.record(name).placements  # layer sites and model parts
    for index, kind in ((i, k) for i, kinds in placements.items() for k in kinds):
        module = layers[index]._modules[CONTAINER][name][site_key(kind)]
        for pname, p in module.state_dict(keep_vars=True).items():  # parameters and persistent buffers
            out[(index, kind, pname)] = p
    return out


def commit(model: nn.Module, t: Translated, *, activate: bool = True, example_inputs: Any = None) -> str:
    """Inject ``t.config`` as ``t.name`` and copy the weights (and head); on any failure undo the injection."""
    from ..api import activate as activate_setup
    from ..api import active_setup, head_parameters, inject, remove

    if t.head:
        check_head(model, t.head, t.source)
    previous = active_setup(model)
    try:
        inject(model, {t.name: t.config}, example_inputs=example_inputs, activate=activate)
    except (ConfigError, SiteNotFoundError) as exc:
        raise CheckpointError(f"{t.source}: {exc}") from exc
    try:
        expected = module_parameters(model, t.name)
        missing = sorted(describe(k) for k in set(expected) - set(t.weights))
        extra = sorted(describe(k) for k in set(t.weights) - set(expected))
        if missing or extra:
            raise CheckpointError(
                f"the weights in {t.source} do not match adapter {t.name!r} as built in {type(model).__name__}: "
                f"missing {listed(missing)}, unexpected {listed(extra)}"
            )
        for key, p in expected.items():
            if tuple(t.weights[key].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"weight {describe(key)} has shape {tuple(t.weights[key].shape)} in {t.source}, but "
                    f"{tuple(p.shape)} in {type(model).__name__}"
                )
        with torch.no_grad():
            for key, p in expected.items():
                p.copy_(t.weights[key])
            head = head_parameters(model)
            for key, value in t.head.items():
                head[key].copy_(value)
    except BaseException as exc:
        remove(model, t.name)
        activate_setup(model, previous)
        if isinstance(exc, FxAdaptError) or not isinstance(exc, Exception):
            raise
        raise CheckpointError(f"loading {t.source} failed: {exc}") from exc
    return t.name


# ------------------------------------------------------------------------------------------------------------
# dispatch


def load(
    model: nn.Module,
    folder: Path,
    fmt: str,
    name: str | None = None,
    *,
    load_head: bool = True,
    activate: bool = True,
    example_inputs: Any = None,
) -> str:
    """Load a peer checkpoint folder of format ``fmt`` (``"adapterhub"`` or ``"peft"``) into ``model``."""
    if fmt == "adapterhub":
        from .adapterhub import read_adapter
    elif fmt == "peft":
        from .peft import read_adapter
    elif fmt == "adapterhub-fusion":
        raise CheckpointError(
            f"{str(folder)!r} holds AdapterFusion layers, not an adapter; load the fused adapters first, then "
            "fxadapt.load_adapter_fusion(model, folder)"
        )
    else:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {list(FORMATS)}")
    translated = read_adapter(model, folder, name, load_head=load_head, example_inputs=example_inputs)
    return commit(model, translated, activate=activate, example_inputs=example_inputs)


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str,
    *,
    fmt: str,
    with_head: bool = False,
    **options: Any,
) -> Path:
    """Write adapter ``name`` as an AdapterHub or PEFT folder."""
    if fmt == "adapterhub":
        from .adapterhub import write_adapter
    elif fmt == "peft":
        from .peft import write_adapter
    else:
        from ..errors import nearest

        raise ConfigError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}{nearest(fmt, FORMATS)}")
    from ..atomic import atomic_folder

    with atomic_folder(directory) as out:  # replaced as a unit once adapter (and head) files are written
        write_adapter(model, out, name, with_head=with_head, **options)
    return Path(directory)

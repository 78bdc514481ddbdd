"""Adapter ids: a local folder, a Hugging Face hub repo, or a legacy AdapterHub id.

:func:`resolve` follows ``adapters``' ``resolve_adapter_path`` (``adapters/utils.py``, 1.3.0):

1. an existing local folder is used as it is;
2. otherwise the id is a hub repo fetched with ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``;
   with ``HF_HUB_OFFLINE=1`` only the local cache is read);
3. if that fails, it is tried as an id of the archived AdapterHub hub (github.com/adapter-hub/Hub), whose adapters
   were moved to the repos ``AdapterHub/<file>`` on the Hugging Face hub:

   - ``"@<org>/<file>"`` → ``AdapterHub/<file>`` (``find_in_index``'s direct form);
   - ``"<task>[/<subtask>][@<org>]"`` → the archive's index for the model (``dist/v2/index/<model name>.json``,
     ``model name`` = ``model.config.name_or_path``) lists, per task and subtask, entries by config hash; the entry
     is its ``"default"`` if it has one, else its only config's version by ``org`` (or its only version); its file
     ``adapters/<org>/<file>.json`` gives ``AdapterHub/<file>``. Without a subtask, the task's only subtask, or
     the only subtask of that name under any task. The index is read from
     ``<cache>/adapterhub-index/<model name>.json``, downloaded there once when online.

   ``revision`` names the version: AdapterHub put non-default versions on branches named after them.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError

__all__ = ["legacy_repo", "resolve"]

logger = logging.getLogger("fxadapt")

INDEX_URL = "https://raw.githubusercontent.com/Adapter-Hub/Hub/master/dist/v2/index/{}.json"
INDEX_FOLDER = "adapterhub-index"


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import snapshot_download

    from .. import __version__

    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            library_name="fxadapt",
            library_version=__version__,
        )
    )


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?")


def _index(model_name: str, cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The archived AdapterHub index for ``model_name`` (cached under ``<cache>/adapterhub-index/``)."""
    if not _HUB_NAME.fullmatch(model_name) or ".." in model_name or Path(model_name).is_absolute():
        raise CheckpointError(
            f"legacy AdapterHub ids are looked up by the base model's hub name (like 'bert-base-uncased'), but "
            f"this model's name_or_path is {model_name!r}, a local path; use the adapter's hub repo id "
            "'AdapterHub/<adapter>' or the direct form '@<org>/<adapter>' instead"
        )
    root = _cache_root(cache_dir) / INDEX_FOLDER
    path = root / f"{model_name}.json"
    if not path.is_file():
        if _offline():
            raise CheckpointError(
                f"the AdapterHub index for {model_name!r} is not cached at {str(path)!r} and HF_HUB_OFFLINE is set"
            )
        import urllib.request

        try:
            with urllib.request.urlopen(INDEX_URL.format(model_name), timeout=30) as response:
                data = response.read()
        except OSError as exc:
            raise CheckpointError(f"cannot download the AdapterHub index for {model_name!r}: {exc}") from exc
        from ..atomic import atomic_file

        with atomic_file(path) as tmp:  # concurrent loaders never read a half-written index
            tmp.write_bytes(data)
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"the AdapterHub index {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise CheckpointError(f"the AdapterHub index {str(path)!r} must hold a JSON object")
    return index


def legacy_repo(
    identifier: str, model_name: str | None = None, cache_dir: str | os.PathLike | None = None
) -> str:
    """The hub repo a legacy AdapterHub id was moved to (the rule in the module docstring)."""
    direct = re.fullmatch(r"@(\S+)/(\S+)", identifier.strip())
    if direct:
        return f"AdapterHub/{direct.group(2)}"
    if not model_name:
        raise CheckpointError(
            f"cannot resolve the AdapterHub id {identifier!r} without the model's name (config.name_or_path); "
            "use the hub repo id 'AdapterHub/<name>' instead"
        )
    head, _, org = identifier.strip().partition("@")
    task, _, subtask = head.partition("/")
    index = _index(model_name, cache_dir)
    if subtask:
        entries = [index[task][subtask]] if subtask in index.get(task, {}) else []
    else:  # adapters' _dict_extract: every subtask of the task, or a subtask of that name under any task
        entries = list(index.get(task, {}).values()) + [
            v[task] for k, v in index.items() if k != task and task in v
        ]
    if not entries:
        raise CheckpointError(f"no AdapterHub adapter {identifier!r} for model {model_name!r} in its index")
    if len(entries) > 1:
        raise CheckpointError(f"the AdapterHub id {identifier!r} matches several adapters; name the subtask")
    entry = entries[0]
    configs = {k: v for k, v in entry.items() if k != "default"}
    if "default" in entry:
        path = entry["default"]
    elif len(configs) == 1:
        versions = next(iter(configs.values())).get("versions", {})
        if org:
            path = versions.get(org)
        elif len(versions) == 1:
            path = next(iter(versions.values()))
        else:
            path = next(iter(configs.values())).get("default")
    else:
        path = None
    if not path:
        raise CheckpointError(f"no unique AdapterHub adapter for {identifier!r} and model {model_name!r}")
    return "AdapterHub/" + os.path.basename(path).split(".")[0]


def _why(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def resolve(
    path_or_id: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder holding the adapter named by ``path_or_id`` (see the module docstring)."""
    path = Path(path_or_id)
    if not path.exists():
        from ..atomic import recover

        recover(path)  # a save interrupted between its two renames leaves the previous folder as a backup
    if path.is_dir():
        return path
    identifier = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{identifier!r} is a file; expected an adapter folder or a hub id")
    tried = []
    if not identifier.startswith("@"):
        try:
            return _download(identifier, revision, cache_dir)
        except Exception as exc:  # not a repo id, not cached offline, no network, ...
            tried.append(f"hub repo {identifier!r}: {_why(exc)}")
    config = getattr(model, "config", None)
    model_name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not identifier.startswith((".", os.sep)):
        try:
            repo = legacy_repo(identifier, model_name, cache_dir)
        except CheckpointError as exc:
            tried.append(f"legacy AdapterHub id: {exc}")
        else:
            try:
                return _download(repo, revision, cache_dir)
            except Exception as exc:
                tried.append(f"legacy AdapterHub id -> hub repo {repo!r}: {_why(exc)}")
    offline = " (HF_HUB_OFFLINE is set: only the local cache is read)" if _offline() else ""
    raise CheckpointError(
        f"cannot find adapter {identifier!r}: not a local folder, and{offline}: "
        + "; ".join(tried or ["no source"])
    )

"""Atomic saves: a checkpoint folder is replaced as a unit, or not at all.

Design note
-----------
Every writer (fxadapt's format, the AdapterHub and PEFT writers, fusion folders, compat heads, ``AdapterTrainer``)
writes into a fresh hidden sibling of its target (``.<name>.fxadapt-tmp-<pid>-<token>``) inside
:func:`atomic_folder`. When the writer returns, every file and the folder are fsynced, and the new folder takes the
target's place in one step:

- Linux: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders atomically; the old one is then deleted.
- elsewhere (or on a filesystem that refuses the exchange): the target is renamed to a backup sibling
  (``.<name>.fxadapt-old-<pid>-<token>``), the new folder is renamed into place, the backup is deleted. A process
  killed between the two renames leaves the backup; :func:`recover` (run by every save and every load of a local
  folder) renames it back, so the target always holds a complete checkpoint, old or new.

A writer that fails (or a process killed while writing) leaves the target exactly as it was. The new folder holds
only what this save wrote, so a weight file of an earlier save (an old ``adapter.safetensors`` beside a newer
``pytorch_adapter.bin``) cannot be loaded by mistake. Files that are not checkpoint files (a tokenizer or a README
saved in the same folder, sub-folders) are carried over as hard links, so the swap never deletes a user's data.

Writers nest: a save inside another save to the same folder (compat's adapter + head) writes into the outer
temporary folder, and only the outer one is swapped in.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

from .errors import SavePathError

__all__ = ["CHECKPOINT_FILES", "atomic_file", "atomic_folder", "recover"]

logger = logging.getLogger("fxadapt")

#: File names that belong to a checkpoint format; they are never carried over from the folder a save replaces.
CHECKPOINT_FILES = frozenset(
    {
        # fxadapt (and its compat heads)
        "adapter_config.json",
        "adapter_model.safetensors",
        "head_model.safetensors",
        "head_config.json",
        # PEFT
        "adapter_model.bin",
        # AdapterHub: adapter, head, fusion
        "adapter.safetensors",
        "pytorch_adapter.bin",
        "model_head.safetensors",
        "pytorch_model_head.bin",
        "adapter_fusion_config.json",
        "model_adapter_fusion.safetensors",
        "pytorch_model_adapter_fusion.bin",
    }
)

_TMP, _OLD = "fxadapt-tmp", "fxadapt-old"
_ACTIVE: ContextVar[dict[str, Path] | None] = ContextVar("fxadapt_atomic_folders", default=None)
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_RENAME_EXCHANGE = 2


def _lock_for(key: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    try:
        return [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def _owner_alive(path: Path, kind: str) -> bool:
    pid = path.name.rsplit(f".{kind}-", 1)[-1].split("-", 1)[0]
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover - Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - a filesystem without fsync on folders
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def recover(target: str | os.PathLike) -> None:
    """Finish what an interrupted save left behind at ``target``: a backup whose replacement never arrived is
    renamed back; temporary and backup folders of processes that no longer run are deleted."""
    target = Path(target)
    if not target.exists():
        backups = [p for p in _siblings(target, _OLD) if not _owner_alive(p, _OLD) and p.is_dir()]
        if backups:
            newest = max(backups, key=lambda p: p.stat().st_mtime)
            try:
                os.rename(newest, target)
                logger.warning("fxadapt: restored %s from an interrupted save (%s)", target, newest.name)
            except OSError:
                pass
    if target.exists():
        for kind in (_TMP, _OLD):
            for stale in _siblings(target, kind):
                if not _owner_alive(stale, kind):
                    shutil.rmtree(stale, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``). False where unavailable."""
    if not sys.platform.startswith("linux") or os.environ.get("FXADAPT_NO_RENAME_EXCHANGE"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - old glibc / musl
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.ENOTSUP, errno.EPERM):
        return False  # the filesystem does not support the exchange: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Entries of the folder being replaced that are not checkpoint files, hard-linked into the new folder."""
    for entry in old.iterdir():
        if entry.name in CHECKPOINT_FILES or (new / entry.name).exists() or entry.is_symlink():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=_link_or_copy, symlinks=True)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _swap_in(tmp: Path, target: Path) -> None:
    for _ in range(5):  # another process may create or replace the target meanwhile: retry
        if not target.exists():
            try:
                os.rename(tmp, target)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue
        if _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous checkpoint
            return
        backup = _sibling(target, _OLD)
        try:
            os.rename(target, backup)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(backup, target)  # put the old one back before reporting
            raise
        shutil.rmtree(backup, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, f"could not replace {str(target)!r}: it kept changing")  # pragma: no cover


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise SavePathError(
            f"cannot save to {str(target)!r}: it is a file, and a checkpoint is a folder; pass a folder path "
            f"(for example {str(target.with_name(target.name + '_adapter'))!r})"
        )
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SavePathError(
                    f"cannot save to {str(target)!r}: {str(parent)!r} is a file, not a folder; pass a path inside "
                    f"a folder (for example {str(parent.with_name(parent.name + '_adapters') / target.name)!r})"
                )
            break


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write a checkpoint into; on success it replaces ``target`` as a unit.

    On an exception the temporary folder is deleted and ``target`` is left as it was. Nested calls for the same
    target (in the same thread or task) yield the outer call's folder.
    """
    target = Path(target)
    key = os.path.abspath(target)
    active = _ACTIVE.get() or {}
    if key in active:
        yield active[key]
        return
    _check_target(target)
    with _lock_for(key):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise SavePathError(f"cannot create the folder for {str(target)!r}: {exc}") from exc
        recover(target)
        tmp = _sibling(target, _TMP)
        tmp.mkdir()
        token = _ACTIVE.set({**active, key: tmp})
        try:
            yield tmp
            if target.is_dir():
                _carry_over(target, tmp)
            _fsync_tree(tmp)
            _swap_in(tmp, target)
            _fsync(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            _ACTIVE.reset(token)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write one file to; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    if path.is_dir():
        raise SavePathError(f"cannot write the file {str(path)!r}: a folder of that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, _TMP)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise

"""Typed errors. Each subclasses the builtin a caller would expect, so ``except ValueError`` keeps working.

Messages follow one shape: what failed, the offending value, what was expected, and the nearest valid choice.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterIdsError",
    "AdapterNotFoundError",
    "CaptureError",
    "CheckpointError",
    "CompositionError",
    "ConfigError",
    "ConfigFieldError",
    "FxAdaptError",
    "NameCollisionError",
    "NotMergeableError",
    "SavePathError",
    "SiteNotFoundError",
    "nearest",
]


class FxAdaptError(Exception):
    """Base class of every error fxadapt raises on purpose."""


class ConfigError(FxAdaptError, ValueError):
    """An adapter config or spec holds an invalid value."""


class ConfigFieldError(ConfigError, TypeError):
    """A config was given a keyword it does not have (``BottleneckConfig(reduction=16)``) or a positional argument."""


class SiteNotFoundError(FxAdaptError, LookupError):
    """A requested site (``attn.out``, ``ffn.out``, ...) does not exist in the model."""


class AdapterNotFoundError(FxAdaptError, KeyError):
    """An adapter name that was never injected."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class NameCollisionError(FxAdaptError, ValueError):
    """An adapter with this name already exists in the model."""


class CaptureError(FxAdaptError, RuntimeError):
    """The model (or one of its layers) could not be captured as a graph."""


class CompositionError(FxAdaptError, ValueError):
    """An invalid composition setup (unknown block, forbidden nesting)."""


class CheckpointError(FxAdaptError, ValueError):
    """A saved adapter cannot be loaded into this model (mismatch, corrupt file, bad config)."""


class AdapterIdsError(CompositionError, TypeError):
    """Per-row ``adapter_ids`` that cannot route a batch: not integers, out of range, or not one per row."""


class SavePathError(FxAdaptError, FileExistsError):
    """A checkpoint cannot be saved at this path (it is a file, or lies inside one)."""


class NotMergeableError(FxAdaptError, TypeError):
    """The adapter's method cannot be folded into the base weights."""


def nearest(value: str, choices: Iterable[str]) -> str:
    """A ``"; did you mean 'x'?"`` suffix for the closest valid choice, or ``""`` if none is close."""
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""

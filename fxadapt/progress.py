"""Progress bars for long library work (tracing many layers, compiling setups, conversions, ``prepare``).

One helper, :func:`track`, wraps an iterable in a ``tqdm`` bar that a person watching a terminal sees and nobody
else does. A bar is shown only when all of these hold:

- progress bars are on: the environment variable ``FXADAPT_PROGRESS`` is not ``0``/``false``/``off``/``no``,
  and no enclosing ``with fxadapt.progress_bars(False):`` turned them off (``progress_bars(True)`` or
  ``FXADAPT_PROGRESS=1`` turn them on even when stderr is not a terminal);
- otherwise: stderr is a terminal (so logs, CI and pipes stay clean);
- the work is still running after ``delay`` seconds (short calls never flash a bar).

``progress_bars`` is a context manager over a :class:`~contextvars.ContextVar`: it applies to the calling thread
(or asyncio task) only, so a server thread that turns bars off does not change another thread's setting.
Hugging Face hub downloads show ``huggingface_hub``'s own bars (``HF_HUB_DISABLE_PROGRESS_BARS=1`` turns those off).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["ENV_VAR", "progress_bars", "progress_enabled", "track"]

ENV_VAR = "FXADAPT_PROGRESS"
_OFF = {"0", "false", "off", "no"}
_ON = {"1", "true", "on", "yes"}
_override: ContextVar[bool | None] = ContextVar("fxadapt_progress", default=None)

T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether :func:`track` shows bars here: the context setting, else ``FXADAPT_PROGRESS``, else a TTY."""
    override = _override.get()
    if override is not None:
        return override
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """``with fxadapt.progress_bars(False): ...`` silences fxadapt's bars in this thread (``True`` forces them)."""
    if not isinstance(enabled, bool):
        from .errors import ConfigError

        raise ConfigError(f"progress_bars(enabled) takes True or False, got {enabled!r}")
    token = _override.set(enabled)
    try:
        yield
    finally:
        _override.reset(token)


def track(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    delay: float = 1.0,
) -> Iterable[T]:
    """``iterable``, with a progress bar (``desc``) when :func:`progress_enabled` and the work outlasts ``delay``
    seconds; the plain iterable otherwise (no tqdm import, no overhead)."""
    if not progress_enabled():
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        delay=delay,
        mininterval=0.0,  # items are layers or steps (tens to hundreds): show each, the last one included
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )

"""Thread-safe tracing: one capture at a time, process-wide.

``serialized()`` holds the tracing lock (re-entrant): lazy builds of generated code, per-call plans and the
mutating verbs take it, so a capture for a new guard key happens once while concurrent callers wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["serialized"]

_LOCK = threading.RLock()


@contextmanager
def serialized() -> Iterator[None]:
    """Hold fxadapt's tracing lock (re-entrant) for the enclosed block."""
    with _LOCK:
        yield

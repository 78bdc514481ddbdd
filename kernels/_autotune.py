"""A small autotuner for the persistent row kernels: time each candidate config once per key, keep the fastest.

Candidates come from ``_configs`` ordered by the bytes model's prediction (``traffic.py``), so the first one is the
choice without tuning: under the interpreter, with ``FXADAPT_AUTOTUNE=0``, during CUDA-graph capture (timing needs
a sync) and for single-candidate kernels. On CUDA the first call with a new key runs every candidate (they are
idempotent: they overwrite their outputs) and times it with CUDA events; later calls with the key use the winner.
The choice is cached per process (keyed by device, dtype and shape class), so results are bitwise reproducible
within a process; another process may pick other tiles (set ``FXADAPT_AUTOTUNE=0`` for the fixed choice).
Thread-safe: one tuning per key at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence

import torch

ENV_VAR = "FXADAPT_AUTOTUNE"

_chosen: dict[Hashable, int] = {}
_lock = threading.Lock()


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def choose(
    key: Hashable,
    candidates: Sequence[dict],
    run: Callable[[dict], None],
    device: torch.device,
    reps: int = 3,
) -> dict:
    """The config to run for ``key``: ``candidates[0]`` unless tuning applies (see the module docstring)."""
    if len(candidates) == 1 or device.type != "cuda" or not enabled():
        return candidates[0]
    full = (device.index, key)
    index = _chosen.get(full)
    if index is not None:
        return candidates[index]
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    with _lock:
        index = _chosen.get(full)
        if index is None:
            index = _tune(candidates, run, reps)
            _chosen[full] = index
    return candidates[index]


def _tune(candidates: Sequence[dict], run: Callable[[dict], None], reps: int) -> int:
    times = []
    for cfg in candidates:
        run(cfg)  # compile and warm up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run(cfg)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(range(len(times)), key=times.__getitem__)


def chosen() -> dict[Hashable, int]:
    """The tuning decisions so far (for the benchmark's report)."""
    return dict(_chosen)

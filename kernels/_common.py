"""Shared plumbing for ``fxadapt.kernels``: backend choice, lazy Triton import, activations, tiles, schedules.

Nothing here imports Triton at module import time. The Triton kernel modules (``_triton_*.py``) are imported on
the first call that wants them, so that ``import fxadapt.kernels`` works (and stays cheap) on machines without
Triton or without a GPU, and so that ``TRITON_INTERPRET`` is read when the kernels are first needed rather than when
the package happens to be imported (Triton reads it when ``@triton.jit`` runs).

Backend choice, in order:
  1. ``fxadapt.kernels.backend(name)`` / ``force_triton()`` context managers (process-global, not thread-local:
     autograd runs CUDA backward passes on its own threads, which must see the same choice);
  2. the environment variable ``FXADAPT_KERNELS`` = ``auto`` (default) | ``triton`` | ``reference``.
``auto`` uses Triton for CUDA tensors when Triton imports, the PyTorch reference otherwise. ``triton`` also runs
the kernels on CPU tensors under ``TRITON_INTERPRET=1`` (for tests) and raises instead of silently falling back.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FXADAPT_KERNELS"

#: The kernels keep a whole [BLOCK_M, rank] tile in registers; above this rank they would spill, so the ops use
#: the reference instead (and ``can_use_triton`` says so).
MAX_RANK = 256

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_forced: str | None = None


def backend_mode() -> str:
    """The backend currently requested: ``"auto"``, ``"triton"`` or ``"reference"``."""
    if _forced is not None:
        return _forced
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if raw not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={raw!r} is not a known backend; expected one of {', '.join(BACKENDS)}")
    return raw


@contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the enclosed code with kernel backend ``name`` (``auto`` | ``triton`` | ``reference``).

    Overrides ``FXADAPT_KERNELS`` and restores the previous choice on exit. Process-global (see module docstring).
    """
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous = _forced
    _forced = name
    try:
        yield
    finally:
        _forced = previous


def force_triton() -> AbstractContextManager[None]:
    """Force the Triton kernels, also on CPU tensors when ``TRITON_INTERPRET=1`` (the CPU test path)."""
    return backend("triton")


@functools.cache
def triton_status() -> tuple[bool, str]:
    """Whether ``import triton`` works here (cached: the answer cannot change within a process)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, "triton importable"


_loaded: dict[str, ModuleType] = {}


def kernel_module(name: str) -> ModuleType:
    """Import ``fxadapt.kernels._triton_<name>`` on first use (this is where Triton itself gets imported)."""
    module = _loaded.get(name)
    if module is None:
        module = importlib.import_module(f"{__package__}._triton_{name}")
        if interpreting() != importlib.import_module(f"{__package__}._triton_common").INTERPRETED:
            # Our kernels were jitted in one mode and Triton's library in the other: every launch would fail.
            raise RuntimeError(
                "fxadapt.kernels: TRITON_INTERPRET changed between `import triton` and the first kernel use; "
                "set it (or not) before anything imports triton"
            )
        _loaded[name] = module
    return module


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter in this process.

    Triton fixes the mode when ``triton.language`` is first imported: its own jitted library functions (``tl.zeros``,
    ``tl.sum``, …) become interpreted only if ``TRITON_INTERPRET=1`` was set by then. So once it is imported, its
    functions' type is the truth (``torch.compile``/Dynamo import Triton early); before that, the variable is.
    """
    lang = sys.modules.get("triton.language")
    if lang is not None:
        return type(getattr(lang, "zeros", None)).__name__ == "InterpretedFunction"
    return _env_interpret()


def can_use_triton(
    x: torch.Tensor, *operands: torch.Tensor | None, rank: int | None = None
) -> tuple[bool, str]:
    """Say whether the fused Triton kernels would serve a call whose activations are ``x``.

    ``operands`` (weights, biases, residual; ``None`` entries are skipped) must share ``x``'s device and dtype;
    ``rank`` is the adapter width. Returns ``(ok, reason)``; ``reason`` is a human-readable sentence meant for the
    compiler's ``explain()``. Never raises and never imports Triton kernels.
    """
    mode = backend_mode()
    if mode == "reference":
        return False, f"backend is 'reference' ({ENV_VAR} or fxadapt.kernels.backend())"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {x.dtype} is not supported by the Triton kernels (float32, float16, bfloat16)"
    for op in operands:
        if op is None:
            continue
        if op.device != x.device:
            return False, f"operands on different devices ({x.device} and {op.device})"
        if op.dtype != x.dtype:
            return (
                False,
                f"mixed dtypes ({x.dtype} activations, {op.dtype} operand); the kernels need one dtype",
            )
    if rank is not None and rank > MAX_RANK:
        return False, f"rank {rank} exceeds the fused kernels' limit of {MAX_RANK}"
    ok, why = triton_status()
    if not ok:
        return False, why
    if x.device.type == "cuda":
        return True, "Triton kernels on CUDA"
    if x.device.type == "cpu":
        if mode == "triton" and interpreting():
            return True, "Triton kernels in the interpreter (TRITON_INTERPRET=1, forced)"
        if mode == "triton" and _env_interpret():
            return False, (
                "TRITON_INTERPRET=1 was set after triton was imported (torch.compile/Dynamo import it), so the "
                "interpreter is off in this process; set it before anything imports triton"
            )
        if mode == "triton":
            return False, "Triton forced but the tensor is on cpu and TRITON_INTERPRET=1 was not set"
        return False, (
            "tensor is on cpu: the Triton kernels need CUDA "
            f"(to run them on CPU: TRITON_INTERPRET=1 and {ENV_VAR}=triton)"
        )
    return False, f"device type {x.device.type!r} is not supported by the Triton kernels"


def use_triton(x: torch.Tensor, *operands: torch.Tensor | None, rank: int | None = None) -> bool:
    """Dispatch decision inside an op: like :func:`can_use_triton`, but a forced Triton backend that cannot run
    raises instead of quietly running the reference (a test that forces Triton must test Triton)."""
    ok, why = can_use_triton(x, *operands, rank=rank)
    if not ok and backend_mode() == "triton":
        raise RuntimeError(f"fxadapt.kernels: backend 'triton' was forced but cannot run: {why}")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Activations. Codes are the constexpr the kernels branch on; aliases follow AdapterHub / HF config names.
ACTIVATIONS: dict[str, int] = {
    "identity": 0,
    "linear": 0,
    "relu": 1,
    "gelu": 2,  # exact (erf) GELU, torch.nn.functional.gelu's default
    "gelu_tanh": 3,  # tanh approximation
    "gelu_new": 3,  # HF/AdapterHub name of the tanh approximation
    "gelu_pytorch_tanh": 3,
    "silu": 4,
    "swish": 4,
    "tanh": 5,
}
_CANONICAL = {0: "identity", 1: "relu", 2: "gelu", 3: "gelu_tanh", 4: "silu", 5: "tanh"}


def canonical_act(name: str) -> str:
    """Validate an activation name and return its canonical spelling (e.g. ``"swish"`` → ``"silu"``)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        near = difflib.get_close_matches(str(key), list(ACTIVATIONS), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}{hint}")
    return _CANONICAL[ACTIVATIONS[key]]


def act_code(name: str) -> int:
    return ACTIVATIONS[canonical_act(name)]


# ----------------------------------------------------------------------------------------------------------------
# Targets: what the tile configs depend on, and the device each launch must go to.
@dataclass(frozen=True)
class Target:
    """A GPU as the tile configs see it.

    ``capability`` is ``10·major + minor`` (90 = H100/H200, 80 = A100); ``smem`` the opt-in shared memory one
    program may use (bytes; a launch above it fails with ``OutOfResources``); ``sms`` the multiprocessor count;
    ``l2`` the L2 size in bytes (the forward's persistent schedule bounds its re-read footprint by it).
    """

    capability: int
    smem: int
    sms: int
    l2: int

    @property
    def tier(self) -> str:
        """The config table a target uses: ``"sm90"`` (≥ 227 KiB shared memory per program), ``"sm80"``
        (≥ 163 KiB) or ``"small"`` (consumer parts: ~99 KiB)."""
        if self.smem >= 232_448:
            return "sm90"
        if self.smem >= 166_912:
            return "sm80"
        return "small"


#: The targets the compile check (``compile_check.py``) builds for, with their per-program shared memory limits:
#: H100/H200 227 KiB, A100 163 KiB, sm_86/89 consumer parts 99 KiB (CUDA's opt-in maximum per block).
KNOWN_TARGETS: dict[int, Target] = {
    90: Target(90, 232_448, 132, 50 << 20),
    80: Target(80, 166_912, 108, 40 << 20),
    86: Target(86, 101_376, 84, 6 << 20),
}

#: Set by the compile check (no GPU present): the target every launcher plans for. Never set otherwise.
TARGET_OVERRIDE: Target | None = None

_device_targets: dict[int, Target] = {}


def target_of(x: torch.Tensor) -> Target | None:
    """The :class:`Target` of a CUDA tensor's device (cached per device); None for CPU (the interpreter)."""
    if TARGET_OVERRIDE is not None:
        return TARGET_OVERRIDE
    if x.device.type != "cuda":
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    tgt = _device_targets.get(index)
    if tgt is None:
        props = torch.cuda.get_device_properties(index)
        cap = 10 * props.major + props.minor
        known = KNOWN_TARGETS.get(cap, KNOWN_TARGETS[86])
        tgt = Target(
            cap,
            int(getattr(props, "shared_memory_per_block_optin", 0) or known.smem),
            int(getattr(props, "multi_processor_count", 0) or known.sms),
            int(getattr(props, "L2_cache_size", 0) or known.l2),
        )
        _device_targets[index] = tgt
    return tgt


def on_device(x: torch.Tensor) -> AbstractContextManager[None]:
    """Launch on ``x``'s GPU, not the current one (a model spread by ``device_map="auto"`` has tensors on
    ``cuda:1``…); a no-op for CPU tensors (the interpreter)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Shapes and tiles.
def pow2_tile(n: int, lo: int, hi: int) -> int:
    """Smallest power of two ≥ n, clamped to [lo, hi]. ``lo`` is ≥ 16 wherever the tile feeds ``tl.dot``."""
    p = 1 << max(int(n) - 1, 0).bit_length()
    return max(lo, min(hi, p))


def aligned16(*values: int) -> bool:
    """Whether Triton will know every one of these sizes/strides is a multiple of 16 (or a unit/zero stride):
    the condition for 16-byte vector loads (see ``_configs``)."""
    return all(v in (0, 1) or v % 16 == 0 for v in values)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def saved_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the small saved intermediates (pre-activation h, LoRA's x·Aᵀ): fp32, or fp64 for fp64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The reference fallback computes half-precision inputs in fp32, like the kernels' fp32 accumulation."""
    return torch.promote_types(x.dtype, torch.float32)


def upcast(c: torch.dtype, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The fallback's inputs in its compute dtype (None stays None)."""
    return [None if t is None else t.to(c) for t in tensors]


def on_device_of(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``t`` on ``x``'s device (a CPU scale or CPU adapter ids with CUDA activations: moved, not refused)."""
    return None if t is None or t.device == x.device else t.to(x.device)


def split_scale(scale: float | torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
    """Public ``scale`` argument → (python float factor, optional tensor factor) for the op schemas."""
    if scale is None:
        return 1.0, None
    if isinstance(scale, torch.Tensor):
        return 1.0, scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or a tensor, got {type(scale).__name__}")
    return float(scale), None


def expand_ids(adapter_ids: torch.Tensor, lead_shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Per-row or per-segment adapter ids → one id per flattened row.

    ``adapter_ids`` has the shape of a prefix of ``lead_shape`` (x's shape without the feature dim): ``[N]`` for
    flat rows, ``[B]`` for a ``[B, T, d]`` batch where each sequence uses one adapter, or ``[B, T]``.
    """
    if adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool:
        raise TypeError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    k = adapter_ids.dim()
    if tuple(adapter_ids.shape) != tuple(lead_shape[:k]):
        raise ValueError(
            f"adapter_ids shape {tuple(adapter_ids.shape)} must be a prefix of x's leading shape {tuple(lead_shape)}"
        )
    ids = adapter_ids.reshape(tuple(adapter_ids.shape) + (1,) * (len(lead_shape) - k))
    return ids.expand(tuple(lead_shape)).reshape(-1)


@dataclass(frozen=True)
class Schedule:
    """Rows grouped by adapter for the multi-adapter kernels.

    Group ``g`` holds the rows with adapter id ``g - 1`` (group 0 = id −1, the passthrough rows). ``perm`` lists
    row indices sorted by group (stable), so group ``g`` occupies ``perm[seg_start[g] : seg_start[g] + seg_count[g]]``.
    Row-parallel kernels run one program per block of ``block_m`` rows *within one group* (so each program uses a
    single adapter): block ``b`` covers ``perm[blk_lo[b] : blk_hi[b]]`` of group ``blk_grp[b]``. ``num_blocks`` is an
    upper bound fixed without reading the ids back to the host; spare blocks have ``blk_lo == blk_hi`` (no rows).
    """

    perm: torch.Tensor
    seg_start: torch.Tensor
    seg_count: torch.Tensor
    blk_grp: torch.Tensor
    blk_lo: torch.Tensor
    blk_hi: torch.Tensor
    num_blocks: int
    num_groups: int


def build_schedule(ids: torch.Tensor, num_adapters: int, block_m: int) -> Schedule:
    """Group rows by adapter id (``ids`` int, values in [−1, num_adapters)) into per-adapter row blocks.

    Entirely on the ids' device (argsort, scatter_add, cumsum, searchsorted): no host sync.
    """
    n = ids.numel()
    groups = num_adapters + 1
    key = ids.long() + 1  # group index: passthrough (−1) → 0, adapter a → a + 1
    perm = torch.argsort(key, stable=True).to(torch.int32)
    # Rows per group. scatter_add into a fixed-size tensor, not bincount: bincount reads the maximum back to the
    # host to size its output (a device sync, illegal during CUDA-graph capture).
    count = torch.zeros(groups, dtype=torch.long, device=ids.device).scatter_add_(
        0, key, torch.ones_like(key)
    )
    seg_start = torch.cumsum(count, 0) - count  # exclusive prefix sum: first sorted position of each group
    nblk = (count + block_m - 1) // block_m  # row blocks per group
    blk_end = torch.cumsum(nblk, 0)  # inclusive prefix sum: one past the last block of each group
    # Σ_g ceil(count_g / block_m) ≤ Σ_g (count_g / block_m + 1) = n / block_m + groups: a host-side bound.
    num_blocks = n // block_m + groups
    b = torch.arange(num_blocks, device=ids.device)
    # Block b belongs to the first group whose blocks end after b (== groups for the spare blocks at the end).
    grp = torch.searchsorted(blk_end, b, right=True)
    spare = grp >= groups
    g = grp.clamp(max=groups - 1)
    first_blk = blk_end[g] - nblk[g]
    lo = seg_start[g] + (b - first_blk) * block_m
    hi = seg_start[g] + count[g]
    lo = torch.where(spare, 0, lo)  # spare blocks: empty range [0, 0)
    hi = torch.where(
        spare, 0, torch.minimum(hi, lo + block_m)
    )  # a block holds at most block_m rows of its group
    i32 = torch.int32
    return Schedule(
        perm=perm,
        seg_start=seg_start.to(i32),
        seg_count=count.to(i32),
        blk_grp=g.to(i32),
        blk_lo=lo.to(i32),
        blk_hi=hi.to(i32),
        num_blocks=num_blocks,
        num_groups=groups,
    )


#: ``FXADAPT_CHECK_IDS``: how the multi-adapter ops validate CUDA adapter ids. ``async`` (default): a device-side
#: assertion, no host sync (a bad id stops the CUDA context with "adapter id out of range"); ``sync``: read the
#: range back and raise ValueError naming the bad id (one sync per call, like a debug mode); ``off``.
CHECK_IDS_VAR = "FXADAPT_CHECK_IDS"


def ids_check_mode() -> str:
    raw = os.environ.get(CHECK_IDS_VAR, "async").strip().lower() or "async"
    if raw not in ("async", "sync", "off"):
        raise ValueError(f"{CHECK_IDS_VAR}={raw!r} is not a known mode; expected one of async, sync, off")
    return raw


def validate_ids(ids: torch.Tensor, num_adapters: int) -> None:
    """Raise ValueError unless every id is in [−1, num_adapters). Reads the range back: free for CPU ids (where
    routing ids usually come from), one device sync for CUDA ids."""
    if ids.numel() == 0:
        return
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < -1 or hi >= num_adapters:
        bad = lo if lo < -1 else hi
        raise ValueError(
            f"adapter id {bad} out of range: ids must be in [-1, {num_adapters}) "
            f"(−1 = no adapter; the bank holds {num_adapters} adapters)"
        )


def check_ids(ids: torch.Tensor, num_adapters: int) -> None:
    """Reject ids outside [−1, num_adapters) — a wrong id would index another adapter's weights silently.

    CPU ids: :func:`validate_ids` (exact ValueError, no GPU involved). CUDA ids: by :func:`ids_check_mode`; the
    default is sync-free (``torch._assert_async``), so the multi-adapter ops never stall the host and can be
    captured in a CUDA graph. Validate routing ids where they are made (usually on the host) for a ValueError.
    """
    if ids.numel() == 0:
        return
    if not ids.is_cuda:
        validate_ids(ids, num_adapters)
        return
    mode = ids_check_mode()
    if mode == "off":
        return
    if mode == "sync" and not torch.cuda.is_current_stream_capturing():
        validate_ids(ids, num_adapters)
        return
    torch._assert_async(((ids >= -1) & (ids < num_adapters)).all(), "adapter id out of range")


def or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: a gradient that was not requested comes back as an empty tensor. Others
    are made contiguous, the layout the fake implementations promise (a gradient computed as a transposed
    product, or zeros_like of a transposed weight, would otherwise keep that layout)."""
    return like.new_empty((0,)) if t is None else t.contiguous()


def none_if_empty(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return t if wanted else None


def bank1(t: torch.Tensor | None) -> torch.Tensor | None:
    """A single adapter's tensor as a bank of one (a view, no copy)."""
    return None if t is None else t.unsqueeze(0)


def unbank1(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.squeeze(0)


def lead_rows(x: torch.Tensor) -> int:
    """Number of rows once x's leading dims are flattened (works with symbolic sizes)."""
    n = 1
    for s in x.shape[:-1]:
        n = n * s
    return n

"""Triton helpers shared by the kernel modules: the dot with its precision policy, and row/segment addressing.

Imported only through ``_common.kernel_module`` (it imports Triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Schedule, build_schedule

Tensor = torch.Tensor


@triton.jit
def mm(a, b, DOT_F32: tl.constexpr):
    """a @ b with fp32 accumulation; ``b`` is always a tile loaded from an input, so its dtype is the input dtype.

    DOT_F32: both operands in fp32 with IEEE precision — for fp32 inputs (PyTorch's default fp32 matmul is not
    TF32 either), and always under the interpreter, which mishandles bf16 bits (triton#11584). Otherwise the
    operands are cast to b's dtype (fp16/bf16) for the tensor cores, like an eager half-precision matmul.
    """
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def mm_split(a, b, DOT_F32: tl.constexpr):
    """a @ b where ``a`` is an fp32 intermediate (dh, act(h), dy⊙s, LoRA's t or dt) and ``b`` an input tile.

    On the half-precision path ``a`` is split into hi = half(a) and lo = half(a − hi), two tensor-core dots: ~2× the
    mantissa of one cast (fp16 22 bits, bf16 16 bits). The rounding of a single cast (2⁻¹¹ for fp16) is random per
    row and adds up in the reductions over all N rows (weight gradients), exceeding the fp16 tolerance at N ≈ 1k;
    the extra dot is cheap because these kernels are bandwidth-bound.
    """
    if DOT_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        out = tl.dot(hi, b) + tl.dot(lo, b)
    return out


@triton.jit
def block_rows(blk, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM: tl.constexpr, HAS_SCHED: tl.constexpr):
    """Rows of row-block ``blk``: (row indices [BM] int64, row mask [BM], adapter mask [BM], adapter index ≥ 0
    (int64), raw adapter id (−1: passthrough; for ``lanes_if``), non-empty).

    Without a schedule: rows blk·BM … blk·BM+BM−1, adapter 0. With one: block ``blk`` of the schedule, i.e. sorted
    positions [lo, hi) of group g, mapped back to original rows through ``perm``. Group 0 holds the passthrough
    rows (id −1): their adapter mask is all False, so adapter loads and math skip them (they still pass their
    residual through). Spare blocks of the schedule have lo == hi (``non-empty`` False): callers skip them.

    The activity is folded into a *vector* mask (``offs·0 + adapter ≥ 0``) rather than combined as a scalar:
    Triton 3.9's interpreter rejects masks built from a scalar comparison ("mask has unsupported dtype").
    """
    if HAS_SCHED:
        grp = tl.load(bgrp_ptr + blk)
        lo = tl.load(blo_ptr + blk)
        hi = tl.load(bhi_ptr + blk)
        offs = lo + tl.arange(0, BM)
        mask = offs < hi
        rows = tl.load(perm_ptr + offs, mask=mask, other=0)
        adapter = grp - 1
        nonempty = lo < hi
    else:
        offs = blk * BM + tl.arange(0, BM)
        mask = offs < N
        rows = offs
        adapter = blk * 0  # adapter 0, as a tensor like the scheduled branch's
        nonempty = blk * BM < N
    amask = mask & (offs * 0 + adapter >= 0)
    return rows.to(tl.int64), mask, amask, tl.maximum(adapter, 0).to(tl.int64), adapter, nonempty


@triton.jit
def seg_range(grp, seg_lo_ptr, seg_cnt_ptr, N, HAS_SCHED: tl.constexpr):
    """Sorted row positions [lo, hi) of group ``grp`` for the column-parallel kernels, its adapter index ≥ 0 and
    the raw adapter id (−1 for the passthrough group 0; see ``lanes_if``). Without a schedule: all N rows,
    adapter 0."""
    if HAS_SCHED:
        lo = tl.load(seg_lo_ptr + grp)
        hi = lo + tl.load(seg_cnt_ptr + grp)
        adapter = grp - 1
    else:
        lo = grp * 0
        hi = lo + N
        adapter = grp
    return lo, hi, tl.maximum(adapter, 0).to(tl.int64), adapter


@triton.jit
def lanes_if(lanes, adapter):
    """``lanes`` masked to nothing when ``adapter`` < 0 (the passthrough group), as a vector mask (see
    ``block_rows`` for why not a scalar)."""
    return lanes & (lanes.to(tl.int32) * 0 + adapter >= 0)


@triton.jit
def seg_rows(start, hi, perm_ptr, BM: tl.constexpr, HAS_SCHED: tl.constexpr):
    """Original row indices (int64) and mask for sorted positions start … start+BM−1 (< hi)."""
    offs = start + tl.arange(0, BM)
    mask = offs < hi
    if HAS_SCHED:
        rows = tl.load(perm_ptr + offs, mask=mask, other=0).to(tl.int64)
    else:
        rows = offs.to(tl.int64)
    return rows, mask


INTERPRETED = type(mm).__name__ == "InterpretedFunction"

#: Set by the compile check (``compile_check.py``): called with ``(kernel, grid, args, meta)`` for every launch
#: instead of running it, so that the launchers' own tile choices are what gets compiled. Never set otherwise.
LAUNCH_HOOK = None


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``: every launch of the package goes through here."""
    if LAUNCH_HOOK is not None:
        LAUNCH_HOOK(kernel, grid, args, meta)
        return
    kernel[grid](*args, **meta)


#: Test hook: run fp16 dots in fp16 under the interpreter too (it handles fp16, unlike bf16), so that the CPU tests
#: can exercise the GPU's half-precision dot path and its numerics. Never set outside tests.
HALF_DOT_IN_INTERPRETER = False


def dot_f32(dtype: torch.dtype) -> bool:
    """Whether ``mm`` runs in fp32 for this input dtype (see ``mm``)."""
    if dtype == torch.float32:
        return True
    if INTERPRETED:
        return not (HALF_DOT_IN_INTERPRETER and dtype == torch.float16)
    return False


def schedule(ids: Tensor | None, adapters: int, block_m: int) -> Schedule | None:
    return None if ids is None else build_schedule(ids, adapters, block_m)


def row_sched_args(sched: Schedule | None, dummy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(perm, blk_grp, blk_lo, blk_hi) for ``block_rows``; unused dummies without a schedule."""
    if sched is None:
        return dummy, dummy, dummy, dummy
    return sched.perm, sched.blk_grp, sched.blk_lo, sched.blk_hi


def seg_sched_args(sched: Schedule | None, dummy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(perm, seg_start, seg_count) for ``seg_range`` / ``seg_rows``."""
    if sched is None:
        return dummy, dummy, dummy
    return sched.perm, sched.seg_start, sched.seg_count


def num_row_blocks(sched: Schedule | None, n: int, block_m: int) -> int:
    return -(-n // block_m) if sched is None else sched.num_blocks


def num_groups(sched: Schedule | None) -> int:
    return 1 if sched is None else sched.num_groups

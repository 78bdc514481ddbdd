"""Triton kernels and launchers for LoRA ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` (single adapter and weight banks).

Imported lazily by ``lora.py`` / ``multi.py``. Banks: ``A [n_adapters, r, d_in]``, ``B [n_adapters, d_out, r]``; a
single adapter is the bank of one. Three generic kernels, each used twice:

  ``_rowproj``   row-parallel low-rank projection  out[N, r] = X·M[a]ᵀ
                   forward  t  = x·Aᵀ          backward dt = dy·B (unscaled)
  ``_gemm_lr``   tiled GEMM with a low-rank epilogue  out = X·Wm (+ bias) + s_a·T·L[a]
                   forward  y  = x·Wᵀ + b + s·t·Bᵀ    backward dx = dy·W + s·dt·A
  ``_seg_outer`` column-parallel per-adapter sums  out[a] = Σ_{rows of a} Uᵀ·V
                   backward dB = s·dyᵀt (from (tᵀdy)ᵀ),  dA = s·dtᵀx

The LoRA path never materialises an [N, d_out] tensor: t = x·Aᵀ is [N, r], and its product with Bᵀ is added to the
base GEMM's accumulator tile in registers before the single store of y. Weight gradients are per-column-block sums
(no atomics; row splits reduced by ``torch.sum``): deterministic. Frozen-base gradients dW = dyᵀx, db = Σ dy, when
requested, are plain ``torch.mm`` / ``sum`` (cuBLAS is the right tool for a full [d_out, d_in] GEMM).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs
from ._common import aligned16, cdiv, on_device, target_of
from ._triton_common import (
    block_rows,
    dot_f32,
    lanes_if,
    launch,
    mm,
    mm_split,
    num_groups,
    num_row_blocks,
    row_sched_args,
    schedule,
    seg_range,
    seg_rows,
    seg_sched_args,
)

Tensor = torch.Tensor


@triton.jit
def _rowproj(
    x_ptr, m_ptr, out_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, K, R,
    s_xm, s_xk, s_ma, s_mr, s_mk,
    HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """out[rows, :R] = X[rows, :K] @ M[a]ᵀ with M[a] read as [R, K] through strides; fp32, 0 on passthrough rows."""
    pid = tl.program_id(0)
    rows, rmask, amask, a, adapter, nonempty = block_rows(
        pid, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED
    )
    if nonempty:  # spare schedule blocks exit at once
        rr = tl.arange(0, BR)  # rank lanes, ≥ 16 for tl.dot; lanes ≥ R masked to 0
        rmask_r = rr < R
        wr = lanes_if(rmask_r, adapter)  # passthrough blocks read no adapter weights
        acc = tl.zeros([BM, BR], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            kmask = kk < K
            xt = tl.load(
                x_ptr + rows[:, None] * s_xm + kk[None, :] * s_xk,
                mask=amask[:, None] & kmask[None, :],
                other=0.0,
            )
            # [BK, BR] tile of M[a]ᵀ: element (k, r) lives at m + a·s_ma + r·s_mr + k·s_mk.
            mt = tl.load(
                m_ptr + a * s_ma + kk[:, None] * s_mk + rr[None, :] * s_mr,
                mask=kmask[:, None] & wr[None, :],
                other=0.0,
                eviction_policy="evict_last",
            )
            acc += mm(xt, mt, DOT_F32)
        acc = tl.where(amask[:, None], acc, 0.0)
        tl.store(out_ptr + rows[:, None] * R + rr[None, :], acc, mask=rmask[:, None] & rmask_r[None, :])


@triton.jit
def _gemm_lr(
    x_ptr, w_ptr, b_ptr, t_ptr, l_ptr, sc_ptr, out_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, K, NOUT, R, NUM_M, scale_f,
    s_xm, s_xk, s_wk, s_wn, s_la, s_lr, s_ln, s_sca,
    HAS_BIAS: tl.constexpr, HAS_SC: tl.constexpr, HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[rows, n] = X[rows, :K] @ Wm[:K, n] (+ bias[n]) + s_a · T[rows, :R] @ L[a][:R, n].

    Wm is read as [K, NOUT] and L[a] as [R, NOUT] through strides, so W (nn.Linear [NOUT, K] or [K, NOUT]) and
    the LoRA banks are used in place. T is fp32 [N, R] contiguous (from ``_rowproj``).
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(NOUT, BN)
    # Grouped launch order: GROUP_M consecutive row blocks sweep the column blocks together, so the Wm tiles they
    # share are still in L2 when the next row block of the group reads them.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(NUM_M - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    rows, rmask, amask, a, adapter, nonempty = block_rows(
        pid_m, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED
    )
    if not nonempty:  # a spare schedule block: nothing to do
        return
    nn = pid_n * BN + tl.arange(0, BN)
    nmask = nn < NOUT
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        xt = tl.load(
            x_ptr + rows[:, None] * s_xm + kk[None, :] * s_xk, mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        wt = tl.load(
            w_ptr + kk[:, None] * s_wk + nn[None, :] * s_wn, mask=kmask[:, None] & nmask[None, :], other=0.0
        )
        acc += mm(xt, wt, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + nn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # Low-rank epilogue: the [BM, BR] slice of T times the [BR, BN] tile of L[a], added in registers.
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    wr = lanes_if(rmask_r, adapter)
    tt = tl.load(t_ptr + rows[:, None] * R + rr[None, :], mask=amask[:, None] & rmask_r[None, :], other=0.0)
    lt = tl.load(
        l_ptr + a * s_la + rr[:, None] * s_lr + nn[None, :] * s_ln,
        mask=wr[:, None] & nmask[None, :],
        other=0.0,
        eviction_policy="evict_last",
    )
    s = tl.cast(scale_f, tl.float32)  # Inductor and the interpreter may hand floats over as fp64
    if HAS_SC:
        s = s * tl.load(sc_ptr + a * s_sca).to(tl.float32)
    lora = mm(tt, lt, DOT_F32) * s
    acc += tl.where(amask[:, None], lora, 0.0)  # passthrough rows (id −1): base output only
    tl.store(
        out_ptr + rows[:, None] * NOUT + nn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & nmask[None, :],
    )


@triton.jit
def _seg_outer(
    u_ptr, v_ptr, out_ptr,
    perm_ptr, seg_lo_ptr, seg_cnt_ptr,
    N, DV, R, A, SPLIT,
    s_vm, s_vd,
    HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    """out[split, a, :R, cols] = Σ over this split's rows of adapter a of U[rows, :R]ᵀ V[rows, cols] (fp32).

    Grid (column blocks of V, groups, SPLIT). Each program owns its output tile: no atomics.
    """
    pid_d = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    lo, hi, a, adapter = seg_range(grp, seg_lo_ptr, seg_cnt_ptr, N, HAS_SCHED)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < DV
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    for start in range(lo + split * BM, hi, SPLIT * BM):  # row blocks split, split+SPLIT, … of the group
        rows, rmask = seg_rows(start, hi, perm_ptr, BM, HAS_SCHED)
        ut = tl.load(
            u_ptr + rows[:, None] * R + rr[None, :], mask=rmask[:, None] & rmask_r[None, :], other=0.0
        )
        vt = tl.load(
            v_ptr + rows[:, None] * s_vm + dd[None, :] * s_vd, mask=rmask[:, None] & dmask[None, :], other=0.0
        )
        acc += mm_split(tl.trans(ut), vt, DOT_F32)
    # The passthrough group owns no adapter and stores nothing.
    base = split * A + a
    tl.store(
        out_ptr + base * R * DV + rr[:, None] * DV + dd[None, :],
        acc,
        mask=lanes_if(rmask_r, adapter)[:, None] & dmask[None, :],
    )


# ----------------------------------------------------------------------------------------------------------------
# Tiles and launchers.
def _rowproj_launch(x2: Tensor, m: Tensor, strides: tuple[int, int, int], r: int, sched, bm: int) -> Tensor:
    """X [N, K] @ M[a]ᵀ → fp32 [N, r]; ``strides`` = (adapter, rank, K) strides of M."""
    n, k = x2.shape
    out = torch.empty((n, r), dtype=torch.float32, device=x2.device)
    if n == 0:
        return out
    launch(_rowproj, (num_row_blocks(sched, n, bm),),
        x2, m, out, *row_sched_args(sched, out), n, k, r, x2.stride(0), x2.stride(1), *strides,
        HAS_SCHED=sched is not None, DOT_F32=dot_f32(x2.dtype),
        **_configs.proj_config(target_of(x2), k, r, bm, x2.element_size(), aligned16(k, *x2.stride())),
    )  # fmt: skip
    return out


def _gemm_launch(
    x2: Tensor,
    w: Tensor,
    w_strides: tuple[int, int],
    nout: int,
    bias: Tensor | None,
    t: Tensor,
    lbank: Tensor,
    l_strides: tuple[int, int, int],
    scale: float,
    scale_t: Tensor | None,
    sched,
    bm: int,
) -> Tensor:
    n, k = x2.shape
    r = t.shape[1]
    out = torch.empty((n, nout), dtype=x2.dtype, device=x2.device)
    if n == 0:
        return out
    aligned = aligned16(k, nout, *x2.stride(), *w_strides)
    tiles = _configs.gemm_config(target_of(x2), k, nout, r, bm, x2.element_size(), aligned)
    num_m = num_row_blocks(sched, n, bm)
    sc, s_sca = _scale_args(scale_t)
    launch(_gemm_lr, (num_m * cdiv(nout, tiles["BN"]),),
        x2, w, x2 if bias is None else bias, t, lbank, x2 if sc is None else sc, out,
        *row_sched_args(sched, t),
        n, k, nout, r, num_m, scale,
        x2.stride(0), x2.stride(1), *w_strides, *l_strides, s_sca,
        HAS_BIAS=bias is not None, HAS_SC=sc is not None, HAS_SCHED=sched is not None,
        DOT_F32=dot_f32(x2.dtype), **tiles,
    )  # fmt: skip
    return out


def _outer_launch(u: Tensor, v2: Tensor, adapters: int, sched) -> Tensor:
    """Σ_{rows of a} Uᵀ V → fp32 [A, r, dv] (zeros for adapters without rows)."""
    n, dv = v2.shape
    r = u.shape[1]
    groups = num_groups(sched)
    aligned = aligned16(dv, *v2.stride())
    tiles = _configs.outer_config(target_of(v2), n, dv, r, v2.element_size(), groups, adapters, aligned)
    split = tiles.pop("SPLIT")
    part = torch.zeros((split, adapters, r, dv), dtype=torch.float32, device=v2.device)
    if n > 0:
        launch(_seg_outer, (cdiv(dv, tiles["BD"]), groups, split),
            u, v2, part, *seg_sched_args(sched, u), n, dv, r, adapters, split, v2.stride(0), v2.stride(1),
            HAS_SCHED=sched is not None, DOT_F32=dot_f32(v2.dtype), **tiles,
        )  # fmt: skip
    return part.sum(0)  # fixed-order reduction over the row splits


def _scale_args(scale_t: Tensor | None) -> tuple[Tensor | None, int]:
    """Per-adapter scale [A] → stride 1 over adapters; a shared scalar → stride 0."""
    if scale_t is None:
        return None, 0
    return scale_t, (0 if scale_t.numel() == 1 else scale_t.stride(0))


def _scales(scale: float, scale_t: Tensor | None, adapters: int, device: torch.device) -> Tensor:
    """Effective fp32 scale per adapter [A]."""
    s = torch.full((adapters,), scale, dtype=torch.float32, device=device)
    if scale_t is not None:
        s = s * scale_t.float().reshape(-1).expand(adapters)
    return s


def forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a_bank: Tensor,
    b_bank: Tensor,
    scale: float,
    scale_t: Tensor | None,
    ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x2 [N, d_in], weight [d_out, d_in], banks A [n_ad, r, d_in], B [n_ad, d_out, r]; ``ids`` [N] or None.
    Returns y [N, d_out] (x's dtype) and t = x·A[id]ᵀ [N, r] fp32 (0 on passthrough rows). Launches on x's device;
    ``scale_t`` and ``ids`` are moved there if they live elsewhere."""
    with on_device(x2):
        return _forward(x2, weight, bias, a_bank, b_bank, scale, scale_t, ids)


def _forward(x2, weight, bias, a_bank, b_bank, scale, scale_t, ids):
    n = x2.shape[0]
    adapters, r = a_bank.shape[0], a_bank.shape[1]
    d_out = weight.shape[0]
    ids = None if ids is None else ids.to(x2.device)
    scale_t = None if scale_t is None else scale_t.to(x2.device)
    aligned = aligned16(*x2.shape[1:], *weight.shape, *x2.stride(), *weight.stride())
    bm = _configs.lora_bm(target_of(x2), n, r, 1 if ids is None else adapters + 1, x2.element_size(), aligned)
    sched = schedule(ids, adapters, bm)
    t = _rowproj_launch(x2, a_bank, (a_bank.stride(0), a_bank.stride(1), a_bank.stride(2)), r, sched, bm)
    y = _gemm_launch(
        x2, weight, (weight.stride(1), weight.stride(0)), d_out, bias,  # Wᵀ as [d_in, d_out]
        t, b_bank, (b_bank.stride(0), b_bank.stride(2), b_bank.stride(1)),  # B[a]ᵀ as [r, d_out]
        scale, scale_t, sched, bm,
    )  # fmt: skip
    return y, t


def backward(
    dy2: Tensor,
    x2: Tensor,
    weight: Tensor,
    a_bank: Tensor,
    b_bank: Tensor,
    t: Tensor,
    scale: float,
    scale_t: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_lora: bool,
    need_dscale: bool,
    ids: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dW, db, dA bank, dB bank, d scale_t), None where not requested. With s_a the effective scale and
    dt = dy·B[a]: dx = dy·W + s_a·dt·A[a], dA[a] = s_a·Σ dtᵀx, dB[a] = s_a·Σ dyᵀt, dL/ds_a = ⟨Σ dyᵀt, B[a]⟩.
    d scale_t comes back on scale_t's device."""
    with on_device(x2):
        out = _backward(dy2, x2, weight, a_bank, b_bank, t, scale, scale_t, need_dx, need_dw, need_lora,
                        need_dscale, ids)  # fmt: skip
    ds = out[5]
    if ds is not None and scale_t is not None and ds.device != scale_t.device:
        out = (*out[:5], ds.to(scale_t.device))
    return out


def _backward(
    dy2, x2, weight, a_bank, b_bank, t, scale, scale_t, need_dx, need_dw, need_lora, need_dscale, ids
):
    n, d_in = x2.shape
    adapters, r = a_bank.shape[0], a_bank.shape[1]
    ids = None if ids is None else ids.to(x2.device)
    scale_t = None if scale_t is None else scale_t.to(x2.device)
    aligned = aligned16(*x2.shape[1:], *weight.shape, *x2.stride(), *weight.stride())
    bm = _configs.lora_bm(target_of(x2), n, r, 1 if ids is None else adapters + 1, x2.element_size(), aligned)
    sched = schedule(ids, adapters, bm)
    b_as_rk = (b_bank.stride(0), b_bank.stride(2), b_bank.stride(1))  # B[a] read as [r, d_out]
    # dt = dy·B[a], unscaled, [N, r] fp32: feeds dx (dt·A) and dA (dtᵀx).
    dt = _rowproj_launch(dy2, b_bank, b_as_rk, r, sched, bm) if need_dx or need_lora else None
    dx = None
    if need_dx:
        dx = _gemm_launch(
            dy2, weight, (weight.stride(0), weight.stride(1)), d_in, None,  # W as [d_out, d_in]
            dt, a_bank, (a_bank.stride(0), a_bank.stride(1), a_bank.stride(2)),
            scale, scale_t, sched, bm,
        )  # fmt: skip
    da = db = ds = None
    if need_lora or need_dscale:
        s = _scales(scale, scale_t, adapters, x2.device)
        db_raw = _outer_launch(t, dy2, adapters, sched).transpose(1, 2)  # [A, d_out, r] = Σ dyᵀt
        if need_lora:
            da = (s[:, None, None] * _outer_launch(dt, x2, adapters, sched)).to(a_bank.dtype)
            db = (s[:, None, None] * db_raw).to(b_bank.dtype)
        if need_dscale and scale_t is not None:
            g = scale * (db_raw * b_bank.float()).sum((1, 2))  # [A]
            ds = (g.sum() if scale_t.numel() == 1 else g).reshape(scale_t.shape).to(scale_t.dtype)
    dw = dbias = None
    if need_dw:
        if x2.is_cuda:  # cuBLAS accumulates half inputs in fp32 already
            dw = dy2.t() @ x2
        else:
            dw = (dy2.float().t() @ x2.float()).to(weight.dtype)
        dbias = dy2.float().sum(0).to(weight.dtype)
    return dx, dw, dbias, da, db, ds

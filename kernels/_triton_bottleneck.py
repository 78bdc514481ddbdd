"""Triton kernels and launchers for the bottleneck adapter y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu).

Imported lazily by ``bottleneck.py`` / ``multi.py`` (this is where Triton is imported). One set of kernels serves
the single adapter and the batched multi-adapter op: weights are *banks* ``Wd [A, r, d]``, ``Wu [A, d, r]``, and the
single adapter is the bank of one (``unsqueeze(0)`` views, no copy). For the multi-adapter op, rows are grouped by
adapter id with a :class:`~fxadapt.kernels._common.Schedule` so that every program uses one adapter.

Kernels (all fp32 accumulation; half inputs upcast before arithmetic):
  ``_bn_fwd``     row-parallel: h = x·Wdᵀ + bd (loop over d), store h, g = act(h), y = r + s·(g·Wuᵀ + bu) (loop over d).
  ``_bn_bwd_dh``  row-parallel: dh = ((dy⊙s)·Wu) ⊙ act'(h).
  ``_bn_bwd_col`` column-parallel over d (× adapter × row split): dx = dh·Wd (+ dy), and the weight-gradient
                  sums dWd = dhᵀx, P = dyᵀ·act(h) (→ dWu = s⊙P, dscale), q = Σ dy (→ dbu), dbd = Σ dh — each
                  program owns its columns, so no atomics: row splits write partials that ``torch.sum`` reduces in a
                  fixed order. Deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, pow2_tile
from ._triton_common import (
    INTERPRETED,
    block_rows,
    dot_f32,
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

_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/√2, for erf-GELU
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/√(2π), the normal pdf's constant
_SQRT_2_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # √(2/π), tanh-GELU
_GELU_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # tanh through exp(−2|u|) ∈ (0, 1]: never overflows (the interpreter would warn on exp(+large)).
    e = tl.exp(-2.0 * tl.abs(u))
    v = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, v, -v)


@triton.jit
def _sigmoid(h):
    e = tl.exp(-tl.abs(h))  # same overflow-free trick: σ(h) = 1/(1+e) for h ≥ 0, e/(1+e) for h < 0
    return tl.where(h >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def act_fwd(h, ACT: tl.constexpr):
    """Activation by code (see ``_common.ACTIVATIONS``). act(0) = 0 for every code, so zero-padded rank columns and
    masked rows stay zero after it."""
    if ACT == 1:
        g = tl.maximum(h, 0.0)
    elif ACT == 2:
        g = 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))
    elif ACT == 3:
        g = 0.5 * h * (1.0 + _tanh((h + h * h * h * _GELU_C) * _SQRT_2_PI))
    elif ACT == 4:
        g = h * _sigmoid(h)
    elif ACT == 5:
        g = _tanh(h)
    else:
        g = h
    return g


@triton.jit
def act_bwd(h, ACT: tl.constexpr):
    """act'(h); the same formulas as ``reference.activation_grad``."""
    if ACT == 1:
        d = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACT == 3:
        th = _tanh((h + h * h * h * _GELU_C) * _SQRT_2_PI)
        d = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * _SQRT_2_PI * (1.0 + h * h * (3.0 * _GELU_C))
    elif ACT == 4:
        sg = _sigmoid(h)
        d = sg * (1.0 + h * (1.0 - sg))
    elif ACT == 5:
        th = _tanh(h)
        d = 1.0 - th * th
    else:
        d = tl.full(h.shape, 1.0, tl.float32)
    return d


@triton.jit
def _bn_fwd(
    x_ptr, r_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sc_ptr, y_ptr, h_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, D, R, scale_f,
    s_xm, s_xd, s_rm, s_rd,
    s_wda, s_wdr, s_wdd, s_bda, s_bdr,
    s_wua, s_wud, s_wur, s_bua, s_bud,
    s_sca, s_scd,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_SC: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, rmask, a, active = block_rows(pid, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED)
    sf = tl.cast(scale_f, tl.float32)  # Inductor and the interpreter may hand floats over as fp64
    rr = tl.arange(0, BR)  # rank lanes; BR ≥ 16 (tl.dot minimum), lanes ≥ R are masked to 0
    rmask_r = rr < R

    # h[BM, BR] = x[rows, :] @ Wd[a]ᵀ, accumulated over d in BD-wide chunks.
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        xt = tl.load(
            x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd, mask=rmask[:, None] & dmask[None, :], other=0.0
        )
        # Wd[a] is [R, D]; read its [BD, BR] transpose tile straight from the strides (no transpose copy).
        wt = tl.load(
            wd_ptr + a * s_wda + dd[:, None] * s_wdd + rr[None, :] * s_wdr,
            mask=dmask[:, None] & rmask_r[None, :],
            other=0.0,
        )
        acc += mm(xt, wt, DOT_F32)
    if HAS_BD:
        acc += tl.load(bd_ptr + a * s_bda + rr * s_bdr, mask=rmask_r, other=0.0).to(tl.float32)[None, :]
    h = tl.where(active, acc, 0.0)  # passthrough rows save h = 0 (so backward sees zeros there)
    tl.store(h_ptr + rows[:, None] * R + rr[None, :], h, mask=rmask[:, None] & rmask_r[None, :])
    g = act_fwd(h, ACT)  # padded rank lanes: h = 0 → g = 0, so they add nothing below

    # y[rows, chunk] = r + s·(g @ Wu[a][chunk, :]ᵀ + bu), chunk by chunk over d.
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        m2 = rmask[:, None] & dmask[None, :]  # real rows × real columns of x, residual and y
        wt = tl.load(
            wu_ptr + a * s_wua + rr[:, None] * s_wur + dd[None, :] * s_wud,
            mask=rmask_r[:, None] & dmask[None, :],
            other=0.0,
        )
        out = mm(g, wt, DOT_F32)
        if HAS_BU:
            out += tl.load(bu_ptr + a * s_bua + dd * s_bud, mask=dmask, other=0.0).to(tl.float32)[None, :]
        if HAS_SC:
            sc = tl.load(sc_ptr + a * s_sca + dd * s_scd, mask=dmask, other=0.0).to(tl.float32)
            out = out * (sf * sc)[None, :]
        else:
            out = out * sf
        if HAS_RES:
            res_ptrs = r_ptr + rows[:, None] * s_rm + dd[None, :] * s_rd
        else:
            res_ptrs = x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd
        res = tl.load(res_ptrs, mask=m2, other=0.0).to(tl.float32)
        # Passthrough rows get exactly r, even if the adapter math on them were non-finite.
        y = tl.where(active, res + out, res)
        tl.store(y_ptr + rows[:, None] * D + dd[None, :], y.to(y_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _bn_bwd_dh(
    dy_ptr, wu_ptr, sc_ptr, h_ptr, dh_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, D, R, scale_f,
    s_dym, s_dyd, s_wua, s_wud, s_wur, s_sca, s_scd,
    ACT: tl.constexpr, HAS_SC: tl.constexpr, HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows, rmask, a, active = block_rows(pid, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED)
    sf = tl.cast(scale_f, tl.float32)
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    # dg[BM, BR] = (dy ⊙ s)[rows, :] @ Wu[a], accumulated over d.
    acc = tl.zeros([BM, BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + tl.arange(0, BD)
        dmask = dd < D
        dyt = tl.load(
            dy_ptr + rows[:, None] * s_dym + dd[None, :] * s_dyd,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_SC:
            sc = tl.load(sc_ptr + a * s_sca + dd * s_scd, mask=dmask, other=0.0).to(tl.float32)
            dyt = dyt * (sf * sc)[None, :]
        else:
            dyt = dyt * sf
        wt = tl.load(
            wu_ptr + a * s_wua + dd[:, None] * s_wud + rr[None, :] * s_wur,
            mask=dmask[:, None] & rmask_r[None, :],
            other=0.0,
        )
        acc += mm_split(dyt, wt, DOT_F32)
    m2 = rmask[:, None] & rmask_r[None, :]  # real rows × real rank lanes of the [N, R] h and dh
    h = tl.load(h_ptr + rows[:, None] * R + rr[None, :], mask=m2, other=0.0)
    dh = tl.where(active, acc * act_bwd(h, ACT), 0.0)  # passthrough rows: no adapter, no dh
    tl.store(dh_ptr + rows[:, None] * R + rr[None, :], dh, mask=m2)


@triton.jit
def _bn_bwd_col(
    dy_ptr, x_ptr, wd_ptr, h_ptr, dh_ptr, dx_ptr,
    pdwd_ptr, pp_ptr, pq_ptr, pdbd_ptr,
    perm_ptr, seg_lo_ptr, seg_cnt_ptr,
    N, D, R, A,
    s_dym, s_dyd, s_xm, s_xd, s_wda, s_wdr, s_wdd,
    ACT: tl.constexpr, ADD_DY: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)  # which BD-wide column block of d
    grp = tl.program_id(1)  # which row group (schedule group, or the single adapter)
    split = tl.program_id(2)  # which of SPLIT interleaved row-block subsets of the group
    lo, hi, a, active = seg_range(grp, seg_lo_ptr, seg_cnt_ptr, N, HAS_SCHED)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < D
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    # Wd[a][:, cols] stays in registers for the whole row loop: dx = dh @ Wd needs exactly these columns.
    wdt = tl.load(
        wd_ptr + a * s_wda + rr[:, None] * s_wdr + dd[None, :] * s_wdd,
        mask=rmask_r[:, None] & dmask[None, :],
        other=0.0,
    )
    acc_wd = tl.zeros([BR, BD], dtype=tl.float32)  # Σ dhᵀ x      → dWd[a][:, cols]
    acc_p = tl.zeros([BR, BD], dtype=tl.float32)  # Σ act(h)ᵀ dy → Pᵀ, dWu = s ⊙ P
    acc_q = tl.zeros([BD], dtype=tl.float32)  # Σ dy         → dbu = s ⊙ q
    acc_bd = tl.zeros([BR], dtype=tl.float32)  # Σ dh         → dbd (stored by column block 0 only)
    # This program takes row blocks split, split+SPLIT, … of the group (positions lo … hi−1 in sorted order).
    for start in range(lo + split * BM, hi, SPLIT * BM):
        rows, rmask = seg_rows(start, hi, perm_ptr, BM, HAS_SCHED)
        # Lanes past the group's last row, past d or past r load 0 and add nothing to the sums.
        m_rd = rmask[:, None] & dmask[None, :]  # [BM, BD] tiles of dy, x, dx
        m_rr = rmask[:, None] & rmask_r[None, :]  # [BM, BR] tiles of h, dh
        dh = tl.load(dh_ptr + rows[:, None] * R + rr[None, :], mask=m_rr, other=0.0)  # fp32 scratch
        dyt = tl.load(dy_ptr + rows[:, None] * s_dym + dd[None, :] * s_dyd, mask=m_rd, other=0.0)
        if NEED_DX:
            dx = mm(dh, wdt, DOT_F32)  # passthrough rows have dh = 0 → dx = dy or 0
            if ADD_DY:
                dx += dyt.to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * D + dd[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m_rd)
        if NEED_DW:
            xt = tl.load(x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd, mask=m_rd, other=0.0)
            acc_wd += mm_split(tl.trans(dh), xt, DOT_F32)
            g = act_fwd(tl.load(h_ptr + rows[:, None] * R + rr[None, :], mask=m_rr, other=0.0), ACT)
            acc_p += mm_split(tl.trans(g), dyt, DOT_F32)
            acc_q += tl.sum(dyt.to(tl.float32), axis=0)
            acc_bd += tl.sum(dh, axis=0)
    if NEED_DW:
        # Partials are laid out [SPLIT, A, ...] in fp32; the passthrough group owns no weights and stores nothing.
        base = split * A + a
        m_w = active & rmask_r[:, None] & dmask[None, :]
        tl.store(pdwd_ptr + base * R * D + rr[:, None] * D + dd[None, :], acc_wd, mask=m_w)
        tl.store(pp_ptr + base * R * D + rr[:, None] * D + dd[None, :], acc_p, mask=m_w)
        tl.store(pq_ptr + base * D + dd, acc_q, mask=active & dmask)
        tl.store(pdbd_ptr + base * R + rr, acc_bd, mask=active & (pid_d == 0) & rmask_r)


# ----------------------------------------------------------------------------------------------------------------
# Launchers.
def row_tiles(n: int, d: int, r: int, groups: int = 1) -> dict[str, int]:
    """Tiles for the row-parallel kernels; ``groups`` > 1 when rows are split among adapters.

    BM follows the rows per group (a block never spans two adapters, so with many adapters and few rows each a
    tall block would be mostly masked). The interpreter's cost is per program, per loop step and per element
    converted, so it gets large tiles — capped at 512 columns so that d = 768 still runs two loop steps in the
    tests. On a GPU the [BM, BR] fp32 accumulator's registers set BM and the warps.
    """
    br = pow2_tile(r, 16, 256)
    m = cdiv(n, groups)
    if INTERPRETED:
        return {"BM": pow2_tile(m, 16, 256), "BD": pow2_tile(d, 16, 512), "BR": br}
    bm = pow2_tile(m, 16, 64 if br <= 64 else 32)
    return {"BM": bm, "BD": 128 if br <= 64 else 64, "BR": br, "num_warps": 4 if br <= 64 else 8}


def col_tiles(n: int, d: int, r: int, groups: int, adapters: int) -> dict[str, int]:
    """Tiles and row split for the column-parallel backward kernel.

    SPLIT > 1 gives more programs when d/BD × groups alone cannot fill the GPU; its partials cost
    SPLIT × A × (2·r·d + d + r) fp32, capped at 64 MiB. The interpreter uses SPLIT = 2 when a group spans at least
    two row blocks, so that the CPU tests exercise the split-and-reduce path.
    """
    br = pow2_tile(r, 16, 256)
    m = cdiv(n, groups)
    if INTERPRETED:
        bm, bd = pow2_tile(m, 16, 256), pow2_tile(d, 16, 512)
        return {"BM": bm, "BD": bd, "BR": br, "SPLIT": 2 if m > bm else 1}
    bm, bd = pow2_tile(m, 16, 64), (64 if br <= 64 else 32)
    programs = cdiv(d, bd) * groups
    split = max(1, min(cdiv(264, programs), cdiv(m, bm)))  # ≈ 2 waves on a 132-SM H100
    per_split = adapters * (2 * r * d + d + r) * 4
    split = max(1, min(split, (64 << 20) // max(per_split, 1)))
    return {"BM": bm, "BD": bd, "BR": br, "SPLIT": split, "num_warps": 4 if br <= 64 else 8}


def _scale_bank(scale_t: Tensor | None, adapters: int, d: int) -> tuple[Tensor | None, int, int]:
    """Strides that read the scale tensor as an [A, d] bank: [d] per channel, [A] per adapter, 0-dim/[1] shared."""
    if scale_t is None:
        return None, 0, 0
    if scale_t.numel() == 1:
        return scale_t, 0, 0
    if scale_t.dim() == 1 and scale_t.numel() == d and adapters == 1:
        return scale_t, 0, scale_t.stride(0)
    return scale_t, scale_t.stride(0), 0  # [A]: one scalar per adapter


def forward(
    x2: Tensor,
    wd: Tensor,
    bd: Tensor | None,
    wu: Tensor,
    bu: Tensor | None,
    scale: float,
    scale_t: Tensor | None,
    act: int,
    r2: Tensor | None,
    ids: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """x2 [N, d]; banks wd [A, r, d], bd [A, r], wu [A, d, r], bu [A, d]; ``ids`` [N] int (−1 = passthrough) or None
    for the single adapter (A = 1). Returns y [N, d] in x's dtype and h [N, r] fp32 (0 on passthrough rows)."""
    n, d = x2.shape
    adapters, r = wd.shape[0], wd.shape[1]
    y = torch.empty((n, d), dtype=x2.dtype, device=x2.device)
    h = torch.empty((n, r), dtype=torch.float32, device=x2.device)
    if n == 0:
        return y, h
    t = row_tiles(n, d, r, 1 if ids is None else adapters + 1)
    sched = schedule(ids, adapters, t["BM"])
    sc, s_sca, s_scd = _scale_bank(scale_t, adapters, d)
    res = x2 if r2 is None else r2
    _bn_fwd[(num_row_blocks(sched, n, t["BM"]),)](
        x2, res, wd, x2 if bd is None else bd, wu, x2 if bu is None else bu, x2 if sc is None else sc, y, h,
        *row_sched_args(sched, h),
        n, d, r, scale,
        x2.stride(0), x2.stride(1), res.stride(0), res.stride(1),
        wd.stride(0), wd.stride(1), wd.stride(2), *((0, 0) if bd is None else bd.stride()),
        wu.stride(0), wu.stride(1), wu.stride(2), *((0, 0) if bu is None else bu.stride()),
        s_sca, s_scd,
        ACT=act, HAS_BD=bd is not None, HAS_BU=bu is not None, HAS_SC=sc is not None,
        HAS_RES=r2 is not None, HAS_SCHED=sched is not None, DOT_F32=dot_f32(x2.dtype),
        **t,
    )  # fmt: skip
    return y, h


def backward(
    dy2: Tensor,
    x2: Tensor,
    wd: Tensor,
    bd: Tensor | None,
    wu: Tensor,
    bu: Tensor | None,
    h: Tensor,
    scale: float,
    scale_t: Tensor | None,
    act: int,
    add_dy: bool,
    need_dx: bool,
    need_dw: bool,
    need_dscale: bool,
    ids: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for :func:`forward`: (dx [N, d], dWd, dbd, dWu, dbu, d scale_t) in bank shapes, None where not
    requested. ``add_dy``: the residual is x, so dx includes dy. d scale_t has the scale tensor's own shape
    (per-channel [d], per-adapter [A] or shared scalar): dL/ds_{a,j} = P_{a,j}·Wu_{a,j} + q_{a,j}·bu_{a,j} times the
    float factor, summed down to that shape."""
    n, d = x2.shape
    adapters, r = wd.shape[0], wd.shape[1]
    dev = x2.device
    need_sums = need_dw or need_dscale
    sc, s_sca, s_scd = _scale_bank(scale_t, adapters, d)
    tr = row_tiles(n, d, r, 1 if ids is None else adapters + 1)
    sched = schedule(ids, adapters, tr["BM"])
    dh = torch.empty((n, r), dtype=torch.float32, device=dev)
    if n > 0:
        _bn_bwd_dh[(num_row_blocks(sched, n, tr["BM"]),)](
            dy2, wu, x2 if sc is None else sc, h, dh,
            *row_sched_args(sched, dh),
            n, d, r, scale,
            dy2.stride(0), dy2.stride(1), wu.stride(0), wu.stride(1), wu.stride(2), s_sca, s_scd,
            ACT=act, HAS_SC=sc is not None, HAS_SCHED=sched is not None, DOT_F32=dot_f32(x2.dtype),
            **tr,
        )  # fmt: skip
    groups = num_groups(sched)
    tc = col_tiles(n, d, r, groups, adapters)
    split = tc["SPLIT"]
    dx = torch.empty((n, d), dtype=x2.dtype, device=dev) if need_dx else None
    f32 = torch.float32
    # Partials start at zero: an adapter with no rows (or a passthrough-only batch) must get zero gradients.
    p_wd = torch.zeros((split, adapters, r, d), dtype=f32, device=dev)
    p_p = torch.zeros((split, adapters, r, d), dtype=f32, device=dev)
    p_q = torch.zeros((split, adapters, d), dtype=f32, device=dev)
    p_bd = torch.zeros((split, adapters, r), dtype=f32, device=dev)
    if n > 0 and (need_dx or need_sums):
        _bn_bwd_col[(cdiv(d, tc["BD"]), groups, split)](
            dy2, x2, wd, h, dh, dy2 if dx is None else dx,
            p_wd, p_p, p_q, p_bd,
            *seg_sched_args(sched, dh),
            n, d, r, adapters,
            dy2.stride(0), dy2.stride(1), x2.stride(0), x2.stride(1), wd.stride(0), wd.stride(1), wd.stride(2),
            ACT=act, ADD_DY=add_dy, NEED_DX=need_dx, NEED_DW=need_sums, HAS_SCHED=sched is not None,
            DOT_F32=dot_f32(x2.dtype), **tc,
        )  # fmt: skip
    if not need_sums:
        return dx, None, None, None, None, None
    # Fixed-order reductions of the split partials (deterministic), then the closed forms for dWu, dbu, dscale.
    dwd32, p, q, dbd32 = p_wd.sum(0), p_p.sum(0).transpose(1, 2), p_q.sum(0), p_bd.sum(0)  # p: [A, d, r]
    s = torch.full((adapters, d), scale, dtype=f32, device=dev)
    if scale_t is not None:
        s = s * _scale_as_bank(scale_t, adapters, d)
    dwd = dwd32.to(wd.dtype) if need_dw else None
    dbd = dbd32.to(bd.dtype) if need_dw and bd is not None else None
    dwu = (s[:, :, None] * p).to(wu.dtype) if need_dw else None
    dbu = (s * q).to(bu.dtype) if need_dw and bu is not None else None
    dscale = None
    if need_dscale and scale_t is not None:
        ds = (p * wu.float()).sum(2)  # [A, d]: dL/ds for each adapter and channel
        if bu is not None:
            ds = ds + q * bu.float()
        ds = ds * scale
        if scale_t.numel() == 1:
            g = ds.sum()
        elif adapters == 1 and scale_t.numel() == d:
            g = ds[0]  # per-channel scale of the single adapter
        else:
            g = ds.sum(1)  # one scale per adapter
        dscale = g.reshape(scale_t.shape).to(scale_t.dtype)
    return dx, dwd, dbd, dwu, dbu, dscale


def _scale_bank(scale_t: Tensor | None, adapters: int, d: int) -> tuple[Tensor | None, int, int]:
    """Strides that read the scale tensor as an [A, d] bank: [d] per channel (single adapter), [A] per adapter,
    0-dim/[1] shared by all."""
    if scale_t is None:
        return None, 0, 0
    if scale_t.numel() == 1:
        return scale_t, 0, 0
    if adapters == 1 and scale_t.numel() == d:
        return scale_t, 0, scale_t.stride(-1)
    return scale_t, scale_t.stride(0), 0


def _scale_as_bank(scale_t: Tensor, adapters: int, d: int) -> Tensor:
    """The scale tensor as an fp32 [A, d] bank (the same reading as :func:`_scale_bank`)."""
    s = scale_t.float()
    if s.numel() == 1:
        return s.reshape(1, 1).expand(adapters, d)
    if adapters == 1 and s.numel() == d:
        return s.reshape(1, d)
    return s.reshape(adapters, 1).expand(adapters, d)

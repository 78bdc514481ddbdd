"""Triton kernels and launchers for the bottleneck adapter y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu).

Imported lazily by ``bottleneck.py`` / ``multi.py`` (this is where Triton is imported). One set of kernels serves
the single adapter and the batched multi-adapter op: weights are *banks* ``Wd [A, r, d]``, ``Wu [A, d, r]``, and the
single adapter is the bank of one (``unsqueeze(0)`` views, no copy). For the multi-adapter op, rows are grouped by
adapter id with a :class:`~fxadapt.kernels._common.Schedule` so that every program uses one adapter.

Kernels (all fp32 accumulation; half inputs upcast before arithmetic):
  ``_bn_fwd``     persistent row-parallel: per row block, h = x·Wdᵀ + bd (loop over d), store h, g = act(h),
                  y = r + s·(g·Wuᵀ + bu) (loop over d). Without a separate residual the second loop re-reads the
                  x tile: the grid is bounded (``_configs.row_programs``) so that the tiles in flight stay in L2,
                  x and the weights are loaded evict-last, y stored evict-first (``traffic.py`` models it).
  ``_bn_bwd_row`` persistent row-parallel: dh = ((dy⊙s)·Wu) ⊙ act'(h); dy loaded evict-last, for the next kernel.
  ``_bn_bwd_col`` column-parallel over d (× adapter × row split), rows last to first (the most recent dy of the
                  row kernel is still in L2): dx = dh·Wd (+ dy), and the weight-gradient sums dWd = dhᵀx,
                  P = dyᵀ·act(h) (→ dWu = s⊙P, dscale), q = Σ dy (→ dbu), dbd = Σ dh — each program owns its
                  columns, so no atomics: row splits write partials that ``torch.sum`` reduces in a fixed order.
Deterministic. Empty schedule blocks (spare blocks, adapters without rows) exit at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _autotune, _configs
from ._common import aligned16, cdiv, on_device, target_of
from ._triton_act import act_bwd, act_fwd
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
def _bn_fwd(
    x_ptr, r_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, sc_ptr, y_ptr, h_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, D, R, NBLK, NPROG, scale_f,
    s_xm, s_xd, s_rm, s_rd,
    s_wda, s_wdr, s_wdd, s_bda, s_bdr,
    s_wua, s_wud, s_wur, s_bua, s_bud,
    s_sca, s_scd,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_SC: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    sf = tl.cast(scale_f, tl.float32)  # Inductor and the interpreter may hand floats over as fp64
    rr = tl.arange(0, BR)  # rank lanes; BR ≥ 16 (tl.dot minimum), lanes ≥ R are masked to 0
    rmask_r = rr < R
    for blk in range(tl.program_id(0), NBLK, NPROG):  # persistent: this program's row blocks
        rows, rmask, amask, a, adapter, nonempty = block_rows(
            blk, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED
        )
        if nonempty:
            # Weight lanes: nothing to load for a passthrough block (its rows pass r through).
            wr = lanes_if(rmask_r, adapter)
            # h[BM, BR] = x[rows, :] @ Wd[a]ᵀ, accumulated over d in BD-wide chunks.
            acc = tl.zeros([BM, BR], dtype=tl.float32)
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                dmask = dd < D
                xt = tl.load(
                    x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd,
                    mask=amask[:, None] & dmask[None, :],
                    other=0.0,
                    eviction_policy="evict_last",  # re-read below for the residual
                )
                # Wd[a] is [R, D]; read its [BD, BR] transpose tile straight from the strides (no transpose copy).
                wt = tl.load(
                    wd_ptr + a * s_wda + dd[:, None] * s_wdd + rr[None, :] * s_wdr,
                    mask=dmask[:, None] & wr[None, :],
                    other=0.0,
                    eviction_policy="evict_last",  # every row block reads the weights
                )
                acc += mm(xt, wt, DOT_F32)
            if HAS_BD:
                acc += tl.load(bd_ptr + a * s_bda + rr * s_bdr, mask=wr, other=0.0).to(tl.float32)[None, :]
            h = tl.where(amask[:, None], acc, 0.0)  # passthrough rows save h = 0 (backward sees zeros there)
            tl.store(
                h_ptr + rows[:, None] * R + rr[None, :],
                h,
                mask=rmask[:, None] & rmask_r[None, :],
                eviction_policy="evict_last",
            )
            g = act_fwd(h, ACT)  # padded rank lanes: h = 0 → g = 0, so they add nothing below

            # y[rows, chunk] = r + s·(g @ Wu[a][chunk, :]ᵀ + bu), chunk by chunk over d.
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                dmask = dd < D
                m2 = rmask[:, None] & dmask[None, :]  # real rows × real columns of x, residual and y
                wt = tl.load(
                    wu_ptr + a * s_wua + rr[:, None] * s_wur + dd[None, :] * s_wud,
                    mask=wr[:, None] & dmask[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                )
                out = mm(g, wt, DOT_F32)
                if HAS_BU:
                    bu = tl.load(bu_ptr + a * s_bua + dd * s_bud, mask=dmask, other=0.0).to(tl.float32)
                    out += bu[None, :]
                if HAS_SC:
                    sc = tl.load(sc_ptr + a * s_sca + dd * s_scd, mask=dmask, other=0.0).to(tl.float32)
                    out = out * (sf * sc)[None, :]
                else:
                    out = out * sf
                if HAS_RES:
                    res_ptrs = r_ptr + rows[:, None] * s_rm + dd[None, :] * s_rd
                else:
                    res_ptrs = x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd
                res = tl.load(res_ptrs, mask=m2, other=0.0, eviction_policy="evict_first").to(tl.float32)
                # Passthrough rows get exactly r, even if the adapter math on them were non-finite.
                y = tl.where(amask[:, None], res + out, res)
                tl.store(
                    y_ptr + rows[:, None] * D + dd[None, :],
                    y.to(y_ptr.dtype.element_ty),
                    mask=m2,
                    eviction_policy="evict_first",
                )


@triton.jit
def _bn_bwd_row(
    dy_ptr, wu_ptr, sc_ptr, h_ptr, dh_ptr,
    perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr,
    N, D, R, NBLK, NPROG, scale_f,
    s_dym, s_dyd, s_wua, s_wud, s_wur, s_sca, s_scd,
    ACT: tl.constexpr, HAS_SC: tl.constexpr, HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    sf = tl.cast(scale_f, tl.float32)
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    for blk in range(tl.program_id(0), NBLK, NPROG):
        rows, rmask, amask, a, adapter, nonempty = block_rows(
            blk, perm_ptr, bgrp_ptr, blo_ptr, bhi_ptr, N, BM, HAS_SCHED
        )
        if nonempty:
            wr = lanes_if(rmask_r, adapter)
            # dg[BM, BR] = (dy ⊙ s)[rows, :] @ Wu[a], accumulated over d.
            acc = tl.zeros([BM, BR], dtype=tl.float32)
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                dmask = dd < D
                dyt = tl.load(
                    dy_ptr + rows[:, None] * s_dym + dd[None, :] * s_dyd,
                    mask=amask[:, None] & dmask[None, :],
                    other=0.0,
                    eviction_policy="evict_last",  # the column kernel reads dy again, last rows first
                ).to(tl.float32)
                if HAS_SC:
                    sc = tl.load(sc_ptr + a * s_sca + dd * s_scd, mask=dmask, other=0.0).to(tl.float32)
                    dyt = dyt * (sf * sc)[None, :]
                else:
                    dyt = dyt * sf
                wt = tl.load(
                    wu_ptr + a * s_wua + dd[:, None] * s_wud + rr[None, :] * s_wur,
                    mask=dmask[:, None] & wr[None, :],
                    other=0.0,
                    eviction_policy="evict_last",
                )
                acc += mm_split(dyt, wt, DOT_F32)
            m2 = rmask[:, None] & rmask_r[None, :]  # real rows × real rank lanes of the [N, R] h and dh
            h = tl.load(
                h_ptr + rows[:, None] * R + rr[None, :], mask=m2, other=0.0, eviction_policy="evict_last"
            )
            dh = tl.where(amask[:, None], acc * act_bwd(h, ACT), 0.0)  # passthrough rows: no adapter, no dh
            tl.store(dh_ptr + rows[:, None] * R + rr[None, :], dh, mask=m2, eviction_policy="evict_last")


@triton.jit
def _bn_bwd_col(
    dy_ptr, x_ptr, wd_ptr, h_ptr, dh_ptr, dx_ptr,
    pdwd_ptr, pp_ptr, pq_ptr, pdbd_ptr,
    perm_ptr, seg_lo_ptr, seg_cnt_ptr,
    N, D, R, A, SPLIT,
    s_dym, s_dyd, s_xm, s_xd, s_wda, s_wdr, s_wdd,
    ACT: tl.constexpr, ADD_DY: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    HAS_SCHED: tl.constexpr, DOT_F32: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):  # fmt: skip
    pid_d = tl.program_id(0)  # which BD-wide column block of d
    grp = tl.program_id(1)  # which row group (schedule group, or the single adapter)
    split = tl.program_id(2)  # which of SPLIT interleaved row-block subsets of the group
    lo, hi, a, adapter = seg_range(grp, seg_lo_ptr, seg_cnt_ptr, N, HAS_SCHED)
    dd = pid_d * BD + tl.arange(0, BD)
    dmask = dd < D
    rr = tl.arange(0, BR)
    rmask_r = rr < R
    wr = lanes_if(rmask_r, adapter)  # the passthrough group owns no weights
    # Wd[a][:, cols] stays in registers for the whole row loop: dx = dh @ Wd needs exactly these columns.
    wdt = tl.load(
        wd_ptr + a * s_wda + rr[:, None] * s_wdr + dd[None, :] * s_wdd,
        mask=wr[:, None] & dmask[None, :],
        other=0.0,
    )
    acc_wd = tl.zeros([BR, BD], dtype=tl.float32)  # Σ dhᵀ x      → dWd[a][:, cols]
    acc_p = tl.zeros([BR, BD], dtype=tl.float32)  # Σ act(h)ᵀ dy → Pᵀ, dWu = s ⊙ P
    acc_q = tl.zeros([BD], dtype=tl.float32)  # Σ dy         → dbu = s ⊙ q
    acc_bd = tl.zeros([BR], dtype=tl.float32)  # Σ dh         → dbd (stored by column block 0 only)
    # This program takes the row blocks j ≡ split (mod SPLIT) of the group, last first: the row kernel just read
    # dy from the first row to the last, so the last rows' dy are the ones still in L2.
    blocks = (hi - lo + BM - 1) // BM
    mine = (blocks - split + SPLIT - 1) // SPLIT  # ≥ 0: blocks ≥ 0 and split < SPLIT
    top = split + (mine - 1) * SPLIT
    for i in range(0, mine):
        start = lo + (top - i * SPLIT) * BM
        rows, rmask = seg_rows(start, hi, perm_ptr, BM, HAS_SCHED)
        # Lanes past the group's last row, past d or past r load 0 and add nothing to the sums.
        m_rd = rmask[:, None] & dmask[None, :]  # [BM, BD] tiles of dy, x, dx
        m_rr = rmask[:, None] & rmask_r[None, :]  # [BM, BR] tiles of h, dh
        dh = tl.load(
            dh_ptr + rows[:, None] * R + rr[None, :], mask=m_rr, other=0.0, eviction_policy="evict_last"
        )
        dyt = tl.load(
            dy_ptr + rows[:, None] * s_dym + dd[None, :] * s_dyd,
            mask=m_rd,
            other=0.0,
            eviction_policy="evict_first",
        )
        if NEED_DX:
            dx = mm(dh, wdt, DOT_F32)  # passthrough rows have dh = 0 → dx = dy or 0
            if ADD_DY:
                dx += dyt.to(tl.float32)
            tl.store(
                dx_ptr + rows[:, None] * D + dd[None, :],
                dx.to(dx_ptr.dtype.element_ty),
                mask=m_rd,
                eviction_policy="evict_first",
            )
        if NEED_DW:
            xt = tl.load(
                x_ptr + rows[:, None] * s_xm + dd[None, :] * s_xd,
                mask=m_rd,
                other=0.0,
                eviction_policy="evict_first",
            )
            acc_wd += mm_split(tl.trans(dh), xt, DOT_F32)
            hh = tl.load(
                h_ptr + rows[:, None] * R + rr[None, :], mask=m_rr, other=0.0, eviction_policy="evict_last"
            )
            acc_p += mm_split(tl.trans(act_fwd(hh, ACT)), dyt, DOT_F32)
            acc_q += tl.sum(dyt.to(tl.float32), axis=0)
            acc_bd += tl.sum(dh, axis=0)
    if NEED_DW:
        # Partials are laid out [SPLIT, A, ...] in fp32; the passthrough group owns no weights and stores nothing.
        base = split * A + a
        m_w = wr[:, None] & dmask[None, :]
        tl.store(pdwd_ptr + base * R * D + rr[:, None] * D + dd[None, :], acc_wd, mask=m_w)
        tl.store(pp_ptr + base * R * D + rr[:, None] * D + dd[None, :], acc_p, mask=m_w)
        tl.store(pq_ptr + base * D + dd, acc_q, mask=lanes_if(dmask, adapter))
        tl.store(pdbd_ptr + base * R + rr, acc_bd, mask=wr & (rr * 0 + pid_d == 0))


# ----------------------------------------------------------------------------------------------------------------
# Launchers.
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


def _row_launch(
    kernel, name: str, x2: Tensor, groups: int, d: int, r: int, blocks_for, args_for, flags
) -> None:
    """Launch a persistent row kernel with the autotuned (or model-chosen) config. ``blocks_for(bm)`` is the
    number of row blocks at height ``bm``; ``args_for(cfg, nblk, nprog)`` builds the positional arguments."""
    from . import _triton_common

    n = x2.shape[0]
    tgt = target_of(x2)
    elem = x2.element_size()
    cands = _configs.row_candidates(tgt, n, d, r, elem, groups)

    def run(cfg: dict) -> None:
        nblk = blocks_for(cfg["BM"])
        nprog = _configs.row_programs(tgt, cfg, nblk, d, elem)
        launch(kernel, (nprog,), *args_for(cfg, nblk, nprog), **flags, **cfg)

    if _triton_common.LAUNCH_HOOK is not None:  # the compile check: every candidate the autotuner could pick
        for cfg in cands[1:]:
            run(cfg)
    key = (
        name,
        x2.dtype,
        d,
        _configs.rank_tier(r),
        _configs.pow2_tile(-(-n // groups), 16, 1 << 20),
        groups > 1,
    )
    run(_autotune.choose(key, cands, run, x2.device))


class _Schedules:
    """The multi-adapter schedule for whichever row-block height runs (built once per height; None: one adapter)."""

    def __init__(self, ids: Tensor | None, adapters: int):
        self.ids, self.adapters, self.built = ids, adapters, {}

    def at(self, bm: int):
        if self.ids is None:
            return None
        if bm not in self.built:
            self.built[bm] = schedule(self.ids, self.adapters, bm)
        return self.built[bm]

    def blocks(self, n: int, bm: int) -> int:
        return num_row_blocks(self.at(bm), n, bm)

    def any(self):
        """A schedule for the column kernels (their segments do not depend on the block height)."""
        if self.ids is None:
            return None
        return next(iter(self.built.values())) if self.built else self.at(16)


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
    for the single adapter (A = 1). Returns y [N, d] in x's dtype and h [N, r] fp32 (0 on passthrough rows).
    Launches on x's device; ``scale_t`` and ``ids`` are moved there if they live elsewhere."""
    with on_device(x2):
        return _forward(x2, wd, bd, wu, bu, scale, scale_t, act, r2, ids)


def _forward(x2, wd, bd, wu, bu, scale, scale_t, act, r2, ids):
    n, d = x2.shape
    adapters, r = wd.shape[0], wd.shape[1]
    dev = x2.device
    y = torch.empty((n, d), dtype=x2.dtype, device=dev)
    h = torch.empty((n, r), dtype=torch.float32, device=dev)
    if n == 0:
        return y, h
    ids = None if ids is None else ids.to(dev)
    sc, s_sca, s_scd = _scale_bank(None if scale_t is None else scale_t.to(dev), adapters, d)
    res = x2 if r2 is None else r2
    groups = 1 if ids is None else adapters + 1
    scheds = _Schedules(ids, adapters)

    def args_for(cfg, nblk, nprog):
        sched = scheds.at(cfg["BM"])
        return (
            x2, res, wd, x2 if bd is None else bd, wu, x2 if bu is None else bu, x2 if sc is None else sc, y, h,
            *row_sched_args(sched, h),
            n, d, r, nblk, nprog, scale,
            x2.stride(0), x2.stride(1), res.stride(0), res.stride(1),
            wd.stride(0), wd.stride(1), wd.stride(2), *((0, 0) if bd is None else bd.stride()),
            wu.stride(0), wu.stride(1), wu.stride(2), *((0, 0) if bu is None else bu.stride()),
            s_sca, s_scd,
        )  # fmt: skip

    flags = dict(
        ACT=act, HAS_BD=bd is not None, HAS_BU=bu is not None, HAS_SC=sc is not None,
        HAS_RES=r2 is not None, HAS_SCHED=ids is not None, DOT_F32=dot_f32(x2.dtype),
    )  # fmt: skip
    _row_launch(_bn_fwd, "bn_fwd", x2, groups, d, r, lambda bm: scheds.blocks(n, bm), args_for, flags)
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
    requested. ``add_dy``: the residual is x, so dx includes dy. d scale_t has the scale tensor's own shape and
    device (per-channel [d], per-adapter [A] or shared scalar): dL/ds_{a,j} = P_{a,j}·Wu_{a,j} + q_{a,j}·bu_{a,j}
    times the float factor, summed down to that shape."""
    with on_device(x2):
        out = _backward(
            dy2, x2, wd, bd, wu, bu, h, scale, scale_t, act, add_dy, need_dx, need_dw, need_dscale, ids
        )
    ds = out[5]
    if ds is not None and scale_t is not None and ds.device != scale_t.device:
        out = (*out[:5], ds.to(scale_t.device))
    return out


def _backward(dy2, x2, wd, bd, wu, bu, h, scale, scale_t, act, add_dy, need_dx, need_dw, need_dscale, ids):
    n, d = x2.shape
    adapters, r = wd.shape[0], wd.shape[1]
    dev = x2.device
    ids = None if ids is None else ids.to(dev)
    scale_t = None if scale_t is None else scale_t.to(dev)
    need_sums = need_dw or need_dscale
    sc, s_sca, s_scd = _scale_bank(scale_t, adapters, d)
    groups = 1 if ids is None else adapters + 1
    dh = torch.empty((n, r), dtype=torch.float32, device=dev)
    scheds = _Schedules(ids, adapters)
    if n > 0:

        def args_for(cfg, nblk, nprog):
            sched = scheds.at(cfg["BM"])
            return (
                dy2, wu, x2 if sc is None else sc, h, dh,
                *row_sched_args(sched, dh),
                n, d, r, nblk, nprog, scale,
                dy2.stride(0), dy2.stride(1), wu.stride(0), wu.stride(1), wu.stride(2), s_sca, s_scd,
            )  # fmt: skip

        flags = dict(ACT=act, HAS_SC=sc is not None, HAS_SCHED=ids is not None, DOT_F32=dot_f32(x2.dtype))
        blocks = lambda bm: scheds.blocks(n, bm)  # noqa: E731
        _row_launch(_bn_bwd_row, "bn_bwd_row", x2, groups, d, r, blocks, args_for, flags)
    tgt = target_of(x2)
    aligned = aligned16(d, *dy2.stride(), *x2.stride())
    tc = _configs.col_config(tgt, n, d, r, x2.element_size(), groups, adapters, aligned)
    split = tc.pop("SPLIT")
    sched = scheds.any()
    dx = torch.empty((n, d), dtype=x2.dtype, device=dev) if need_dx else None
    f32 = torch.float32
    # Partials start at zero: an adapter with no rows (or a passthrough-only batch) must get zero gradients.
    p_wd = torch.zeros((split, adapters, r, d), dtype=f32, device=dev)
    p_p = torch.zeros((split, adapters, r, d), dtype=f32, device=dev)
    p_q = torch.zeros((split, adapters, d), dtype=f32, device=dev)
    p_bd = torch.zeros((split, adapters, r), dtype=f32, device=dev)
    if n > 0 and (need_dx or need_sums):
        launch(_bn_bwd_col, (cdiv(d, tc["BD"]), num_groups(sched), split),
            dy2, x2, wd, h, dh, dy2 if dx is None else dx,
            p_wd, p_p, p_q, p_bd,
            *seg_sched_args(sched, dh),
            n, d, r, adapters, split,
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

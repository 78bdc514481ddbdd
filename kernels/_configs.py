"""Tile configs: what every launcher runs with, per target tier, dtype and rank tier (no Triton import).

The GPU tables are the resource model the compile check (``compile_check.py``) validates: for every entry and
every target it compiles the kernels and asserts shared memory ≤ the target's per-program limit, registers ≤ the
register file and no spills (fp16/bf16). Shared memory of a pipelined loop is about
``num_stages × (operand tiles of one step) × element size``; the fp32 accumulators sit in registers
(``BM × BR × 4 / (32 · num_warps)`` bytes per thread). Rank tier = the rank rounded up to a power of two in
[16, 256] (``tl.dot`` needs ≥ 16; lanes past the rank are masked).

*Ragged* calls (a width or a stride that is not a multiple of 16: Triton then cannot move 16-byte vectors, so
the pipelined loads cannot be staged in shared memory and their tiles live in registers) get smaller tiles
(``aligned=False``); the compile check covers both kinds.

Under the interpreter (CPU tests) the cost is per program and per loop step, so tiles are large — capped at 512
columns so that d = 768 still takes two loop steps — and the persistent row loop and the row splits are always
exercised (two row blocks per program, SPLIT = 2 when a group has two row blocks).

Row kernels are *persistent*: NPROG programs stride over the row blocks. NPROG is bounded so that the row tiles in
flight (NPROG × BM × d × element size) stay within :data:`L2_SHARE` of the L2: the forward re-reads its x tile for
the residual after a full pass over d, and that re-read must hit L2 (``traffic.py`` models it).
"""

from __future__ import annotations

from ._common import Target, cdiv, pow2_tile
from .traffic import L2_SHARE

#: Programs per multiprocessor the persistent grid allows at most (the row configs use ≤ ~100 KiB of shared memory
#: and ≤ 128 registers per thread at the headline ranks, so two fit one H100 SM).
MAX_PROGRAMS_PER_SM = 2


def rank_tier(r: int) -> int:
    return pow2_tile(r, 16, 256)


def _half(elem: int) -> bool:
    return elem == 2


def _hopper(tgt: Target) -> bool:
    """sm_90+: warpgroup MMA keeps accumulators in registers but reads operands from shared memory; earlier
    parts' mma.sync holds the operand fragments in registers too, so their tiles are smaller."""
    return tgt.capability >= 90


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck row kernels (_bn_fwd, _bn_bwd_row): [BM, BR] fp32 accumulator, loops over d in BD-wide chunks.
#: Row-block heights tried per rank tier (half precision): the accumulator and, in the forward's second loop, the
#: [BM, BD] output tile are fp32 registers; BM ≥ 64 lets Hopper use warpgroup MMA.
_ROW_BMS = {16: (64, 32, 128), 32: (64, 32, 128), 64: (64, 32, 128), 128: (64, 32), 256: (32,)}
#: fp32 (IEEE dots on the CUDA cores): one smaller config, (BM, BD, num_warps) by rank tier.
_ROW_F32 = {16: (32, 64, 4), 32: (32, 64, 4), 64: (32, 32, 4), 128: (16, 32, 4), 256: (16, 16, 4)}


def _row_half(bm: int, br: int, stages: int) -> dict[str, int]:
    warps = 8 if bm >= 64 or br >= 64 else 4
    bd = 128 if bm <= 32 and br <= 16 else 64
    return {"BM": bm, "BD": bd, "BR": br, "num_warps": warps, "num_stages": stages}


def row_candidates(
    tgt: Target | None, n: int, d: int, r: int, elem: int, groups: int = 1
) -> list[dict[str, int]]:
    """Configs of the row-parallel bottleneck kernels, best first by the bytes model (the autotuner times them
    on a GPU). ``groups`` > 1: rows split among adapters (a row block never spans two adapters, so with many
    adapters and few rows each, tall blocks would be mostly masked)."""
    br = rank_tier(r)
    m = cdiv(n, groups)
    if tgt is None:
        bm = pow2_tile(m, 16, 256)
        return [{"BM": bm, "BD": pow2_tile(d, 16, 512), "BR": br}]
    stages = 2 if tgt.tier == "small" else 3
    if not _half(elem):
        bm, bd, warps = _ROW_F32[br]
        return [
            {"BM": min(bm, pow2_tile(m, 16, 256)), "BD": bd, "BR": br, "num_warps": warps, "num_stages": 2}
        ]
    fit = pow2_tile(m, 16, 256 if _hopper(tgt) else 64)  # pre-Hopper MMA holds more in registers: BM ≤ 64
    bms = sorted({min(bm, fit) for bm in _ROW_BMS[br]}, reverse=True)
    cands = [_row_half(bm, br, stages) for bm in bms]
    if len(cands) > 1:
        from . import traffic

        dev = traffic.device_for(tgt)

        def predicted(cfg: dict[str, int]) -> float:
            blocks = cdiv(n, cfg["BM"]) + (groups if groups > 1 else 0)
            progs = row_programs(tgt, cfg, blocks, d, elem)
            return traffic.bottleneck_fwd(n, d, r, elem, dev, bm=cfg["BM"], programs=progs).time(dev)

        cands.sort(key=predicted)
    return cands


def row_config(tgt: Target | None, n: int, d: int, r: int, elem: int, groups: int = 1) -> dict[str, int]:
    """The untuned choice: the model's best candidate."""
    return row_candidates(tgt, n, d, r, elem, groups)[0]


def row_programs(tgt: Target | None, cfg: dict[str, int], blocks: int, d: int, elem: int) -> int:
    """Persistent grid size: at most one program per row block; one or two per SM, two only if their row tiles
    in flight still fit :data:`L2_SHARE` of the L2. The interpreter gets two blocks per program (so the CPU tests
    exercise the persistent loop)."""
    if tgt is None:
        return max(1, cdiv(blocks, 2))
    per_sm = MAX_PROGRAMS_PER_SM
    while per_sm > 1 and per_sm * tgt.sms * cfg["BM"] * d * elem > L2_SHARE * tgt.l2:
        per_sm -= 1
    return max(1, min(blocks, per_sm * tgt.sms))


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck column kernel (_bn_bwd_col): [BR, BD] fp32 weight-gradient accumulators ×2 in registers, loop over rows.
_COL_HALF = {
    16: (32, 128, 8, 3),
    32: (32, 64, 8, 3),
    64: (32, 64, 8, 3),
    128: (32, 64, 8, 2),
    256: (16, 16, 8, 2),
}
_COL_F32 = {
    16: (32, 64, 4, 2),
    32: (32, 64, 4, 2),
    64: (32, 32, 4, 2),
    128: (16, 32, 8, 2),
    256: (16, 16, 8, 2),
}

#: Cap on the split partials of the column kernels (fp32), per call.
PARTIAL_BYTES = 64 << 20


def col_config(
    tgt: Target | None, n: int, d: int, r: int, elem: int, groups: int, adapters: int, aligned: bool = True
) -> dict[str, int]:
    """Config and row split of the column-parallel backward kernel. SPLIT > 1 gives more programs when
    d/BD × groups alone cannot fill the GPU; its partials cost SPLIT × A × (2·r·d + d + r) fp32."""
    br = rank_tier(r)
    m = cdiv(n, groups)
    if tgt is None:
        bm = pow2_tile(m, 16, 256)
        return {"BM": bm, "BD": pow2_tile(d, 16, 512), "BR": br, "SPLIT": 2 if m > bm else 1}
    bm, bd, warps, stages = (_COL_HALF if _half(elem) else _COL_F32)[br]
    if tgt.tier == "small":
        stages = 2
    if not aligned:
        bm = min(bm, 32)
    if _half(elem) and not _hopper(tgt) and br >= 64:  # mma.sync: the dots' operands live in registers
        bm, bd = 16, (64 if br == 64 else 32)
    bm = min(bm, pow2_tile(m, 16, 256))
    programs = cdiv(d, bd) * groups
    split = max(1, min(cdiv(2 * tgt.sms, programs), cdiv(m, bm)))  # ≈ two programs per SM
    per_split = adapters * (2 * r * d + d + r) * 4
    split = max(1, min(split, PARTIAL_BYTES // max(per_split, 1)))
    return {"BM": bm, "BD": bd, "BR": br, "SPLIT": split, "num_warps": warps, "num_stages": stages}


# ----------------------------------------------------------------------------------------------------------------
# LoRA: low-rank projection (_rowproj), GEMM with a low-rank epilogue (_gemm_lr), per-adapter outer sums (_seg_outer).
def lora_bm(tgt: Target | None, n: int, r: int, groups: int, elem: int, aligned: bool = True) -> int:
    """Row-block height shared by ``_rowproj`` and ``_gemm_lr`` in one call (they share one schedule; the GEMM
    config must not change it)."""
    m = cdiv(n, groups)
    if tgt is None:
        return pow2_tile(m, 16, 256)
    cap = (128 if rank_tier(r) <= 64 else 64) if _half(elem) else (64 if rank_tier(r) <= 64 else 32)
    if not aligned:
        cap = min(cap, 64 if _half(elem) else 32)
    if not _hopper(tgt):  # mma.sync holds the operand fragments in registers
        cap = min(cap, 32 if rank_tier(r) == 256 else 64)
    return pow2_tile(m, 16, cap)


_PROJ_HALF = {16: (128, 4, 3), 32: (128, 4, 3), 64: (64, 4, 3), 128: (64, 8, 3), 256: (32, 8, 3)}
_PROJ_F32 = {16: (64, 4, 2), 32: (64, 4, 2), 64: (32, 4, 2), 128: (32, 8, 2), 256: (16, 8, 2)}


def proj_config(
    tgt: Target | None, k: int, r: int, bm: int, elem: int, aligned: bool = True
) -> dict[str, int]:
    br = rank_tier(r)
    if tgt is None:
        return {"BM": bm, "BK": pow2_tile(k, 16, 512), "BR": br}
    bk, warps, stages = (_PROJ_HALF if _half(elem) else _PROJ_F32)[br]
    if tgt.tier == "small":
        stages = 2
    if not aligned:
        bk = min(bk, 64)
    return {"BM": bm, "BK": bk, "BR": br, "num_warps": warps, "num_stages": stages}


def gemm_config(
    tgt: Target | None, k: int, nout: int, r: int, bm: int, elem: int, aligned: bool = True
) -> dict[str, int]:
    br = rank_tier(r)
    if tgt is None:
        return {"BM": bm, "BN": pow2_tile(nout, 16, 512), "BK": pow2_tile(k, 16, 512), "BR": br, "GROUP_M": 4}
    if bm <= 16:  # decode-sized batches: weight-bandwidth bound, many narrow column blocks to fill the GPU
        cfg = {
            "BM": bm,
            "BN": 64,
            "BK": 128 if _half(elem) else 32,
            "GROUP_M": 1,
            "num_warps": 4,
            "num_stages": 4,
        }
    elif _half(elem):
        cfg = {"BM": bm, "BN": 128, "BK": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    else:
        cfg = {"BM": bm, "BN": 64, "BK": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 2}
    if tgt.tier == "small":
        cfg["num_stages"] = 2
    if not aligned:  # operands that cannot be staged with 16-byte copies sit in registers: smaller tiles
        cfg.update(BN=64, BK=32)
    if br == 256:  # the [BM, 256] × [256, BN] epilogue dot: narrower output tiles
        cfg.update(BN=32 if not _half(elem) or not _hopper(tgt) else min(cfg["BN"], 128))
    return {**cfg, "BR": br}


_OUTER_HALF = {
    16: (64, 128, 4, 3),
    32: (64, 128, 4, 3),
    64: (64, 128, 4, 3),
    128: (32, 64, 8, 2),
    256: (32, 32, 8, 2),
}
_OUTER_F32 = {
    16: (32, 64, 4, 2),
    32: (32, 64, 4, 2),
    64: (32, 64, 4, 2),
    128: (16, 32, 4, 2),
    256: (16, 16, 4, 2),
}


def outer_config(
    tgt: Target | None, n: int, dv: int, r: int, elem: int, groups: int, adapters: int, aligned: bool = True
) -> dict[str, int]:
    """Like :func:`col_config`: partials cost SPLIT × A × r × dv fp32."""
    br = rank_tier(r)
    m = cdiv(n, groups)
    if tgt is None:
        bm = pow2_tile(m, 16, 256)
        return {"BM": bm, "BD": pow2_tile(dv, 16, 512), "BR": br, "SPLIT": 2 if m > bm else 1}
    bm, bd, warps, stages = (_OUTER_HALF if _half(elem) else _OUTER_F32)[br]
    if tgt.tier == "small":
        stages = 2
    if not _hopper(tgt):
        warps = 8
    if not aligned:
        bm = min(bm, 32)
    bm = min(bm, pow2_tile(m, 16, 256))
    split = max(1, min(cdiv(2 * tgt.sms, cdiv(dv, bd) * groups), cdiv(m, bm)))
    split = max(1, min(split, PARTIAL_BYTES // max(adapters * r * dv * 4, 1)))
    return {"BM": bm, "BD": bd, "BR": br, "SPLIT": split, "num_warps": warps, "num_stages": stages}

"""The bytes model: what each kernel reads and writes per launch, the physical floor, and the eager baseline.

Three numbers per (op, mode, shape):

* **floor** — the HBM traffic no implementation can avoid (every input read once, every output written once):
  the same for every provider, so ``floor / time`` is an *effective* bandwidth and ``floor / HBM bandwidth / time``
  is the "% of HBM floor" the benchmark reports;
* **eager** — what the plain PyTorch op sequence moves (each op round-trips its [N, d] operands);
* **fused** — what fxadapt's kernels move, per kernel, from their tiles and schedule (:func:`bottleneck_fwd`, …):
  HBM bytes (``hbm``), bytes between L2 and the multiprocessors (``l2``) and FLOPs.

The fused model's assumptions (``docs/kernels.md`` states them next to the numbers):

* weights, biases, h and dh stay in L2 once read (they are small and loaded ``evict_last``);
* a re-read hits L2 when the data read in between fits in :data:`L2_SHARE` of the L2 (LRU-like; streaming outputs
  are stored ``evict_first`` and do not count); otherwise the fraction ``L2_SHARE · L2 / footprint`` hits;
* the persistent row kernels keep ``programs`` row tiles in flight: footprint = programs × BM × d × element size;
* the backward's column kernel sweeps rows last-to-first, so its dy read finds the most recent ``L2_SHARE · L2``
  bytes of dy that the row kernel left in L2;
* time = max(HBM bytes / HBM bandwidth, L2 bytes / L2 bandwidth, FLOPs / matrix peak): bandwidth ceilings only,
  no latency or launch cost (the benchmark measures those).

The L2 bandwidth is the least known number: not on NVIDIA's data sheets, not measured here (no GPU was lent to the
task that wrote this model). :data:`DEVICES` uses 7.5 TB/s for H100/H200 (a public microbenchmark measured ~5.5 TB/s
on the 114-SM H100 PCIe; scaled by SM count and clock); :func:`report` shows the sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Share of the L2 that re-read data may occupy and still hit (the configs use the same number).
L2_SHARE = 0.6


@dataclass(frozen=True)
class Device:
    """Bandwidth and size figures of one GPU: data-sheet HBM bandwidth and matrix peak, L2 size as the device
    reports it, L2 bandwidth assumed (see the module docstring)."""

    name: str
    hbm_bw: float  # bytes/s
    l2_bytes: int
    l2_bw: float  # bytes/s between L2 and the SMs, assumed
    sms: int
    mma_flops: float  # dense bf16/fp16 tensor-core FLOP/s

    def with_l2_bw(self, bw: float) -> Device:
        return replace(self, l2_bw=bw)


DEVICES: dict[str, Device] = {
    "H100": Device("H100 SXM", 3.35e12, 50 << 20, 7.5e12, 132, 989e12),
    "H200": Device("H200", 4.8e12, 60_000_000, 7.5e12, 132, 989e12),
    "A100": Device("A100 SXM", 2.04e12, 40 << 20, 4.8e12, 108, 312e12),
}


#: How much more than its fair share (1/SMs) of the device bandwidth one busy multiprocessor can pull: a grid with
#: fewer programs than SMs reaches at most programs × this / SMs of the bandwidth.
SM_BW_SHARE = 1.5


@dataclass(frozen=True)
class Traffic:
    """Bytes and FLOPs of one kernel launch (or, added up, of several run one after the other).

    ``share`` is the fraction of the device's bandwidth and matrix throughput the launch can reach with its
    programs in flight; ``balance`` ≥ 1 the slowdown from uneven work among persistent programs (the busiest does
    ⌈blocks / programs⌉ row blocks, the average blocks / programs).
    """

    hbm: float = 0.0
    l2: float = 0.0
    flops: float = 0.0
    share: float = 1.0
    balance: float = 1.0
    parts: tuple[Traffic, ...] = ()

    def __add__(self, other: Traffic) -> Traffic:
        mine = self.parts or (self,)
        theirs = other.parts or (other,)
        return Traffic(
            self.hbm + other.hbm, self.l2 + other.l2, self.flops + other.flops, parts=mine + theirs
        )

    def time(self, dev: Device) -> float:
        if self.parts:
            return sum(p.time(dev) for p in self.parts)
        ceiling = max(self.hbm / dev.hbm_bw, self.l2 / dev.l2_bw, self.flops / dev.mma_flops)
        return ceiling / self.share * self.balance

    def pct_of_floor(self, floor: float, dev: Device) -> float:
        """Predicted % of the HBM floor: the floor's time at full HBM bandwidth over this traffic's time."""
        return 100.0 * (floor / dev.hbm_bw) / self.time(dev)

    def bound(self, dev: Device) -> str:
        if self.parts:
            return "+".join(p.bound(dev) for p in self.parts)
        times = {"HBM": self.hbm / dev.hbm_bw, "L2": self.l2 / dev.l2_bw, "MMA": self.flops / dev.mma_flops}
        return max(times, key=times.__getitem__)


def occupancy(programs: int, blocks: int, dev: Device) -> tuple[float, float]:
    """(share, balance) of a grid of ``programs`` over ``blocks`` units of work (see :class:`Traffic`)."""
    programs = max(1, min(programs, blocks))
    share = min(1.0, programs * SM_BW_SHARE / dev.sms)
    balance = (-(-blocks // programs)) / (blocks / programs)
    return share, balance


def device_for(tgt) -> Device:
    """The model's figures for a launcher :class:`~fxadapt.kernels._common.Target` (by capability and L2 size;
    unknown parts get A100-like ratios scaled to their SM count)."""
    if tgt.capability >= 90:
        return DEVICES["H200"] if tgt.l2 >= 55_000_000 else DEVICES["H100"]
    if tgt.capability == 80:
        return DEVICES["A100"]
    return Device(f"sm_{tgt.capability}", 0.9e12, tgt.l2, 2.5e12, tgt.sms, 150e12)


def hit_rate(footprint: float, dev: Device) -> float:
    """Fraction of a re-read served by L2 when ``footprint`` bytes pass through L2 between the two reads."""
    cap = L2_SHARE * dev.l2_bytes
    return 1.0 if footprint <= cap else cap / footprint


def weights_bytes(d: int, r: int, e: int, adapters: int = 1) -> int:
    """Wd, Wu, bd, bu of every adapter of the bank."""
    return adapters * (2 * r * d + r + d) * e


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck: y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu), rows N, width d, rank r, element size e.
def bottleneck_floor(
    n: int, d: int, r: int, e: int, mode: str, *, residual: bool = False, adapters: int = 1
) -> float:
    """fwd: read x (+ residual), write y, the weights, save h (fp32). no-grad: without h. bwd: read dy, x, h,
    write dx, read the weights and write their gradients. fwd+bwd: both."""
    w = weights_bytes(d, r, e, adapters)
    fwd = (3 if residual else 2) * n * d * e + w
    bwd = 3 * n * d * e + 4 * n * r + 2 * w
    return {"fwd": fwd + 4 * n * r, "no-grad": fwd, "bwd": bwd, "fwd+bwd": fwd + 4 * n * r + bwd}[mode]


def bottleneck_eager(n: int, d: int, r: int, e: int, mode: str) -> float:
    """The five eager ops (linear, act, linear, mul, add) and their autograd: each round-trips its operands.

    fwd ≈ 7·N·d·e: linear reads x (1), writes up (1); mul reads up, writes (2); add reads two, writes one (3).
    bwd ≈ 10·N·d·e: mul (2), d(up)·Wu and d(up)ᵀg and Σ d(up) read d(up) three times (3), dh·Wd writes (1),
    dhᵀx reads x (1), dx + dy reads two and writes one (3); the [N, r] intermediates are small.
    """
    small = 8 * n * r * e
    w = weights_bytes(d, r, e)
    fwd, bwd = 7 * n * d * e + small + w, 10 * n * d * e + small + 2 * w
    return {"fwd": fwd, "no-grad": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def bottleneck_fwd(
    n: int,
    d: int,
    r: int,
    e: int,
    dev: Device,
    *,
    bm: int,
    programs: int,
    residual: bool = False,
    adapters: int = 1,
) -> Traffic:
    """``_bn_fwd``: phase 1 reads the x tile (d-chunk by d-chunk) and Wd, phase 2 reads Wu and the residual and
    writes y. With no separate residual, phase 2 re-reads the x tile: it hits L2 if the tiles in flight fit."""
    w = weights_bytes(d, r, e, adapters)
    blocks = -(-n // bm)
    xd = n * d * e
    reread = 0.0 if residual else xd * (1.0 - hit_rate(min(programs, blocks) * bm * d * e, dev))
    hbm = xd + (xd if residual else reread) + xd + 4 * n * r + w
    l2 = 3 * xd + 4 * n * r + blocks * w  # x, x again (or residual), y; every row block streams the weights
    return Traffic(hbm, l2, 4.0 * n * d * r, *occupancy(programs, blocks, dev))


def bottleneck_bwd(
    n: int,
    d: int,
    r: int,
    e: int,
    dev: Device,
    *,
    bm: int,
    programs: int,
    bd: int,
    split: int,
    adapters: int = 1,
) -> Traffic:
    """``_bn_bwd_row`` (dh from dy, Wu, h) then ``_bn_bwd_col`` (dx, Σdhᵀx, Σact(h)ᵀdy, Σdy per column block,
    rows last to first). The column kernel re-reads h and dh once per column block (from L2) and dy (from L2 for
    the part the row kernel left there); its split partials are written and summed once."""
    w = weights_bytes(d, r, e, adapters)
    xd = n * d * e
    blocks = -(-n // bm)
    row = Traffic(
        xd + 8 * n * r + w / 2,
        xd + 8 * n * r + blocks * w / 2,
        2.0 * n * d * r,
        *occupancy(programs, blocks, dev),
    )
    dy_again = xd * (1.0 - hit_rate(xd, dev))
    partials = 2 * split * adapters * (2 * r * d + d + r) * 4
    col_blocks = -(-d // bd)
    col = Traffic(
        dy_again + 2 * xd + partials + w,
        3 * xd + col_blocks * 8 * n * r + partials + w,
        2.0 * n * d * r * (1 + 2 + 2),  # dx, and the two weight-gradient sums as hi + lo dots (half inputs)
        *occupancy(col_blocks * split, col_blocks * split, dev),
    )
    return row + col


def headline(dev: Device, n: int = 8192, d: int = 4096, r: int = 64, e: int = 2) -> dict[str, float]:
    """The docs/design.md §6 shape under this model, with the tiles the configs pick for it (see ``_configs``)."""
    from . import _configs
    from ._common import Target

    tgt = Target(90, 232_448, dev.sms, dev.l2_bytes)
    cfg = min(
        _configs.row_candidates(tgt, n, d, r, e),
        key=lambda c: bottleneck_fwd(
            n, d, r, e, dev, bm=c["BM"], programs=_configs.row_programs(tgt, c, -(-n // c["BM"]), d, e)
        ).time(dev),
    )
    blocks = -(-n // cfg["BM"])
    programs = _configs.row_programs(tgt, cfg, blocks, d, e)
    fwd = bottleneck_fwd(n, d, r, e, dev, bm=cfg["BM"], programs=programs)
    col = _configs.col_config(tgt, n, d, r, e, 1, 1)
    bwd = bottleneck_bwd(n, d, r, e, dev, bm=cfg["BM"], programs=programs, bd=col["BD"], split=col["SPLIT"])
    f_fwd, f_all = bottleneck_floor(n, d, r, e, "fwd"), bottleneck_floor(n, d, r, e, "fwd+bwd")
    eager_all = bottleneck_eager(n, d, r, e, "fwd+bwd")
    both = fwd + bwd
    return {
        "BM": cfg["BM"],
        "programs": programs,
        "floor_fwd_MB": f_fwd / 1e6,
        "fused_fwd_hbm_MB": fwd.hbm / 1e6,
        "fused_fwd_l2_MB": fwd.l2 / 1e6,
        "fwd_pct_hbm_bytes": 100.0 * f_fwd / fwd.hbm,
        "fwd_pct_floor": fwd.pct_of_floor(f_fwd, dev),
        "fwd_bound": fwd.bound(dev),
        "fused_bwd_hbm_MB": bwd.hbm / 1e6,
        "fwdbwd_pct_floor": both.pct_of_floor(f_all, dev),
        "eager_fwdbwd_MB": eager_all / 1e6,
        "fwdbwd_speedup_vs_eager_bytes": eager_all / both.hbm,
        "fwdbwd_speedup_vs_eager_time": (eager_all / dev.hbm_bw) / both.time(dev),
    }


# ----------------------------------------------------------------------------------------------------------------
# LoRA: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ, frozen base layer.
def lora_cost(
    n: int, d_in: int, d_out: int, r: int, e: int, mode: str, adapters: int = 1
) -> tuple[float, float]:
    """(floor bytes, FLOPs). fwd: read x, W, A, B; write y; save t (fp32). bwd: read dy, W, A, B, x, t; write dx,
    dA, dB. LoRA at large N is compute-bound (the base GEMM): its rows report TFLOP/s too."""
    w = d_out * d_in * e
    ab = adapters * r * (d_in + d_out) * e
    fwd_b = n * d_in * e + w + ab + n * d_out * e
    bwd_b = n * d_out * e + w + 2 * ab + n * d_in * e + 4 * n * r + n * d_in * e
    fwd_f = 2 * n * d_in * d_out + 2 * n * r * (d_in + d_out)
    bwd_f = 2 * n * d_out * d_in + 4 * n * r * (d_in + d_out)
    nbytes = {"fwd": fwd_b + 4 * n * r, "no-grad": fwd_b, "bwd": bwd_b, "fwd+bwd": fwd_b + 4 * n * r + bwd_b}[
        mode
    ]
    flops = {"fwd": fwd_f, "no-grad": fwd_f, "bwd": bwd_f, "fwd+bwd": fwd_f + bwd_f}[mode]
    return nbytes, flops


def report(l2_bws: tuple[float, ...] = (5.5e12, 7.5e12, 10e12, 12e12)) -> str:
    """The headline predictions for H100 and H200, with the L2-bandwidth sensitivity (``python -m`` prints it)."""
    lines = []
    for key in ("H100", "H200"):
        for bw in l2_bws:
            h = headline(DEVICES[key].with_l2_bw(bw))
            lines.append(
                f"{key} (L2 {bw / 1e12:.1f} TB/s): BM={h['BM']} programs={h['programs']} "
                f"fwd HBM {h['fused_fwd_hbm_MB']:.0f} MB vs floor {h['floor_fwd_MB']:.0f} MB "
                f"({h['fwd_pct_hbm_bytes']:.0f}% of floor bytes), L2 {h['fused_fwd_l2_MB']:.0f} MB, "
                f"predicted {h['fwd_pct_floor']:.0f}% of the HBM floor ({h['fwd_bound']}-bound); "
                f"fwd+bwd {h['fwdbwd_pct_floor']:.0f}%, {h['fwdbwd_speedup_vs_eager_time']:.1f}x eager"
            )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(report())

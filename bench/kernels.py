"""Kernel benchmarks: the fused ops against eager, addmm-based eager, torch.compile and (LoRA) PEFT.

Usage::

    python bench/kernels.py                # full sweep (GPU): bf16+fp16, d∈{768,4096,8192}, r∈{8,16,64,256},
                                           # N∈{1,16,8192}; multi-adapter with 1/8/64 adapters, uniform and zipf
    python bench/kernels.py --gpu-check    # what bench/gpu_check.sh runs: the headline shape first, then
                                           # r ∈ {8, 64, 128, 256} in bf16, fp16 and fp32, then the multi-adapter ops
    python bench/kernels.py --quick        # a small sweep; on CPU only the reference providers run (and it says so)
    python bench/kernels.py --ncu-probe    # one fused bottleneck forward+backward at the headline shape, for `ncu`
    options: --only bottleneck,lora,multi  --modes fwd,bwd,fwd+bwd,no-grad  --budget-s SECONDS  --no-plot

Rows go to ``bench/results/kernels.jsonl`` via ``harness.Bench``; a table (speedup vs the eager provider) is
printed at the end, plus PNG plots over N when matplotlib is installed. A provider that fails (out of memory, a
compile error) is recorded as skipped with its error and the sweep goes on.

Bytes: ``fxadapt.kernels.traffic`` (the one bytes model; ``docs/kernels.md`` explains it). Every row's GB/s is
the op's HBM *floor* (what no implementation can avoid: inputs read once, outputs written once) over its time, the
same bytes for every provider, so "%HBM" says how close a provider gets to the physical limit; fused bottleneck
rows also carry the model's prediction for the fused kernels ("model%": predicted % of the floor on this GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Bench

import fxadapt.kernels as K
from fxadapt.kernels import _configs, traffic
from fxadapt.kernels import reference as R
from fxadapt.kernels._common import target_of

MODES = ("fwd", "bwd", "fwd+bwd", "no-grad")


# ----------------------------------------------------------------------------------------------------------------
# Providers. Each takes the same tensors as the op and returns the output.
def bottleneck_addmm(x, w_down, b_down, w_up, b_up, scale: float, act: str):
    """Eager with GEMM epilogues: y = addmm(x + s·bu, act(addmm(bd, x, Wdᵀ)), Wuᵀ, alpha=s)."""
    x2 = x.reshape(-1, x.shape[-1])
    g = R.activation(torch.addmm(b_down, x2, w_down.t()), act)
    return torch.addmm(x2 + scale * b_up, g, w_up.t(), alpha=scale).view(x.shape)


def lora_addmm(x, weight, bias, lora_a, lora_b, scale: float):
    """Eager with the LoRA term added in the second GEMM's epilogue: addmm(x·Wᵀ + b, x·Aᵀ, Bᵀ, alpha=s)."""
    x2 = x.reshape(-1, x.shape[-1])
    base = F.linear(x2, weight, bias)
    return torch.addmm(base, x2 @ lora_a.t(), lora_b.t(), alpha=scale).view(*x.shape[:-1], -1)


def peft_lora(weight, bias, lora_a, lora_b, scale: float):
    """PEFT's LoRA ``Linear`` wrapping an ``nn.Linear`` with the same weights (dropout 0); None if PEFT is missing."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear
    except ImportError:
        return None
    d_out, d_in = weight.shape
    r = lora_a.shape[0]
    base = torch.nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    base.weight.data.copy_(weight)
    base.weight.requires_grad_(False)
    if bias is not None:
        base.bias.data.copy_(bias)
        base.bias.requires_grad_(False)
    alpha = scale * r  # PEFT's scaling = lora_alpha / r
    layer = Linear(
        base, "default", config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0), r=r, lora_alpha=alpha
    )
    layer.lora_A["default"].weight.data.copy_(lora_a)
    layer.lora_B["default"].weight.data.copy_(lora_b)
    return layer.to(weight.device, weight.dtype)


# ----------------------------------------------------------------------------------------------------------------
def _leaves(tensors: list) -> list[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def run_modes(bench: Bench, f: Callable[[], torch.Tensor], leaves: list[torch.Tensor], modes, **row) -> None:
    """Time ``f`` (one forward) in each mode. bwd: the forward runs untimed in ``setup`` before every rep."""
    params = [p for p in leaves]
    state: dict[str, torch.Tensor] = {}

    def clear():
        for p in params:
            p.grad = None

    for mode in modes:
        if mode == "fwd":
            bench.measure(f, mode=mode, **row)
        elif mode == "no-grad":

            def nograd():
                with torch.no_grad():
                    f()

            bench.measure(nograd, mode=mode, **row)
        elif mode == "bwd":
            out = f()
            dy = torch.randn_like(out)

            def setup():
                clear()
                state["y"] = f()

            bench.measure(lambda dy=dy: state["y"].backward(dy), mode=mode, setup=setup, **row)
        elif mode == "fwd+bwd":
            out = f()
            dy = torch.randn_like(out)
            bench.measure(lambda dy=dy: f().backward(dy), mode=mode, setup=clear, **row)
        state.clear()
        clear()


def _bytes_bottleneck(n, d, r, e, mode, adapters=1):
    return traffic.bottleneck_floor(n, d, r, e, mode, adapters=adapters)


def _lora_cost(n, d_in, d_out, r, e, mode, adapters=1):
    return traffic.lora_cost(n, d_in, d_out, r, e, mode, adapters)


def _model_device(device_name: str) -> traffic.Device | None:
    for key in ("H200", "H100", "A100"):
        if key in device_name:
            return traffic.DEVICES[key]
    return None


def bottleneck_prediction(x: torch.Tensor, n: int, d: int, r: int, mode: str) -> dict | None:
    """The bytes model's prediction for the fused bottleneck with the tiles the launchers pick on this GPU."""
    if mode == "no-grad" or x.device.type != "cuda":
        return None
    dev = _model_device(torch.cuda.get_device_name(x.device))
    if dev is None:
        return None
    tgt, e = target_of(x), x.element_size()
    cfg = _configs.row_config(tgt, n, d, r, e)
    programs = _configs.row_programs(tgt, cfg, -(-n // cfg["BM"]), d, e)
    col = _configs.col_config(tgt, n, d, r, e, 1, 1)
    fwd = traffic.bottleneck_fwd(n, d, r, e, dev, bm=cfg["BM"], programs=programs)
    bwd = traffic.bottleneck_bwd(
        n, d, r, e, dev, bm=cfg["BM"], programs=programs, bd=col["BD"], split=col["SPLIT"]
    )
    t = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]
    return {
        "pct_floor": t.pct_of_floor(traffic.bottleneck_floor(n, d, r, e, mode), dev),
        "hbm_bytes": t.hbm,
        "l2_bytes": t.l2,
        "bound": t.bound(dev),
        "BM": cfg["BM"],
        "programs": programs,
        "l2_bw_assumed": dev.l2_bw,
    }


class Runner:
    def __init__(self, bench: Bench, modes, budget_s: float, fused: bool, compiled_min_n: int):
        self.bench, self.modes, self.fused, self.compiled_min_n = bench, modes, fused, compiled_min_n
        self.deadline = time.perf_counter() + budget_s
        self.device = bench.device
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def out_of_time(self) -> bool:
        if time.perf_counter() > self.deadline:
            self.bench.note("time budget exhausted: the sweep stopped early")
            return True
        return False

    def randn(self, *shape, dtype, std=1.0, grad=False):
        t = (torch.randn(shape, generator=self.gen) * std).to(self.device, dtype)
        return t.requires_grad_(grad)

    def _each_mode(self, what, provider, f, leaves, shape, dtype, cost, baseline="eager", model=None):
        for mode in self.modes:
            nbytes, flops = cost(mode)
            try:
                run_modes(self.bench, f, leaves, (mode,), what=what, provider=provider, shape=shape, dtype=dtype,
                          nbytes=nbytes, flops=flops, baseline=baseline,
                          model=None if model is None else model(mode))  # fmt: skip
            except Exception as exc:  # a failing provider is a result, not the end of the sweep
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                    torch.cuda.empty_cache()
                self.bench.skip(what=what, provider=provider, mode=mode, shape=shape, dtype=dtype,
                                reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")  # fmt: skip
                print(
                    f"  FAILED {what}/{provider}/{mode} {shape}: {type(exc).__name__}: {exc}"[:400],
                    flush=True,
                )

    def bottleneck(self, n, d, r, dtype):
        torch._dynamo.reset()  # a fresh compile cache per shape (the recompile limit would silently fall back)
        e = torch.finfo(dtype).bits // 8
        x = self.randn(n, d, dtype=dtype, grad=True)
        wd, bd = self.randn(r, d, dtype=dtype, std=d**-0.5, grad=True), self.randn(r, dtype=dtype, grad=True)
        wu, bu = self.randn(d, r, dtype=dtype, std=d**-0.5, grad=True), self.randn(d, dtype=dtype, grad=True)
        s, act = 0.5, "relu"
        shape = {"N": n, "d": d, "r": r}
        providers = {
            "eager": lambda: R.bottleneck_ref(x, wd, bd, wu, bu, s, act),
            "addmm": lambda: bottleneck_addmm(x, wd, bd, wu, bu, s, act),
        }
        if n >= self.compiled_min_n:
            compiled = torch.compile(R.bottleneck_ref, dynamic=False)
            providers["compiled"] = lambda: compiled(x, wd, bd, wu, bu, s, act)
        if self.fused:
            providers["fused"] = lambda: K.bottleneck(x, wd, bd, wu, bu, s, act)
        for name, f in providers.items():
            model = (lambda mode: bottleneck_prediction(x, n, d, r, mode)) if name == "fused" else None
            self._each_mode("bottleneck", name, f, [x, wd, bd, wu, bu], shape, dtype,
                            lambda mode: (_bytes_bottleneck(n, d, r, e, mode), None), model=model)  # fmt: skip

    def lora(self, n, d, r, dtype):
        torch._dynamo.reset()
        e = torch.finfo(dtype).bits // 8
        x = self.randn(n, d, dtype=dtype, grad=True)
        w, b = self.randn(d, d, dtype=dtype, std=d**-0.5), self.randn(d, dtype=dtype)
        a, bb = (
            self.randn(r, d, dtype=dtype, std=d**-0.5, grad=True),
            self.randn(d, r, dtype=dtype, std=d**-0.5, grad=True),
        )
        s = 2.0
        shape = {"N": n, "d": d, "r": r}
        providers = {
            "eager": lambda: R.lora_ref(x, w, b, a, bb, s),
            "addmm": lambda: lora_addmm(x, w, b, a, bb, s),
        }
        if n >= self.compiled_min_n:
            compiled = torch.compile(R.lora_ref, dynamic=False)
            providers["compiled"] = lambda: compiled(x, w, b, a, bb, s)
        layer = peft_lora(w, b, a.detach(), bb.detach(), s)
        leaves = [x, a, bb]
        if layer is None:
            self.bench.note("PEFT is not installed: no 'peft' provider")
        else:
            peft_leaves = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        if self.fused:
            providers["fused"] = lambda: K.lora_linear(x, w, b, a, bb, s)
        for name, f in providers.items():
            self._each_mode(
                "lora", name, f, leaves, shape, dtype, lambda mode: _lora_cost(n, d, d, r, e, mode)
            )
        if layer is not None:
            self._each_mode("lora", "peft", lambda: layer(x), peft_leaves, shape, dtype,
                            lambda mode: _lora_cost(n, d, d, r, e, mode))  # fmt: skip

    def multi(self, n, d, r, adapters, routing, dtype):
        e = torch.finfo(dtype).bits // 8
        if routing == "uniform":
            ids = torch.randint(0, adapters, (n,), generator=self.gen)
        else:  # zipf(1.1): adapter a gets rows ∝ (a+1)^-1.1, the skew of real multi-tenant traffic
            p = torch.arange(1, adapters + 1, dtype=torch.float64) ** -1.1
            ids = torch.multinomial(p, n, replacement=True, generator=self.gen)
        ids = ids.to(self.device)
        x = self.randn(n, d, dtype=dtype, grad=True)
        wd, bd = (
            self.randn(adapters, r, d, dtype=dtype, std=d**-0.5, grad=True),
            self.randn(adapters, r, dtype=dtype, grad=True),
        )
        wu, bu = (
            self.randn(adapters, d, r, dtype=dtype, std=d**-0.5, grad=True),
            self.randn(adapters, d, dtype=dtype, grad=True),
        )
        sc = self.randn(adapters, dtype=dtype, grad=True)
        shape = {"N": n, "d": d, "r": r, "A": adapters, "routing": routing}
        leaves = [x, wd, bd, wu, bu, sc]
        providers = {"loop": lambda: R.bottleneck_multi_ref(x, ids, wd, bd, wu, bu, sc, "relu")}
        if self.fused:
            providers["fused"] = lambda: K.bottleneck_multi(x, ids, wd, bd, wu, bu, sc, "relu")
        for name, f in providers.items():
            self._each_mode("bottleneck_multi", name, f, leaves, shape, dtype,
                            lambda mode: (_bytes_bottleneck(n, d, r, e, mode, adapters), None), baseline="loop")  # fmt: skip
        w, b = self.randn(d, d, dtype=dtype, std=d**-0.5), self.randn(d, dtype=dtype)
        la = self.randn(adapters, r, d, dtype=dtype, std=d**-0.5, grad=True)
        lb = self.randn(adapters, d, r, dtype=dtype, std=d**-0.5, grad=True)
        providers = {"loop": lambda: R.lora_multi_ref(x, ids, w, b, la, lb, sc)}
        if self.fused:
            providers["fused"] = lambda: K.lora_multi(x, ids, w, b, la, lb, sc)
        for name, f in providers.items():
            self._each_mode("lora_multi", name, f, [x, la, lb, sc], shape, dtype,
                            lambda mode: _lora_cost(n, d, d, r, e, mode, adapters), baseline="loop")  # fmt: skip


def jobs(quick: bool, on_gpu: bool, gpu_check: bool = False) -> list[tuple]:
    """The sweep as an ordered job list, most important first (a --budget-s cut drops the tail):
    ("single", N, d, r, dtype) runs bottleneck and LoRA; ("multi", N, d, r, A, routing, dtype) both multi ops."""
    bf16, fp16 = torch.bfloat16, torch.float16
    if (
        gpu_check
    ):  # bench/gpu_check.sh: the headline shape, then every rank tier the check covers, every dtype
        out = [("single", 8192, 4096, 64, bf16)]
        out += [
            ("single", 8192, 4096, r, dt) for dt in (bf16, fp16, torch.float32) for r in (8, 64, 128, 256)
        ]
        out += [("multi", 8192, 4096, 16, a, "zipf", bf16) for a in (8, 64)]
        out += [("single", n, 4096, 16, bf16) for n in (16, 1)]
        seen: set = set()
        return [j for j in out if not (j in seen or seen.add(j))]
    if quick and not on_gpu:
        single = [("single", n, 768, r, bf16) for r in (8, 64) for n in (1, 16, 1024)]
        multi = [
            ("multi", 1024, 768, 16, a, routing, bf16) for a in (1, 8) for routing in ("uniform", "zipf")
        ]
        return single + multi
    if quick:
        single = [
            ("single", *s, bf16) for s in ((8192, 4096, 64), (8192, 4096, 16), (16, 4096, 16), (1, 4096, 16))
        ]
        return single + [("multi", 8192, 4096, 16, a, "uniform", bf16) for a in (1, 8, 64)]
    out: list[tuple] = []
    for dtype in (bf16, fp16):
        out.append(("single", 8192, 4096, 64, dtype))  # the docs/design.md §6 headline shape
        out += [
            ("multi", 8192, 4096, 16, a, routing, dtype) for a in (8, 64) for routing in ("uniform", "zipf")
        ]
        out += [("single", n, d, 16, dtype) for d in (4096, 768, 8192) for n in (8192, 16, 1)]
        out += [("single", 8192, 4096, r, dtype) for r in (8, 256)]
        out += [("multi", 8192, 4096, 16, 1, routing, dtype) for routing in ("uniform", "zipf")]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="small sweep (on CPU: reference providers only)")
    ap.add_argument(
        "--gpu-check", action="store_true", help="bench/gpu_check.sh's job list (see the docstring)"
    )
    ap.add_argument(
        "--ncu-probe", action="store_true", help="one fused fwd+bwd at the headline shape, for ncu"
    )
    ap.add_argument("--only", default="bottleneck,lora,multi", help="comma-separated: bottleneck,lora,multi")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument(
        "--budget-s", type=float, default=float("inf"), help="stop starting new shapes after this"
    )
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument(
        "--plot-summary", nargs=2, metavar=("JSONL", "PNG"), help="one summary figure of a run's rows"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU runs: torch threads (1 is the least noisy on a shared CPU)",
    )
    args = ap.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    only = set(args.only.split(","))
    if args.ncu_probe:
        return ncu_probe()
    if args.plot_summary:
        return plot_summary(Path(args.plot_summary[0]), Path(args.plot_summary[1]))

    bench = Bench("kernels")
    on_gpu = bench.device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
        bench.note(f"torch.set_num_threads({args.threads})")
    fused = on_gpu and K.can_use_triton(torch.empty(1, device=bench.device, dtype=torch.bfloat16))[0]
    if not on_gpu:
        bench.note("CPU run: reference providers only (the fused ops would run the reference fallback here)")
        if not args.quick:
            bench.note("no GPU: pass --quick for the CPU sweep; running it anyway")
    elif not fused:
        why = K.can_use_triton(torch.empty(1, device=bench.device, dtype=torch.bfloat16))[1]
        bench.note(f"fused provider unavailable: {why}")
    compiled_min_n = (
        1024 if not on_gpu else 8192
    )  # torch.compile per shape is slow; keep it to the large-N rows
    runner = Runner(bench, modes, args.budget_s, fused, compiled_min_n)
    todo = jobs(args.quick, on_gpu, args.gpu_check)
    print(f"kernels bench on {bench.device_name}: {len(todo)} jobs, modes {modes}", flush=True)
    for job in todo:
        if runner.out_of_time():
            break
        if args.gpu_check and job is not todo[0]:
            runner.compiled_min_n = 1 << 60  # torch.compile costs ~30 s per shape: the headline job only
        if job[0] == "single":
            _, n, d, r, dtype = job
            if "bottleneck" in only:
                runner.bottleneck(n, d, r, dtype)
            if "lora" in only:
                runner.lora(n, d, r, dtype)
        elif "multi" in only:
            runner.multi(*job[1:])
    bench.table()
    if not args.no_plot:
        for path in bench.plot(x="N"):
            print(f"plot: {path}")
    print(f"rows appended to {bench.path}")
    return 0


def plot_summary(jsonl: Path, png: Path) -> int:
    """% of the HBM floor by rank for every (op, mode, dtype), one line per provider: the gpu_check figure."""
    import json

    try:
        import matplotlib
    except ImportError:
        print("plot: matplotlib is not installed; no summary figure", flush=True)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = [
        r
        for r in rows
        if r.get("pct_hbm") is not None and r["shape"].get("N") == 8192 and "A" not in r["shape"]
    ]
    panels = sorted({(r["what"], r["mode"]) for r in rows})
    if not panels:
        print("plot: no GPU rows with % of the HBM floor", flush=True)
        return 1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (what, mode) in zip(axes[0], panels):
        sub = [r for r in rows if r["what"] == what and r["mode"] == mode]
        for prov, dt in sorted({(r["provider"], r["dtype"]) for r in sub}):
            pts = sorted(
                (r["shape"]["r"], r["pct_hbm"]) for r in sub if r["provider"] == prov and r["dtype"] == dt
            )
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"{prov} {dt}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r (N=8192, d=4096)")
        ax.set_ylabel("% of HBM floor")
        ax.set_title(f"{what} {mode}", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle(rows[0]["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}", flush=True)
    return 0


def ncu_probe(n: int = 8192, d: int = 4096, r: int = 64) -> int:
    """Three fused bottleneck forward+backward calls at the headline shape (bf16), then the model's predicted HBM
    bytes per launch — run under ``ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum`` to compare."""
    if not torch.cuda.is_available():
        print("ncu probe: no CUDA GPU", flush=True)
        return 2
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(dev, torch.bfloat16).requires_grad_()
    wd = (torch.randn(r, d, generator=g) * d**-0.5).to(dev, torch.bfloat16).requires_grad_()
    wu = (torch.randn(d, r, generator=g) * d**-0.5).to(dev, torch.bfloat16).requires_grad_()
    bd, bu = (
        torch.zeros(r, device=dev, dtype=torch.bfloat16),
        torch.zeros(d, device=dev, dtype=torch.bfloat16),
    )
    for _ in range(3):
        y = K.bottleneck(x, wd, bd, wu, bu, 0.5, "relu")
        y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    for mode in ("fwd", "bwd"):
        pred = bottleneck_prediction(x, n, d, r, mode)
        print(f"ncu probe: model {mode}: {pred}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

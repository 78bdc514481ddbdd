"""Kernel benchmarks: the fused ops against eager, addmm-based eager, torch.compile and (LoRA) PEFT.

Usage::

    python bench/kernels.py                # full sweep (GPU): bf16+fp16, d∈{768,4096,8192}, r∈{8,16,64,256},
                                           # N∈{1,16,8192}; multi-adapter with 1/8/64 adapters, uniform and zipf
    python bench/kernels.py --quick        # a small sweep; on CPU only the reference providers run (and it says so)
    options: --only bottleneck,lora,multi  --modes fwd,bwd,fwd+bwd,no-grad  --budget-s SECONDS  --no-plot

Rows go to ``bench/results/kernels.jsonl`` via ``harness.Bench``; a table (speedup vs the eager provider) is
printed at the end, plus PNG plots over N when matplotlib is installed.

Bytes model — the *floor*: the HBM traffic no implementation can avoid, the same for every provider, so GB/s is an
effective bandwidth and "% HBM" says how close a provider gets to the physical limit (e = element size):

  bottleneck, rows N, width d, rank r
    fwd      read x (+ residual), write y: 2·N·d·e; weights 2·r·d·e (+ biases (r+d)·e); save h: 4·N·r
    no-grad  the same without h
    bwd      read dy, x, h; write dx: 3·N·d·e + 4·N·r; weights read + their gradients written: 2·(2·r·d + r + d)·e
    fwd+bwd  fwd + bwd
    (For comparison, the eager 5-op forward — linear, act, linear, mul, add — moves ≈ 7·N·d·e: each op
    round-trips an [N, d] tensor; at N=8192, d=4096, r=64 bf16: ≈ 470 MB against a 137 MB floor.)

  LoRA, rows N, d_in → d_out, rank r (frozen base layer)
    fwd      read x: N·d_in·e, W: d_out·d_in·e, A and B: r·(d_in+d_out)·e; write y: N·d_out·e; save t: 4·N·r
    bwd      read dy: N·d_out·e, W, A, B, x (for dA), t; write dx: N·d_in·e, dA and dB
    FLOPs    fwd 2·N·d_in·d_out + 2·N·r·(d_in+d_out); bwd 2·N·d_out·d_in + 4·N·r·(d_in+d_out)
    (LoRA at large N is compute-bound: its rows report TFLOP/s too.)

  multi-adapter: as the single-adapter op, with every adapter of the bank's weights counted once.
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
import fxadapt.kernels as K
from fxadapt.kernels import reference as R
from harness import Bench

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
    w = adapters * (2 * r * d + r + d) * e
    fwd = 2 * n * d * e + w
    bwd = 3 * n * d * e + 4 * n * r + 2 * w
    return {"fwd": fwd + 4 * n * r, "no-grad": fwd, "bwd": bwd, "fwd+bwd": fwd + 4 * n * r + bwd}[mode]


def _lora_cost(n, d_in, d_out, r, e, mode, adapters=1):
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

    def _each_mode(self, what, provider, f, leaves, shape, dtype, cost, baseline="eager"):
        for mode in self.modes:
            nbytes, flops = cost(mode)
            run_modes(self.bench, f, leaves, (mode,), what=what, provider=provider, shape=shape, dtype=dtype,
                      nbytes=nbytes, flops=flops, baseline=baseline)  # fmt: skip

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
            self._each_mode("bottleneck", name, f, [x, wd, bd, wu, bu], shape, dtype,
                            lambda mode: (_bytes_bottleneck(n, d, r, e, mode), None))  # fmt: skip

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


def jobs(quick: bool, on_gpu: bool) -> list[tuple]:
    """The sweep as an ordered job list, most important first (a --budget-s cut drops the tail):
    ("single", N, d, r, dtype) runs bottleneck and LoRA; ("multi", N, d, r, A, routing, dtype) both multi ops."""
    bf16, fp16 = torch.bfloat16, torch.float16
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
        out.append(("single", 8192, 4096, 64, dtype))  # the DESIGN §6 headline shape
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
    ap.add_argument("--only", default="bottleneck,lora,multi", help="comma-separated: bottleneck,lora,multi")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument(
        "--budget-s", type=float, default=float("inf"), help="stop starting new shapes after this"
    )
    ap.add_argument("--no-plot", action="store_true")
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
    todo = jobs(args.quick, on_gpu)
    print(f"kernels bench on {bench.device_name}: {len(todo)} jobs, modes {modes}", flush=True)
    for job in todo:
        if runner.out_of_time():
            break
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


if __name__ == "__main__":
    sys.exit(main())

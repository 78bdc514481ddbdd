"""GPU-free compile check: every kernel specialisation the launchers plan, compiled for real GPU targets.

No GPU is needed. A stand-in Triton driver reports the target (sm_90 for H100/H200, sm_80 for A100, …); the
launchers run on ``meta`` tensors (no data, no arithmetic) with :data:`_common.TARGET_OVERRIDE` set, and every
launch they make reaches :data:`_triton_common.LAUNCH_HOOK` instead of a GPU. Each distinct specialisation — kernel
source, constexprs (tiles, flags, ``num_warps``, ``num_stages``), argument dtypes and Triton's integer/alignment
specialisation — is compiled with Triton's own compiler and bundled ``ptxas`` to a cubin, and checked:

* shared memory ≤ the target's per-program limit (a launch above it raises ``OutOfResources``);
* registers × threads ≤ 65,536 (the register file one program may use);
* no register spills for fp16/bf16 programs; fp32 programs (IEEE dots, no tensor cores) may spill up to
  :data:`FP32_SPILL_LIMIT` bytes per thread (documented in ``docs/kernels.md``).

Compiling costs ~1–2 s per specialisation, so results are cached by a key of everything that determines the
compiled code (Triton's source hash of the kernel and the functions it calls, the specialisation, the target and
the Triton version): a committed cache (``tests/kernels/compile_cache.json``, regenerated with
``python -m fxadapt.kernels.compile_check --update-cache``) and a per-user one (``~/.cache/fxadapt``). A cache hit
is exactly what a compile would return; any change to a kernel's source changes its key and recompiles it.

Which specialisations: :func:`scenarios` drives the real launchers over every tile tier they can choose (rank tiers
16…256, row-block tiers from decode-sized to 8k-token batches, single adapter and banks with a schedule) in every
dtype, with every optional input present (bias, residual, per-channel/per-adapter scale: the most registers and
loads), plus the exact calls of the benchmark and of the kernel tests' large cases. Removing an optional input only
removes loads and arithmetic; the config table, not the flags, decides tiles and stages.

Run: ``python -m fxadapt.kernels.compile_check [--target 90 --target 80] [--json OUT]`` with ``TRITON_INTERPRET``
unset. Exit status 1 when any specialisation breaks a limit (each is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import _common

#: Spill bytes (stores) per thread allowed for fp32 programs. IEEE fp32 dots run on the CUDA cores with operands
#: in registers; a few hundred bytes of spill there cost little next to the fp32 arithmetic itself.
FP32_SPILL_LIMIT = 1024

#: Registers one program may use (65,536 32-bit registers per multiprocessor, one program per multiprocessor at most).
REGISTER_FILE = 65_536

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Scenarios: calls of the real launchers on meta tensors.
@dataclass(frozen=True)
class Scenario:
    """One call of a launcher family: ``op`` is ``bottleneck`` or ``lora``; ``n`` rows, ``d`` (LoRA: ``d_in``,
    ``d_out``), rank ``r``, ``adapters`` (banks; ids routed when > 1 or ``ids``), and the optional inputs."""

    op: str
    n: int
    d: int
    r: int
    dtype: str
    d_out: int = 0
    adapters: int = 1
    ids: bool = False
    act: int = 2  # gelu (erf): the longest activation code path
    bias: bool = True
    scale: str = "tensor"  # "float" | "tensor" (per channel for one bottleneck, per adapter for banks)
    residual: bool = True
    why: str = "tier"

    def label(self) -> str:
        shape = f"{self.n}x{self.d}" + (f"->{self.d_out}" if self.op == "lora" else "") + f" r={self.r}"
        bank = f" A={self.adapters}{'+ids' if self.ids else ''}" if self.adapters > 1 or self.ids else ""
        return f"{self.op} {shape} {self.dtype}{bank} ({self.why})"


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def run_scenario(s: Scenario) -> None:
    """Run forward and backward of one scenario through the launchers (launches go to the hook)."""
    dt = _DTYPES[s.dtype]
    ids = torch.empty((s.n,), dtype=torch.long, device="meta") if s.ids or s.adapters > 1 else None
    a = s.adapters
    if s.op == "bottleneck":
        from . import _triton_bottleneck as tb

        x = _meta(s.n, s.d, dtype=dt)
        wd, wu = _meta(a, s.r, s.d, dtype=dt), _meta(a, s.d, s.r, dtype=dt)
        bd = _meta(a, s.r, dtype=dt) if s.bias else None
        bu = _meta(a, s.d, dtype=dt) if s.bias else None
        sc = None if s.scale == "float" else _meta(s.d if a == 1 else a, dtype=dt)
        res = _meta(s.n, s.d, dtype=dt) if s.residual else None
        y, h = tb.forward(x, wd, bd, wu, bu, 0.5, sc, s.act, res, ids)
        tb.backward(y, x, wd, bd, wu, bu, h, 0.5, sc, s.act, not s.residual, True, True, sc is not None, ids)
    elif s.op == "lora":
        from . import _triton_lora as tl_

        x = _meta(s.n, s.d, dtype=dt)
        w = _meta(s.d_out, s.d, dtype=dt)
        b = _meta(s.d_out, dtype=dt) if s.bias else None
        la, lb = _meta(a, s.r, s.d, dtype=dt), _meta(a, s.d_out, s.r, dtype=dt)
        st = None if s.scale == "float" else _meta(a, dtype=dt)
        y, t = tl_.forward(x, w, b, la, lb, 2.0, st, ids)
        tl_.backward(y, x, w, la, lb, t, 2.0, st, True, True, True, st is not None, ids)
    else:  # pragma: no cover - scenario tables are ours
        raise ValueError(f"unknown scenario op {s.op!r}")


RANKS = (1, 16, 32, 64, 128, 256)  # every rank tier, and rank 1 (Triton specialises an argument equal to 1)


def scenarios() -> list[Scenario]:
    """Every tile tier the launchers can choose, in every dtype, plus the benchmark's and the tests' big calls."""
    out: list[Scenario] = []
    for dtype in _DTYPES:
        for r in RANKS:
            for n, d in ((8192, 4096), (16, 4096), (1151, 200)):  # prefill-sized, decode-sized, ragged
                out.append(Scenario("bottleneck", n, d, r, dtype))
                out.append(Scenario("lora", n, d, r, dtype, d_out=d + (8 if d % 16 else 0)))
            # Banks: many adapters with few rows each (small row blocks), and few adapters with many rows.
            out.append(Scenario("bottleneck", 8192, 1024, r, dtype, adapters=64))
            out.append(Scenario("bottleneck", 1024, 768, r, dtype, adapters=8))
            out.append(Scenario("lora", 8192, 1024, r, dtype, d_out=1024, adapters=64))
            out.append(Scenario("lora", 1024, 768, r, dtype, d_out=768, adapters=8))
    # The benchmark's jobs (bench/kernels.py) and gpu_check.sh's rank sweep, as called there.
    for dtype in ("bf16", "fp16"):
        for r in (8, 16, 64, 128, 256):
            for n, d in ((8192, 4096), (16, 4096), (1, 4096), (8192, 768), (8192, 8192)):
                out.append(
                    Scenario("bottleneck", n, d, r, dtype, act=1, scale="float", residual=False, why="bench")
                )
                out.append(
                    Scenario("lora", n, d, r, dtype, d_out=d, scale="float", residual=False, why="bench")
                )
        for a in (1, 8, 64):
            out.append(
                Scenario("bottleneck", 8192, 4096, 16, dtype, adapters=a, ids=True, act=1, why="bench")
            )
            out.append(Scenario("lora", 8192, 4096, 16, dtype, d_out=4096, adapters=a, ids=True, why="bench"))
    seen: set[Scenario] = set()
    return [s for s in out if not (s in seen or seen.add(s))]


# ----------------------------------------------------------------------------------------------------------------
# Specialisations and their compile results.
def _int_spec(v: int) -> str:
    """Triton's specialisation of an integer argument: its type, ``==1`` and ``%16==0`` (``D``)."""
    kind = "i32" if -(2**31) <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
    return f"{kind}:1" if v == 1 else (f"{kind}:D" if v % 16 == 0 else kind)


def _arg_spec(a: Any) -> str:
    if isinstance(a, torch.Tensor):
        return f"*{str(a.dtype)[6:]}{':D' if a.data_ptr() % 16 == 0 else ''}"
    if isinstance(a, bool):
        return f"b:{int(a)}"
    if isinstance(a, int):
        return _int_spec(a)
    if isinstance(a, float):
        return "fp32"
    if a is None:
        return "none"
    return type(a).__name__


@dataclass
class Spec:
    """One compile: a kernel, its argument specialisation and constexprs, for one target."""

    kernel: Any
    args: tuple
    meta: dict
    grid: tuple
    dtype: str  # the scenario's input dtype (the spill rule depends on it)
    target: int
    scenarios: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def key(self, triton_version: str) -> str:
        blob = json.dumps(
            {
                "kernel": self.name,
                "src": self.kernel.cache_key,
                "args": [_arg_spec(a) for a in self.args],
                "meta": {k: self.meta[k] for k in sorted(self.meta)},
                "target": self.target,
                "triton": triton_version,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Result:
    kernel: str
    target: int
    dtype: str
    meta: dict
    shared: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    error: str | None = None

    def violations(self, target: _common.Target) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.shared is not None and self.shared > target.smem:
            out.append(f"shared memory {self.shared:,} B > {target.smem:,} B per program")
        if self.regs is not None and self.num_warps and self.regs * 32 * self.num_warps > REGISTER_FILE:
            out.append(f"{self.regs} registers x {32 * self.num_warps} threads > {REGISTER_FILE:,}")
        spill = self.spill_stores or 0
        limit = FP32_SPILL_LIMIT if self.dtype == "fp32" else 0
        if spill > limit:
            out.append(f"{spill} B of register spill stores per thread ({self.dtype}: at most {limit} B)")
        return out

    def line(self) -> str:
        meta = " ".join(f"{k}={v}" for k, v in self.meta.items())
        if self.error:
            return f"{self.kernel:12s} sm_{self.target} {self.dtype:4s} {meta}: ERROR {self.error[:200]}"
        return (
            f"{self.kernel:12s} sm_{self.target} {self.dtype:4s} smem={self.shared:>7,} regs={self.regs:>3} "
            f"spill={self.spill_stores}/{self.spill_loads} warps={self.num_warps} stages={self.num_stages} {meta}"
        )


# ----------------------------------------------------------------------------------------------------------------
# The stand-in driver and the compile itself.
class _FakeDriver:
    """Enough of a Triton driver to compile for ``capability`` without a GPU (no launches ever happen)."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)
        self.capability = capability

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.capability  # a distinct "device" per target keeps Triton's per-device caches apart

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True


@contextmanager
def _driver(capability: int) -> Iterator[None]:
    from triton.runtime import driver

    previous = getattr(driver, "_active", None)  # restoring through reset_active() would create a CUDA driver
    driver.set_active(_FakeDriver(capability))
    try:
        yield
    finally:
        driver._active = previous


def _stand_in(a: Any) -> Any:
    """A real (tiny, CPU) tensor with the dtype and 16-byte alignment of a meta argument: compiling needs only
    those; the values and shapes never matter."""
    if not isinstance(a, torch.Tensor):
        return a
    aligned = a.data_ptr() % 16 == 0
    base = torch.empty(64, dtype=a.dtype)
    if aligned:
        return base
    return base[1:]


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    """Registers and spills from ``ptxas -v`` (Triton's bundled ptxas) on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = f"sm_{capability}{'a' if capability >= 90 else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(src) + ".o"],
            capture_output=True,
            text=True,
        )
    log = done.stderr
    regs = re.findall(r"Used (\d+) registers", log)
    spill = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if done.returncode != 0 or not regs:
        raise RuntimeError(f"ptxas -v failed: {log[-500:]}")
    return {"regs": int(regs[0]), "spill_stores": int(spill[0][0]), "spill_loads": int(spill[0][1])}


def compile_one(spec: Spec) -> Result:
    res = Result(spec.name, spec.target, spec.dtype, {k: v for k, v in spec.meta.items()})
    try:
        with _driver(spec.target):
            compiled = spec.kernel.warmup(*map(_stand_in, spec.args), grid=spec.grid, **spec.meta)
        md = compiled.metadata
        res.shared, res.num_warps, res.num_stages = int(md.shared), int(md.num_warps), int(md.num_stages)
        report = _ptxas_report(compiled.asm["ptx"], spec.target)
        res.regs, res.spill_stores, res.spill_loads = (
            report["regs"],
            report["spill_stores"],
            report["spill_loads"],
        )
    except Exception as exc:  # a GPU compile error is a finding, reported with the rest
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return res


# ----------------------------------------------------------------------------------------------------------------
# Collecting the launches.
def collect(targets: list[int], items: list[Scenario] | None = None) -> dict[str, Spec]:
    """Run every scenario for every target through the launchers; return the distinct specialisations by key."""
    import triton

    from . import _triton_common

    found: dict[str, Spec] = {}
    current: dict[str, Any] = {}

    def hook(kernel, grid, args, meta) -> None:
        spec = Spec(kernel, tuple(args), dict(meta), tuple(grid), current["dtype"], current["target"])
        key = spec.key(triton.__version__)
        spec = found.setdefault(key, spec)
        spec.scenarios.append(current["label"])

    previous = _triton_common.LAUNCH_HOOK, _common.TARGET_OVERRIDE
    _triton_common.LAUNCH_HOOK = hook
    try:
        for cap in targets:
            _common.TARGET_OVERRIDE = _common.KNOWN_TARGETS[cap]
            for s in items if items is not None else scenarios():
                current.update(dtype=s.dtype, target=cap, label=s.label())
                run_scenario(s)
    finally:
        _triton_common.LAUNCH_HOOK, _common.TARGET_OVERRIDE = previous
    return found


#: Constexprs that switch optional inputs and outputs on or off (the rest are tiles, warps, stages, precision).
def _is_feature(key: str) -> bool:
    return key == "ACT" or key.startswith(("HAS_", "NEED_", "ADD_"))


def _regime(spec: Spec) -> str:
    """ "aligned" when every integer argument is 0, 1 or a multiple of 16 (Triton then knows it and vectorises),
    else "ragged"; pointers are 16-byte aligned either way (meta tensors at offset 0, like fresh allocations)."""
    ints = [a for a in spec.args if isinstance(a, int) and not isinstance(a, bool)]
    return "aligned" if all(v in (0, 1) or v % 16 == 0 for v in ints) else "ragged"


def _weight(spec: Spec) -> tuple:
    """How much a specialisation loads and keeps live: optional inputs present, then the longest activation."""
    flags = sum(bool(v) for k, v in spec.meta.items() if _is_feature(k) and k != "ACT")
    return (flags, spec.meta.get("ACT") == 2, spec.meta.get("ACT", 0))


def representatives(specs: dict[str, Spec]) -> dict[str, Spec]:
    """One specialisation per (kernel, target, dtype, tiles, alignment regime): the one with the most optional
    inputs switched on. Those decide registers and loads; switching an input off only removes a load and its
    arithmetic, while tiles, warps and stages — the shared memory — are the same across the group. The others of
    the group are listed on the representative (``Spec.scenarios``)."""
    groups: dict[tuple, tuple[str, Spec]] = {}
    for key, spec in specs.items():
        tiles = tuple(sorted((k, v) for k, v in spec.meta.items() if not _is_feature(k)))
        gkey = (spec.name, spec.target, spec.dtype, tiles, _regime(spec))
        best = groups.get(gkey)
        if best is None or _weight(spec) > _weight(best[1]):
            if best is not None:
                spec.scenarios.extend(best[1].scenarios)
            groups[gkey] = (key, spec)
        else:
            best[1].scenarios.extend(spec.scenarios)
    return dict(groups.values())


def _user_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fxadapt" / "compile_check.json"


def _read(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
    os.replace(tmp, path)


class StaleCache(RuntimeError):
    """More uncached specialisations than the caller allowed compiling."""


@dataclass
class Report:
    results: dict[str, Result]
    specs: dict[str, Spec]
    compiled: int
    seconds: float
    distinct: int = 0

    def violations(self) -> list[tuple[Result, list[str], list[str]]]:
        out = []
        for key, res in self.results.items():
            bad = res.violations(_common.KNOWN_TARGETS[res.target])
            if bad:
                out.append((res, bad, self.specs[key].scenarios[:3]))
        return out


def check(
    targets: list[int],
    cache: Path | None = None,
    items: list[Scenario] | None = None,
    *,
    update_cache: bool = False,
    use_user_cache: bool = True,
    max_compiles: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Report:
    """Collect every specialisation, compile those not cached, and return the results by key."""
    import triton

    t0 = time.perf_counter()
    found = collect(targets, items)
    specs = representatives(found)
    log(f"{len(found)} distinct specialisations in {len(specs)} groups of equal tiles")
    committed, user = _read(cache), (_read(_user_cache()) if use_user_cache else {})
    results: dict[str, Result] = {}
    todo = []
    for key, spec in specs.items():
        hit = committed.get(key) or user.get(key)
        if hit is not None:
            results[key] = Result(**hit)
        else:
            todo.append((key, spec))
    log(f"{len(specs)} specialisations, {len(specs) - len(todo)} cached, compiling {len(todo)}")
    if max_compiles is not None and len(todo) > max_compiles:
        raise StaleCache(
            f"{len(todo)} specialisations are not in the results cache {cache} (at most {max_compiles} are compiled "
            "here, ~1-2 s each): the kernels or their configs changed. Run `make compile-cache` "
            "(python -m fxadapt.kernels.compile_check --cache tests/kernels/compile_cache.json --update-cache) "
            "and commit the cache"
        )
    for i, (key, spec) in enumerate(todo):
        results[key] = compile_one(spec)
        log(f"  [{i + 1}/{len(todo)}] {results[key].line()}")
        if use_user_cache and (i % 10 == 9 or i == len(todo) - 1):
            # Failures are not cached: they may be the environment's (a missing ptxas), not the kernel's.
            user.update({k: asdict(results[k]) for k, _ in todo[: i + 1] if not results[k].error})
            _write(_user_cache(), user)
    if update_cache and cache is not None:  # exactly the current set: stale keys go
        _write(cache, {k: asdict(v) for k, v in results.items() if not v.error})
    del triton
    return Report(results, specs, len(todo), time.perf_counter() - t0, len(found))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--target", type=int, action="append", help="compute capability (90, 80, 86); default 90 and 80"
    )
    ap.add_argument(
        "--cache", type=Path, default=None, help="committed results cache (read; written by --update-cache)"
    )
    ap.add_argument(
        "--update-cache", action="store_true", help="rewrite --cache with exactly the current results"
    )
    ap.add_argument("--no-user-cache", action="store_true", help="ignore ~/.cache/fxadapt/compile_check.json")
    ap.add_argument("--json", type=Path, default=None, help="write every result here")
    ap.add_argument("--max-compiles", type=int, default=None, help="fail (exit 3) if more are not cached")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every specialisation")
    args = ap.parse_args(argv)
    if _common.interpreting():
        print(
            "compile_check: run with TRITON_INTERPRET unset (the interpreter compiles nothing)",
            file=sys.stderr,
        )
        return 2
    targets = args.target or [90, 80]
    unknown = [t for t in targets if t not in _common.KNOWN_TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {unknown}; known: {sorted(_common.KNOWN_TARGETS)}")
    try:
        report = check(
            targets,
            args.cache,
            update_cache=args.update_cache,
            use_user_cache=not args.no_user_cache,
            max_compiles=args.max_compiles,
            log=lambda s: print(s, flush=True),
        )
    except StaleCache as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 3
    if args.verbose:
        for res in sorted(report.results.values(), key=lambda r: (r.target, r.kernel, r.dtype, str(r.meta))):
            print(res.line())
    if args.json:
        _write(args.json, {k: asdict(v) for k, v in report.results.items()})
    bad = report.violations()
    for res, why, where in bad:
        print(f"FAIL {res.line()}\n     {'; '.join(why)}\n     from: {'; '.join(where)}")
    worst = {}
    for res in report.results.values():
        if res.shared is not None:
            k = (res.target, res.kernel)
            worst[k] = max(worst.get(k, 0), res.shared)
    for (tgt, kern), smem in sorted(worst.items()):
        print(f"max shared memory sm_{tgt} {kern:12s} {smem:>8,} B of {_common.KNOWN_TARGETS[tgt].smem:,}")
    print(
        f"compile_check: {report.distinct} specialisations in {len(report.results)} groups for "
        f"sm_{', sm_'.join(map(str, targets))}: "
        f"{len(bad)} over a limit; {report.compiled} compiled, {report.seconds:.1f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one benchmark harness of fxadapt (kernels and model-level benchmarks alike).

API
---
::

    from harness import Bench

    bench = Bench("kernels")                     # rows go to bench/results/kernels.jsonl (appended)
    bench.note("CPU run: reference providers only")  # printed above the table, stored in every row
    row = bench.measure(
        fn,                                      # zero-argument callable: one iteration of the thing timed
        what="bottleneck",                       # what is measured (op, model, ...)
        provider="eager",                        # who implements it
        mode="fwd",                              # fwd | bwd | fwd+bwd | no-grad | anything meaningful to you
        shape={"N": 8192, "d": 4096, "r": 64},   # free-form dict of sizes (also the plot's x axis)
        dtype=torch.bfloat16,
        nbytes=135e6,                            # optional: bytes moved (model written down by the caller)
        flops=None,                              # optional: floating-point operations
        setup=None,                              # optional: untimed callable run before every timed call
        baseline="eager",                        # provider that speedups are computed against
        model={"pct_floor": 84.0},               # optional: the bytes model's prediction for this row
    )
    bench.table()                                # short table: p50, GB/s, % of HBM floor, speedup vs baseline
    bench.plot(x="N")                            # one PNG per sweep if matplotlib is importable

Timing: ``warmup`` untimed calls (at least ``warmup_s`` seconds), then ``reps`` timed calls (at least ``min_s``
seconds), each timed alone: ``torch.cuda.Event`` pairs on a GPU (after writing a 256 MiB buffer so every rep starts
with a cold L2, as the HBM floors assume), ``time.perf_counter`` around a synchronised call on CPU. Reported:
p20/p50/p80 in milliseconds. GB/s = bytes / p50; "% of HBM floor" = GB/s over the detected GPU's peak bandwidth
(H100 SXM 3.35 TB/s, H100 PCIe 2.0 TB/s, H200 4.8 TB/s; unknown devices: none); "model%" the bytes model's
prediction of that number (``fxadapt.kernels.traffic``) where the caller passes one. Peak memory: the most memory
allocated during the timed calls, above what was allocated before them (CUDA only; None on CPU, where PyTorch has
no allocator statistics).

Every row also records the device name, torch / triton / transformers versions and the git SHA, and is appended
as one JSON line to ``bench/results/<name>.jsonl`` (``bench/results/`` is not tracked; the environment variable
``FXADAPT_BENCH_DIR`` redirects rows and plots elsewhere).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

#: Where rows and plots go; ``FXADAPT_BENCH_DIR`` overrides (bench/gpu_check.sh points it at its OUTDIR).
RESULTS = Path(os.environ.get("FXADAPT_BENCH_DIR") or Path(__file__).resolve().parent / "results")

#: Peak HBM bandwidth (bytes/s) and dense bf16/fp16 tensor throughput (FLOP/s) by device-name pattern, most
#: specific first. Sources: NVIDIA data sheets (H100 SXM5 80GB / H100 PCIe 80GB / H200 SXM 141GB).
DEVICE_PEAKS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H200",), 4.8e12, 989e12),
    (("H100", "PCIe"), 2.0e12, 756e12),
    (("H100",), 3.35e12, 989e12),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(peak HBM bytes/s, peak dense half-precision FLOP/s) for a device name; (None, None) if unknown."""
    for patterns, bw, flops in DEVICE_PEAKS:
        if all(p.lower() in name.lower() for p in patterns):
            return bw, flops
    return None, None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 (linear interpolation between order statistics)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: q[1] = p20, q[4] = p50, q[7] = p80
    return q[1], q[4], q[7]


@dataclass
class Row:
    bench: str
    what: str
    provider: str
    mode: str
    shape: dict[str, Any]
    dtype: str
    p20_ms: float
    p50_ms: float
    p80_ms: float
    reps: int
    bytes: float | None
    gbps: float | None
    pct_hbm: float | None
    flops: float | None
    tflops: float | None
    pct_flops: float | None
    peak_mem_bytes: int | None
    baseline: str | None
    model: dict[str, Any] | None
    device: str
    versions: dict[str, str | None]
    git: str
    time: str
    notes: list[str] = field(default_factory=list)


class Bench:
    """Collects measurements; see the module docstring for the API."""

    def __init__(
        self,
        name: str,
        device: torch.device | str | None = None,
        *,
        warmup: int = 3,
        warmup_s: float = 0.05,
        reps: int = 20,
        min_s: float = 0.2,
        max_reps: int = 500,
        results_dir: Path | str = RESULTS,
    ):
        self.name = name
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.warmup, self.warmup_s, self.reps, self.min_s, self.max_reps = (
            warmup,
            warmup_s,
            reps,
            min_s,
            max_reps,
        )
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.device_name = device_name(self.device)
        self.peak_bw, self.peak_flops = (
            device_peaks(self.device_name) if self.device.type == "cuda" else (None, None)
        )
        self.versions = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "transformers": _version("transformers"),
        }
        self.git = git_sha()
        self.path = Path(results_dir) / f"{name}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._flush = None

    def note(self, text: str) -> None:
        """A sentence about the whole run (e.g. "CPU: reference providers only"), kept in every row."""
        self.notes.append(text)

    # -------------------------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _cold_l2(self) -> None:
        if self.device.type != "cuda":
            return
        if self._flush is None:
            self._flush = torch.empty(256 << 20, dtype=torch.int8, device=self.device)
        self._flush.zero_()

    def _time_once(self, fn: Callable[[], Any], setup: Callable[[], Any] | None) -> float:
        if setup is not None:
            setup()
        if self.device.type == "cuda":
            self._cold_l2()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        self._sync()
        t0 = time.perf_counter()
        fn()
        self._sync()
        return (time.perf_counter() - t0) * 1e3

    def measure(
        self,
        fn: Callable[[], Any],
        *,
        what: str,
        provider: str,
        mode: str,
        shape: dict[str, Any],
        dtype: torch.dtype | str,
        nbytes: float | None = None,
        flops: float | None = None,
        setup: Callable[[], Any] | None = None,
        baseline: str | None = None,
        notes: list[str] | None = None,
        model: dict[str, Any] | None = None,
    ) -> Row:
        """Time ``fn`` and append one row (also to the JSONL file). See the module docstring."""
        start = time.perf_counter()
        for i in range(10**6):  # warm-up: compile, autotune, caches
            if setup is not None:
                setup()
            fn()
            if i + 1 >= self.warmup and time.perf_counter() - start >= self.warmup_s:
                break
        self._cold_l2()  # allocates the flush buffer (GPU) before the baseline of the memory statistics
        self._sync()
        base_mem = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None
        if base_mem is not None:
            torch.cuda.reset_peak_memory_stats(self.device)
        samples: list[float] = []
        start = time.perf_counter()
        while len(samples) < self.reps or (
            time.perf_counter() - start < self.min_s and len(samples) < self.max_reps
        ):
            samples.append(self._time_once(fn, setup))
        peak = None if base_mem is None else torch.cuda.max_memory_allocated(self.device) - base_mem
        p20, p50, p80 = quantiles(samples)
        sec = p50 / 1e3
        gbps = nbytes / sec / 1e9 if nbytes else None
        tflops = flops / sec / 1e12 if flops else None
        row = Row(
            bench=self.name,
            what=what,
            provider=provider,
            mode=mode,
            shape=dict(shape),
            dtype=str(dtype).replace("torch.", ""),
            p20_ms=p20,
            p50_ms=p50,
            p80_ms=p80,
            reps=len(samples),
            bytes=nbytes,
            gbps=gbps,
            pct_hbm=100 * gbps * 1e9 / self.peak_bw if gbps and self.peak_bw else None,
            flops=flops,
            tflops=tflops,
            pct_flops=100 * tflops * 1e12 / self.peak_flops if tflops and self.peak_flops else None,
            peak_mem_bytes=peak,
            baseline=baseline,
            model=model,
            device=self.device_name,
            versions=self.versions,
            git=self.git,
            time=time.strftime("%Y-%m-%dT%H:%M:%S"),
            notes=self.notes + list(notes or []),
        )
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(asdict(row)) + "\n")
        return row

    def skip(self, *, what: str, provider: str, mode: str, shape: dict[str, Any], dtype, reason: str) -> None:
        """Record that a provider could not run (printed in the table, not written as a timing row)."""
        self.notes.append(f"skipped {what}/{provider}/{mode} {shape} {dtype}: {reason}")

    # -------------------------------------------------------------------------------------------------------------
    def _speedup(self, row: Row) -> float | None:
        if row.baseline is None:
            return None
        for other in self.rows:
            if (
                other.provider == row.baseline
                and other.what == row.what
                and other.mode == row.mode
                and other.shape == row.shape
                and other.dtype == row.dtype
            ):
                return other.p50_ms / row.p50_ms
        return None

    def table(self, rows: list[Row] | None = None) -> str:
        """Print (and return) a short table of ``rows`` (default: all of this run)."""
        rows = self.rows if rows is None else rows
        head = f"{self.name} on {self.device_name} | torch {self.versions['torch']} | git {self.git}"
        lines = [head, *(f"note: {n}" for n in dict.fromkeys(self.notes))]
        cols = (
            "what",
            "mode",
            "shape",
            "dtype",
            "provider",
            "p50 ms",
            "p20-p80",
            "GB/s",
            "%HBM",
            "model%",
            "TFLOP/s",
            "speedup",
        )
        body = []
        for r in rows:
            sp = self._speedup(r)
            body.append(
                (
                    r.what,
                    r.mode,
                    " ".join(f"{k}={v}" for k, v in r.shape.items()),
                    r.dtype,
                    r.provider,
                    f"{r.p50_ms:.4g}",
                    f"{r.p20_ms:.3g}-{r.p80_ms:.3g}",
                    "-" if r.gbps is None else f"{r.gbps:.1f}",
                    "-" if r.pct_hbm is None else f"{r.pct_hbm:.0f}%",
                    "-"
                    if not r.model or r.model.get("pct_floor") is None
                    else f"{r.model['pct_floor']:.0f}%",
                    "-" if r.tflops is None else f"{r.tflops:.2f}",
                    "-" if sp is None else f"{sp:.2f}x",
                )
            )
        widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines += [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*b) for b in body]
        text = "\n".join(lines)
        print(text, flush=True)
        return text

    def plot(self, x: str, *, metric: str = "p50_ms", logx: bool = True) -> list[Path]:
        """One PNG per (what, mode, dtype, other shape keys) group that sweeps ``x`` over ≥ 2 values: ``metric``
        against ``x``, one line per provider. Returns the files written; [] (with a note) without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("plot: matplotlib is not installed; skipping plots", flush=True)
            return []
        groups: dict[tuple, list[Row]] = {}
        for r in self.rows:
            if x not in r.shape:
                continue
            rest = tuple(sorted((k, v) for k, v in r.shape.items() if k != x))
            groups.setdefault((r.what, r.mode, r.dtype, rest), []).append(r)
        written = []
        for (what, mode, dtype, rest), rows in groups.items():
            if len({r.shape[x] for r in rows}) < 2:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            for provider in dict.fromkeys(r.provider for r in rows):
                pts = sorted((r.shape[x], getattr(r, metric)) for r in rows if r.provider == provider)
                pts = [(a, b) for a, b in pts if b is not None and not math.isnan(b)]
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=provider)
            if logx:
                ax.set_xscale("log", base=2)
            if metric.endswith("_ms"):
                ax.set_yscale("log")  # times span orders of magnitude across a sweep
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            label = ",".join(f"{k}={v}" for k, v in rest)
            ax.set_title(f"{what} {mode} {dtype} {label}\n{self.device_name}", fontsize=8)
            ax.legend(fontsize=7)
            fig.tight_layout()
            safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in f"{what}_{mode}_{dtype}_{label}")
            path = self.path.parent / f"{self.name}_{safe}_{metric}_vs_{x}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
        return written

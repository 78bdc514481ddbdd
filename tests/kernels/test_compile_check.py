"""The GPU-free compile check (``fxadapt.kernels.compile_check``): every kernel specialisation the launchers plan fits
sm_90 (H100/H200) and sm_80 (A100) — shared memory, registers, no fp16/bf16 spills — and the check itself catches a
config that does not fit.

Runs in a subprocess with ``TRITON_INTERPRET`` unset (this tier's conftest turns the interpreter on, and Triton
fixes the mode at import). Compile results come from the committed ``compile_cache.json`` (keyed by Triton's hash
of each kernel's source and everything else that determines the binary); a kernel change makes its keys miss, and
more than ``MAX_COMPILES`` misses fail fast asking for ``make compile-cache``. Two compiles always run fresh: the
deliberately oversized tile, and the largest cached specialisation of each target (recompiled and compared, so the
cache cannot drift from what the compiler does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NEEDS_TRITON = False  # compiles for real GPU targets in a subprocess; no interpreter involved
pytest.importorskip("triton")

CACHE = Path(__file__).with_name("compile_cache.json")
MAX_COMPILES = 20

DRIVER = textwrap.dedent(
    """
    import json, sys
    from dataclasses import asdict
    from pathlib import Path
    from fxadapt.kernels import _configs, compile_check as cc

    cache, out, max_compiles = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    result = {}
    try:
        report = cc.check([90, 80], cache, use_user_cache=False, max_compiles=max_compiles)
    except cc.StaleCache as exc:
        out.write_text(json.dumps({"stale": str(exc)}))
        sys.exit(0)
    result["groups"] = len(report.results)
    result["distinct"] = report.distinct
    result["compiled"] = report.compiled
    result["targets"] = sorted({r.target for r in report.results.values()})
    result["kernels"] = sorted({r.kernel for r in report.results.values()})
    result["dtypes"] = sorted({r.dtype for r in report.results.values()})
    result["violations"] = [f"{r.line()}: {'; '.join(why)}" for r, why, _ in report.violations()]

    # Freshness: the largest cached entry of each target, compiled again, must equal its cached result.
    fresh = []
    for tgt in (90, 80):
        key = max((k for k, r in report.results.items() if r.target == tgt), key=lambda k: report.results[k].shared)
        again = cc.compile_one(report.specs[key])
        fresh.append([asdict(report.results[key]), asdict(again)])
    result["fresh"] = fresh

    # A deliberately oversized tile: the column kernel at rank tier 256 with the tiles of rank tier 64 (the config
    # that needed 266,240 B on sm_90 before the tables were split by rank).
    _configs._COL_HALF[256] = (64, 64, 8, 3)
    big = cc.check([90], None, [cc.Scenario("bottleneck", 8192, 4096, 256, "bf16")], use_user_cache=False)
    result["oversized"] = [
        f"{r.kernel} {r.meta.get('BD')} {r.shared}: {'; '.join(why)}" for r, why, _ in big.violations()
    ]
    out.write_text(json.dumps(result))
    """
)


def test_every_specialisation_fits_sm90_and_sm80(tmp_path):
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FXADAPT_KERNELS")}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(CACHE), str(out), str(MAX_COMPILES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "stale" not in result, result.get("stale")
    # Coverage: both targets, every kernel, every dtype, hundreds of distinct specialisations.
    assert result["targets"] == [80, 90]
    assert result["kernels"] == sorted(
        ["_bn_fwd", "_bn_bwd_row", "_bn_bwd_col", "_rowproj", "_gemm_lr", "_seg_outer"]
    )
    assert result["dtypes"] == ["bf16", "fp16", "fp32"]
    assert result["distinct"] > 1000 and result["groups"] > 300, result
    assert result["violations"] == [], "\n".join(result["violations"])
    for cached, again in result["fresh"]:
        assert again == cached, f"cached result differs from a fresh compile:\n{cached}\n{again}"
    # The check catches the oversized tile (and only for shared memory: the limit, not a compile error).
    assert result["oversized"], "an oversized column tile passed the check"
    assert all("_bn_bwd_col" in v and "shared memory" in v for v in result["oversized"]), result["oversized"]

#!/usr/bin/env bash
# One command for a GPU machine: the kernel tests on the real GPU (no interpreter), the kernel benchmark, and an
# `ncu` read of the fused bottleneck's HBM bytes against the bytes model.
#
#   bench/gpu_check.sh OUTDIR
#
# Uses only what the GPU image already has (python3 with a CUDA torch, triton, pytest, hypothesis; pytest-xdist,
# matplotlib and ncu when present) and fxadapt from this checkout (PYTHONPATH shadow tree, no install, no wheels).
# Everything lands in OUTDIR, at most 7 files (the device runner brings back 8):
#   summary.txt    one line per step (status, seconds, what it found), the verdict; then the environment
#   pytest.log     the kernel tier on CUDA         bench.log    the benchmark's table, then the ncu read
#   kernels.jsonl  the benchmark rows              kernels.png  % of the HBM floor per rank, dtype, provider
#   serve.log      per-row (multi-)LoRA serving vs a loop over adapters (bench/serve.py --family gpu)
# Time budget (each step is cut at its budget, the script goes on): tests TEST_BUDGET=200 s, benchmark
# BENCH_BUDGET=120 s (it starts no new shape after that; cut at +45 s), ncu NCU_BUDGET=45 s, serving SERVE_BUDGET=60 s
# (cut at +45 s): at most ~9 minutes
# with setup on a cold cache (the tests compile their kernels in 8 parallel processes when pytest-xdist is there).
#
# Exit codes: 0 tests passed, 1 tests failed or timed out, 2 no CUDA GPU, 3 setup failed.
# ALLOW_CPU=1 rehearses every step on a CPU machine (interpreter tests, a quick CPU benchmark, no ncu).
set -uo pipefail

OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
TEST_BUDGET="${TEST_BUDGET:-200}"
BENCH_BUDGET="${BENCH_BUDGET:-120}"
NCU_BUDGET="${NCU_BUDGET:-45}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T0=$(date +%s)

say() { echo "[gpu_check $(($(date +%s) - T0))s] $*"; }
step() { printf '%-8s %-8s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY"; }
finish() {
    echo "verdict: $2 (exit $1, $(($(date +%s) - T0)) s total)" | tee -a "$SUMMARY"
    { echo; echo "---- environment"; cat "$OUT/.env" 2>/dev/null; } >>"$SUMMARY"
    rm -f "$OUT/.env"
    exit "$1"
}

# ---- 1. torch, the GPU, fxadapt from this checkout ---------------------------------------------------------------
if ! "$PY" -c 'import torch' 2>/dev/null; then
    step setup FAIL 0 "python ($PY) cannot import torch"
    finish 3 "setup failed (no torch)"
fi
# fxadapt.kernels lives in kernels/ (pyproject's package-dir): a shadow tree maps it without installing anything.
SHADOW="$(mktemp -d)"
mkdir -p "$SHADOW/fxadapt"
for entry in "$ROOT"/fxadapt/*; do ln -s "$entry" "$SHADOW/fxadapt/"; done
ln -s "$ROOT/kernels" "$SHADOW/fxadapt/kernels"
export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>/dev/null)
if [[ -z "$GPU" ]]; then
    if [[ "${ALLOW_CPU:-0}" != "1" ]]; then
        step gpu NONE 0 "no CUDA GPU (set ALLOW_CPU=1 to rehearse the steps on CPU)"
        finish 2 "no GPU"
    fi
    say "no CUDA GPU: ALLOW_CPU=1, rehearsing on CPU"
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--quick --modes fwd)
    TEST_SELECT="shape-1x or shape-7x or per_sequence or all_rows"
else
    export TRITON_INTERPRET=0
    BENCH_ARGS=(--gpu-check --modes fwd,fwd+bwd)
    TEST_SELECT="not random"
fi
missing=$("$PY" - <<'PY'
import importlib
missing = []
for name in ("triton", "pytest", "hypothesis", "numpy", "safetensors", "transformers", "fxadapt.kernels"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PY
)
if [[ -n "$missing" ]]; then
    step setup FAIL $(($(date +%s) - T0)) "missing: $missing"
    finish 3 "setup failed (missing $missing)"
fi
{
    echo "device: ${GPU:-CPU rehearsal}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
    "$PY" - <<'PY'
import platform, torch
from importlib import metadata
def v(d):
    try:
        return metadata.version(d)
    except metadata.PackageNotFoundError:
        return None
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", v("triton"), "| transformers", v("transformers"), "| peft", v("peft"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("SMs", p.multi_processor_count, "| L2", getattr(p, "L2_cache_size", "?"),
          "| smem/block opt-in", getattr(p, "shared_memory_per_block_optin", "?"))
PY
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/.env" 2>&1
step setup ok $(($(date +%s) - T0)) "${GPU:-CPU rehearsal}"

# ---- 2. kernel tests on the device -------------------------------------------------------------------------------
t=$(date +%s)
XDIST=()
if "$PY" -c 'import xdist' 2>/dev/null && [[ -n "$GPU" ]]; then XDIST=(-n 8); fi  # compile in parallel
say "pytest tests/kernels (TRITON_INTERPRET=$TRITON_INTERPRET, -k '$TEST_SELECT', ${XDIST[*]:-serial}), ${TEST_BUDGET}s"
timeout "$TEST_BUDGET" "$PY" -m pytest tests/kernels --ignore=tests/kernels/test_compile_check.py -q -rfEs \
    -p no:cacheprovider "${XDIST[@]}" -k "$TEST_SELECT" >"$OUT/pytest.log" 2>&1
rc=$?
counts=$(grep -hoE '[0-9]+ (passed|failed|error|errors|skipped)' "$OUT/pytest.log" | tr '\n' ' ')
if ((rc == 124)); then step tests TIMEOUT $(($(date +%s) - t)) "cut at ${TEST_BUDGET}s; $counts"; tests_ok=0
elif ((rc == 0)); then step tests ok $(($(date +%s) - t)) "$counts"; tests_ok=1
else step tests FAIL $(($(date +%s) - t)) "exit $rc: $counts (see pytest.log)"; tests_ok=0; fi

# ---- 3. benchmark ------------------------------------------------------------------------------------------------
t=$(date +%s)
export FXADAPT_BENCH_DIR="$OUT/.bench"
mkdir -p "$FXADAPT_BENCH_DIR"
say "bench/kernels.py ${BENCH_ARGS[*]} --budget-s $BENCH_BUDGET"
timeout $((BENCH_BUDGET + 45)) "$PY" bench/kernels.py "${BENCH_ARGS[@]}" --budget-s "$BENCH_BUDGET" --no-plot \
    >"$OUT/bench.log" 2>&1
rc=$?
[[ -f "$FXADAPT_BENCH_DIR/kernels.jsonl" ]] && mv "$FXADAPT_BENCH_DIR/kernels.jsonl" "$OUT/kernels.jsonl"
rm -rf "$FXADAPT_BENCH_DIR"
rows=$(grep -c '"bench"' "$OUT/kernels.jsonl" 2>/dev/null); rows=${rows:-0}
skipped=$(grep -c 'FAILED ' "$OUT/bench.log" 2>/dev/null); skipped=${skipped:-0}
if ((rc == 0)); then step bench ok $(($(date +%s) - t)) "$rows rows, $skipped provider failures"
elif ((rc == 124)); then step bench TIMEOUT $(($(date +%s) - t)) "$rows rows before the cut"
else step bench FAIL $(($(date +%s) - t)) "exit $rc, $rows rows (see bench.log)"; fi
if [[ -f "$OUT/kernels.jsonl" ]]; then
    "$PY" bench/kernels.py --plot-summary "$OUT/kernels.jsonl" "$OUT/kernels.png" >>"$OUT/bench.log" 2>&1 \
        && say "plot: kernels.png" || say "no plot (matplotlib missing?)"
fi

# ---- 4. ncu: measured HBM bytes of the fused bottleneck vs the model ---------------------------------------------
t=$(date +%s)
if [[ -n "$GPU" ]] && command -v ncu >/dev/null 2>&1; then
    {
        echo; echo "==== ncu: HBM bytes per fused bottleneck launch (the model's numbers are printed after)"
        timeout "$NCU_BUDGET" ncu --clock-control none --target-processes all -k 'regex:_bn_' -c 6 \
            --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum \
            "$PY" bench/kernels.py --ncu-probe 2>&1
    } >>"$OUT/bench.log"
    rc=$?
    if ((rc == 0)); then step ncu ok $(($(date +%s) - t)) "see bench.log"; else step ncu FAIL $(($(date +%s) - t)) "exit $rc"; fi
else
    step ncu skipped 0 "${GPU:+no ncu on PATH}${GPU:-CPU rehearsal}"
fi

# ---- 5. multi-LoRA serving: the per-row LoRA path against a loop over adapters (bench/serve.py) -----------------
t=$(date +%s)
SERVE_BUDGET="${SERVE_BUDGET:-60}"
SERVE_ARGS=(--family gpu --budget "$SERVE_BUDGET")
[[ -z "$GPU" ]] && SERVE_ARGS+=(--rehearse)
timeout $((SERVE_BUDGET + 45)) "$PY" bench/serve.py "${SERVE_ARGS[@]}" >"$OUT/serve.log" 2>&1
rc=$?
if ((rc == 0)); then step serve ok $(($(date +%s) - t)) "see serve.log"
elif ((rc == 124)); then step serve TIMEOUT $(($(date +%s) - t)) "cut at $((SERVE_BUDGET + 45))s"
else step serve FAIL $(($(date +%s) - t)) "exit $rc (see serve.log)"; fi

if ((tests_ok)); then finish 0 "ok"; fi
finish 1 "kernel tests failed or timed out"

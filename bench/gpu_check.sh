#!/usr/bin/env bash
# One command for a GPU machine: kernel tests on the real GPU (no interpreter), then the kernel benchmark.
#
#   bench/gpu_check.sh OUTDIR
#
# Meant for an offline machine whose python3 already has a CUDA build of torch (and usually triton). Anything else
# it needs (numpy, pytest, hypothesis, safetensors; optionally peft, matplotlib) it installs from wheels shipped beside
# the repo in ./.whl/ (or $WHEELS) — fill that folder on a networked machine with bench/fetch_wheels.sh.
# Everything it produces lands in OUTDIR, at most 8 files (what the device runner brings back):
#   summary.txt   one line per step with its status and seconds, and the overall verdict
#   env.txt       nvidia-smi, python/torch/triton versions, git SHA
#   pytest.log    the kernel tier on CUDA (files run as parallel processes: Triton compiles in each at once)
#   bench.log     the benchmark's printed table        kernels.jsonl   its rows
#   plots.tar.gz  PNG plots (if matplotlib is available)
#   gpu_check.log this script's own log
# Time: under 8 minutes on one H100 with the defaults (TEST_TIMEOUT=300 s, BENCH_BUDGET=120 s; the benchmark
# runs its most important shapes first and stops starting new ones when the budget is spent).
#
# Exit codes: 0 all tests passed, 1 tests failed or timed out, 2 no CUDA GPU, 3 setup failed.
# ALLOW_CPU=1 rehearses every step on a CPU machine (kernel tests under TRITON_INTERPRET=1, bench --quick).
set -uo pipefail

OUT="${1:?usage: bench/gpu_check.sh OUTDIR}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
BENCH_BUDGET="${BENCH_BUDGET:-120}"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
T0=$(date +%s)

log() { echo "[gpu_check $(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
step() { printf '%-10s %-8s %5ss  %s\n' "$1" "$2" "$3" "${4:-}" | tee -a "$SUMMARY" >>"$LOG"; }
finish() { log "verdict: $2"; echo "verdict: $2 (exit $1, $(($(date +%s) - T0))s total)" >>"$SUMMARY"; exit "$1"; }

# ---- 1. torch and the GPU ----------------------------------------------------------------------------------------
if ! "$PY" -c 'import torch' >>"$LOG" 2>&1; then
    log "python ($PY) cannot import torch: this script expects the machine's CUDA build of torch"
    step setup FAIL 0 "no torch"
    finish 3 "setup failed (no torch)"
fi
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>>"$LOG")
if [[ -z "$GPU" ]]; then
    if [[ "${ALLOW_CPU:-0}" != "1" ]]; then
        log "no CUDA GPU detected (torch.cuda.is_available() is False): nothing to check here"
        step gpu NONE 0 "no CUDA GPU; set ALLOW_CPU=1 to rehearse the steps on CPU"
        finish 2 "no GPU"
    fi
    log "no CUDA GPU: ALLOW_CPU=1, rehearsing on CPU (interpreter tests, quick bench)"
    export TRITON_INTERPRET=1
    BENCH_ARGS=(--quick)
else
    log "GPU: $GPU"
    export TRITON_INTERPRET=0
    BENCH_ARGS=()
fi

# ---- 2. missing Python packages, from the shipped wheels ---------------------------------------------------------
t=$(date +%s)
missing=()
for spec in triton:triton numpy:numpy pytest:pytest hypothesis:hypothesis safetensors:safetensors; do
    mod="${spec%%:*}"; dist="${spec##*:}"
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$dist")
done
optional=()
for spec in peft:peft matplotlib:matplotlib; do
    mod="${spec%%:*}"; dist="${spec##*:}"
    "$PY" -c "import $mod" 2>/dev/null || optional+=("$dist")
done
if ((${#missing[@]})); then
    log "installing from $WHEELS: ${missing[*]}"
    if ! "$PY" -m pip install --no-index --find-links "$WHEELS" "${missing[@]}" >>"$LOG" 2>&1; then
        log "could not install ${missing[*]} from $WHEELS (fill it with bench/fetch_wheels.sh on a networked machine)"
        step deps FAIL $(($(date +%s) - t)) "missing: ${missing[*]}"
        finish 3 "setup failed (missing packages)"
    fi
fi
for dist in "${optional[@]}"; do  # optional: the bench skips the PEFT provider / the plots without them
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$dist" >>"$LOG" 2>&1 \
        && log "installed optional $dist" || log "optional $dist not available: skipped"
done

# fxadapt itself: an editable install when pip can do it offline, else a shadow tree on PYTHONPATH that maps
# fxadapt.kernels onto kernels/ the way pyproject's package-dir does.
if ! "$PY" -c 'import fxadapt.kernels' 2>/dev/null; then
    if ! "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" >>"$LOG" 2>&1; then
        SHADOW="$(mktemp -d)"
        mkdir -p "$SHADOW/fxadapt"
        for entry in "$ROOT"/fxadapt/*; do ln -s "$entry" "$SHADOW/fxadapt/"; done
        ln -s "$ROOT/kernels" "$SHADOW/fxadapt/kernels"
        export PYTHONPATH="$SHADOW${PYTHONPATH:+:$PYTHONPATH}"
        log "pip could not install fxadapt offline; using a shadow tree at $SHADOW"
    fi
fi
if ! "$PY" -c 'import fxadapt.kernels' >>"$LOG" 2>&1; then
    step deps FAIL $(($(date +%s) - t)) "fxadapt.kernels does not import"
    finish 3 "setup failed (fxadapt.kernels)"
fi
step deps ok $(($(date +%s) - t)) "${missing[*]:-nothing missing}"

{
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
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
PY
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/env.txt" 2>&1

# ---- 3. kernel tests on the device -------------------------------------------------------------------------------
t=$(date +%s)
log "pytest tests/kernels (TRITON_INTERPRET=$TRITON_INTERPRET), one process per file, timeout ${TEST_TIMEOUT}s"
: >"$OUT/pytest.log"
pids=()
tmp="$(mktemp -d)"
for f in tests/kernels/test_*.py; do
    timeout "$TEST_TIMEOUT" "$PY" -m pytest "$f" -q -p no:cacheprovider -rfEs >"$tmp/$(basename "$f").log" 2>&1 &
    pids+=("$!:$f")
done
failed=()
for entry in "${pids[@]}"; do
    pid="${entry%%:*}"; f="${entry#*:}"
    wait "$pid"; rc=$?
    { echo "===== $f (exit $rc)"; cat "$tmp/$(basename "$f").log"; } >>"$OUT/pytest.log"
    if ((rc == 124)); then failed+=("$f:timeout"); elif ((rc != 0 && rc != 5)); then failed+=("$f:exit$rc"); fi
done
rm -rf "$tmp"
if ((${#failed[@]})); then
    step tests FAIL $(($(date +%s) - t)) "${failed[*]}"
else
    step tests ok $(($(date +%s) - t)) "$(grep -hoE '[0-9]+ passed' "$OUT/pytest.log" | awk '{s+=$1} END {print s " passed"}')"
fi

# ---- 4. benchmark ------------------------------------------------------------------------------------------------
t=$(date +%s)
log "bench/kernels.py ${BENCH_ARGS[*]:-} --budget-s $BENCH_BUDGET"
export FXADAPT_BENCH_DIR="$OUT/bench_results"
mkdir -p "$FXADAPT_BENCH_DIR"
timeout $((BENCH_BUDGET + 240)) "$PY" bench/kernels.py "${BENCH_ARGS[@]}" --budget-s "$BENCH_BUDGET" >"$OUT/bench.log" 2>&1
rc=$?
[[ -f "$FXADAPT_BENCH_DIR/kernels.jsonl" ]] && mv "$FXADAPT_BENCH_DIR/kernels.jsonl" "$OUT/kernels.jsonl"
if compgen -G "$FXADAPT_BENCH_DIR/*.png" >/dev/null; then
    tar -C "$FXADAPT_BENCH_DIR" -czf "$OUT/plots.tar.gz" $(cd "$FXADAPT_BENCH_DIR" && ls ./*.png)
fi
rm -rf "$FXADAPT_BENCH_DIR"
if ((rc == 0)); then step bench ok $(($(date +%s) - t)) "$(grep -c '"bench"' "$OUT/kernels.jsonl" 2>/dev/null || echo 0) rows"
else step bench FAIL $(($(date +%s) - t)) "exit $rc (see bench.log)"; fi

if ((${#failed[@]})); then finish 1 "kernel tests failed"; fi
finish 0 "ok"

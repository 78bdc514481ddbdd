#!/usr/bin/env bash
# Fill ./.whl/ (or $WHEELS) on a networked machine with the wheels bench/gpu_check.sh may need on an offline GPU
# machine that has python3 + a CUDA build of torch (+ triton) but nothing else of ours.
#
#   bench/fetch_wheels.sh [PYTHON_VERSION]      # e.g. 3.10; default: this machine's python3 version
#   WITH_PEFT=1 bench/fetch_wheels.sh 3.10       # also PEFT and its dependencies (the bench's 'peft' provider)
#
# torch and triton are never downloaded (multi-GB; the GPU machine has its own). Binary wheels are fetched for the
# given Python version on manylinux x86_64.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/.whl}"
PYVER="${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
mkdir -p "$WHEELS"

# Test tier: numpy (the Triton interpreter, torch's numpy bridge), pytest, hypothesis, safetensors (fxadapt imports
# it); plots: matplotlib. None of these depends on torch, so they are resolved with their dependencies.
core=(numpy pytest hypothesis safetensors matplotlib)
# PEFT needs torch: its stack is listed explicitly and fetched with --no-deps, so that torch is never pulled in.
peft_stack=(peft accelerate transformers huggingface_hub tokenizers hf_xet regex pyyaml tqdm psutil filelock fsspec
            requests urllib3 idna certifi charset_normalizer typing_extensions)

target=(--only-binary=:all: --dest "$WHEELS" --python-version "$PYVER" --implementation cp
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download "${target[@]}" "${core[@]}"
if [[ "${WITH_PEFT:-0}" == "1" ]]; then
    python3 -m pip download --no-deps "${target[@]}" "${peft_stack[@]}"
fi
echo "fetch_wheels: $(ls "$WHEELS" | wc -l) wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)) for Python $PYVER"
echo "fetch_wheels: on the device runner, carry '.whl' (it is git-ignored) and run bench/gpu_check.sh OUTDIR"

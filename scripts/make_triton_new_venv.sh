#!/usr/bin/env bash
# A second, small venv for the newest Triton: .venv-triton-new holds only triton (TRITON_NEW_VERSION) and reads
# everything else (torch, fxadapt editable, pytest, hypothesis) from the main .venv through a .pth file, so the
# kernel tier's interpreter tests can run on both ends of the supported Triton range (pyproject: triton>=3.6,<3.10;
# the main venv pins 3.7.1, the GPU image ships 3.6) for the cost of one wheel.
#
# Idempotent: exits at once if the venv already imports the expected triton and torch.
# Overrides: VENV (default <repo>/.venv-triton-new), MAIN_VENV (default <repo>/.venv), PYTHON (default: MAIN_VENV's).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-triton-new}"
MAIN_VENV="${MAIN_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$MAIN_VENV/bin/python}"
TRITON_NEW_VERSION="3.9.0"

check() {
    [[ -x "$VENV/bin/python" ]] || return 1
    "$VENV/bin/python" - "$TRITON_NEW_VERSION" "$ROOT" <<'PY' >/dev/null 2>&1
import sys
from pathlib import Path
import triton, torch, fxadapt.kernels  # noqa: E401,F401
ok = triton.__version__ == sys.argv[1] and Path(fxadapt.kernels.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve())
sys.exit(0 if ok else 1)
PY
}

if check; then
    echo "make_triton_new_venv: $VENV is already complete; nothing to do."
    exit 0
fi
start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
MAIN_SITE="$("$MAIN_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# addsitedir (not a bare path) so that the main venv's own .pth files — the editable fxadapt — are processed too;
# it appends, so this venv's triton comes first.
echo "import site; site.addsitedir('$MAIN_SITE')" >"$SITE/zz_fxadapt_main_venv.pth"
"$VENV/bin/python" -m pip --disable-pip-version-check install -q --no-deps "triton==$TRITON_NEW_VERSION"
if ! check; then
    echo "make_triton_new_venv: $VENV does not import triton $TRITON_NEW_VERSION with the main venv's packages" >&2
    exit 1
fi
echo "make_triton_new_venv: done in $(( $(date +%s) - start )) s"

"""The repository's ``kernels/`` directory (installed as ``fxadapt.kernels``) shadows a top-level ``kernels`` when
the repository root is on ``sys.path`` (a script or ``python -c`` run from it). transformers >= 5.25 imports the
Hugging Face hub ``kernels`` package by that name: where it is installed, that import must get the hub's package;
where it is not, the name is fxadapt.kernels itself (one copy of the ops)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import sys
sys.path[:0] = [{root!r}] + {extra!r}
import kernels
import fxadapt.kernels
print(getattr(kernels, "HUB_MARKER", None), kernels is fxadapt.kernels)
"""


def _probe(extra: list[str]) -> str:
    code = _PROBE.format(root=str(ROOT), extra=extra)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_top_level_kernels_is_the_hub_package_where_installed(tmp_path):
    hub = tmp_path / "site" / "kernels"
    hub.mkdir(parents=True)
    (hub / "__init__.py").write_text("HUB_MARKER = 'hub'\n")
    assert _probe([str(tmp_path / "site")]) == "hub False"


def test_top_level_kernels_is_fxadapt_kernels_otherwise():
    if _hub_installed():  # this venv has the hub package (transformers >= 5.25): it wins, as tested above
        assert _probe([]).endswith("False")
    else:
        assert _probe([]) == "None True"


def _hub_installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
    except PackageNotFoundError:
        return False
    return True

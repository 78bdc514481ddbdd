"""The package imports from any working folder: a fresh editable install of a copy of the repository, used from
the folder that *contains* the clone (``~/fxadapt`` cloned, a script in ``~``), imports the real fxadapt and not an
empty namespace package made of the clone's own folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP = {
    ".git",
    ".venv",
    ".venv-peer",
    "build",
    "runs",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "__pycache__",
}


def _copy_repository(dst: Path) -> None:
    shutil.copytree(
        ROOT,
        dst,
        symlinks=True,
        ignore=lambda folder, names: [n for n in names if n in _SKIP or n.endswith(".egg-info")],
    )


@pytest.mark.slow
def test_script_beside_a_fresh_clone_imports_the_real_package(tmp_path):
    home = tmp_path / "home"
    clone = home / "fxadapt"  # the clone is named like the package, as `git clone .../fxadapt` makes it
    _copy_repository(clone)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # the new venv sees this venv's packages (torch, transformers, setuptools) but not its fxadapt install
    site = Path(
        subprocess.check_output(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-e", str(clone)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    script = home / "use_fxadapt.py"
    script.write_text(
        "import fxadapt, fxadapt.kernels\n"
        "print(fxadapt.__file__)\n"
        "print(fxadapt.kernels.__name__, callable(fxadapt.inject))\n"
    )
    for cwd in (home,):  # from the clone itself, every test run of the suite already imports it
        out = subprocess.run([str(python), str(script)], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split()
        assert Path(lines[0]) == clone / "fxadapt" / "__init__.py", (cwd, out.stdout)
        assert lines[1:] == ["fxadapt.kernels", "True"], (cwd, out.stdout)
    # a plain path entry, not an import hook that runs after the normal search
    pth = next(site.glob("__editable__.fxadapt*.pth"))
    assert pth.read_text().strip() == str(clone)

"""What a CPU benchmark row records about the run: CPU name, git SHA, uncommitted fxadapt changes (stdlib only)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_run_info() -> dict:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "",
    )

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    return {
        "device": "cpu",
        "cpu": cpu or platform.processor(),
        "git_sha": git("rev-parse", "--short", "HEAD"),
        "fxadapt_dirty": bool(git("status", "--porcelain", "--", "fxadapt")),
    }

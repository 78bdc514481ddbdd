"""What a CPU benchmark row records about the run (CPU name, git SHA, uncommitted fxadapt changes) and where the
rows go (stdlib only)."""

from __future__ import annotations

import json
import platform
import subprocess
import time
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


def append_rows(out: str | Path, bench: str, info: dict, rows: list[dict]) -> Path:
    """Append ``rows`` to the JSONL file ``out``, one line each, stamped with the time, ``bench`` and ``info``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({"time": stamp, "bench": bench, **info, **r}) + "\n")
    return path

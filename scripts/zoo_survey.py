"""Quick survey of the architecture zoo: build, base forward, explain, inject double_seq_bn + lora. One line per type.

Usage: .venv/bin/python scripts/zoo_survey.py [model_type ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def one(model_type: str) -> None:
    import copy

    import torch
    from zoo import BY_TYPE, main_output, make_inputs, make_model

    import fxadapt

    entry = BY_TYPE[model_type]
    stage = "build"
    try:
        model = make_model(entry)
        inputs = make_inputs(model, entry)
        stage = "base"
        with torch.no_grad():
            base_out = main_output(model(**inputs))
        stage = "explain"
        rep = fxadapt.explain(model)
        kinds = sorted({s.split(" ")[0] for le in rep.layers for s in le.sites})
        mods = sorted({s.split("=")[0] for le in rep.layers for s in le.module_sites})
        leaves = sorted({k for le in rep.layers for k in le.leaves})
        stage = "inject-bn"
        m2 = copy.deepcopy(model)
        fxadapt.inject(
            m2,
            {
                "a": fxadapt.BottleneckConfig(
                    sites=("attn.out", "ffn.out"), original_ln_before=False, non_linearity="swish"
                )
            },
        )
        with torch.no_grad():
            out = main_output(m2(**inputs))
        same = torch.allclose(out, base_out) if out.shape == base_out.shape else False
        stage = "inject-lora"
        m3 = copy.deepcopy(model)
        fxadapt.inject(m3, {"l": "lora"})
        print(f"OK   {model_type:24s} res={kinds} mod={mods} leaves={leaves} bn_close={same}")
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
        print(f"FAIL {model_type:24s} [{stage}] {msg}")
        if os.environ.get("TB"):
            traceback.print_exc()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[2])
        return
    from zoo import ZOO

    types = sys.argv[1:] or [e.model_type for e in ZOO]
    for t in types:
        start = time.time()
        try:
            r = subprocess.run(
                [sys.executable, __file__, "--one", t], capture_output=True, text=True, timeout=300
            )
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("OK", "FAIL"))]
            out = lines[-1] if lines else f"CRASH {t} {r.stderr.strip().splitlines()[-1:]}"
        except subprocess.TimeoutExpired:
            out = f"TIMEOUT {t}"
        print(f"{out}  ({time.time() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()

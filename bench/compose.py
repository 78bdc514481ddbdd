"""CPU benchmark of per-forward composition overhead: one adapter, a Stack of two, a Fuse of three, vs the base model.

BERT-base size (``BertModel(BertConfig())``, random weights, 12 x 768), batch 8 x seq 128 of random token ids with an
all-ones mask, eval mode under ``torch.no_grad()``, one process, ``torch.set_num_threads(--threads)``:

  base            the untouched model
  seq_bn          one ``seq_bn`` adapter "a", active
  Stack(a, b)     two ``seq_bn`` adapters, ``Stack("a", "b")`` active
  Fuse(a, b, c)   three ``seq_bn`` adapters and an AdapterFusion layer (``"dynamic"``), ``Fuse("a", "b", "c")`` active

Every setup lives on its own deep copy of the same base model, so no timed call switches setups. Default (``.venv``):
fxadapt (``inject``, ``add_fusion``, ``activate``; primed with a 2 x 16 batch of the same structure so the timed
call does not retrace). ``--peer`` (``.venv-peer``): AdapterHub ``adapters`` (``adapters.init``, ``add_adapter(...,
config="seq_bn")``, ``add_adapter_fusion``, ``set_active_adapters``) on the same config, vs its own base model in its
own process. Each provider's repeats are interleaved round-robin (start rotated every round) after one warm-up call
(``first``); ``ratio`` is p50 / base p50 and ``paired`` the median over rounds of time / base time in that round. On a
shared CPU only the ratios mean anything, and ratios from the two processes compare only as ratios.
Rows are appended as JSONL to bench/results/compose.jsonl (``--out``).

    .venv/bin/python bench/compose.py --threads 1                 # fxadapt (~2-3 min on the loaded 2-core machine)
    .venv-peer/bin/python bench/compose.py --peer --threads 1     # AdapterHub adapters 1.3.0
    .venv/bin/python bench/compose.py --quick                     # fewer rounds (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# bench/ holds kernels.py, and the script's folder comes first on sys.path: transformers probes for the hub
# ``kernels`` package by importing it, got bench/kernels.py (which imports fxadapt, which imports transformers'
# Trainer) and failed with a circular import. Nothing here imports from bench/, so drop the folder.
from machine import append_rows, cpu_run_info

if (_here := str(Path(__file__).resolve().parent)) in sys.path:
    sys.path.remove(_here)

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parent.parent
REPEATS, QUICK_REPEATS = 15, 5
SETUPS = ("base", "seq_bn", "Stack(a, b)", "Fuse(a, b, c)")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One warm-up call per provider (returned as ``first``), then ``repeats`` rounds, start rotated per round."""
    names = list(fns)
    first, times = {}, {n: [] for n in names}
    for n in names:
        t0 = time.perf_counter()
        fns[n]()
        first[n] = time.perf_counter() - t0
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return first, times


def env(peer: bool) -> dict:
    info = {
        **cpu_run_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
    }
    if peer:
        import adapters

        info["library"] = f"adapters {adapters.__version__}"
    else:
        info["library"] = "fxadapt (the library measured)"
    return info


def fxadapt_models(base: torch.nn.Module, prime: dict) -> dict[str, torch.nn.Module]:
    import fxadapt

    one = fxadapt.inject(copy.deepcopy(base), {"a": "seq_bn"}, example_inputs=prime)
    stack = fxadapt.inject(copy.deepcopy(base), {"a": "seq_bn", "b": "seq_bn"}, example_inputs=prime)
    fxadapt.activate(stack, fxadapt.Stack("a", "b"))
    fuse = copy.deepcopy(base)
    fxadapt.inject(fuse, {n: "seq_bn" for n in "abc"}, example_inputs=prime, activate=False)
    fxadapt.activate(fuse, fxadapt.add_fusion(fuse, ["a", "b", "c"]))
    for m, want in ((one, ("a",)), (stack, ("a", "b")), (fuse, ("a", "b", "c"))):
        assert fxadapt.active_adapters(m) == want, (fxadapt.active_setup(m), want)
    return {"seq_bn": one, "Stack(a, b)": stack, "Fuse(a, b, c)": fuse}


def adapterhub_models(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    import adapters
    from adapters import composition as ah

    # set_active_adapters runs a ForwardContext before the setup is stored, which logs "adapters available but none
    # are activated"; the asserts below check what is active
    logging.getLogger("adapters").setLevel(logging.ERROR)

    def make(names: str) -> torch.nn.Module:
        m = copy.deepcopy(base)
        adapters.init(m)
        for n in names:
            m.add_adapter(n, config="seq_bn")
        return m

    one = make("a")
    one.set_active_adapters("a")
    stack = make("ab")
    stack.set_active_adapters(ah.Stack("a", "b"))
    fuse = make("abc")
    fuse.add_adapter_fusion(ah.Fuse("a", "b", "c"))
    fuse.set_active_adapters(ah.Fuse("a", "b", "c"))
    assert repr(one.active_adapters) == "Stack[a]", one.active_adapters
    assert repr(stack.active_adapters) == "Stack[a, b]", stack.active_adapters
    assert repr(fuse.active_adapters) == "Fuse[a, b, c]", fuse.active_adapters
    return {"seq_bn": one, "Stack(a, b)": stack, "Fuse(a, b, c)": fuse}


def bench(peer: bool, repeats: int) -> list[dict]:
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    base = tf.BertModel(tf.BertConfig()).eval()
    ids = torch.randint(0, base.config.vocab_size, (8, 128))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    prime = {"input_ids": ids[:2, :16], "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    t0 = time.perf_counter()
    models = {"base": base, **(adapterhub_models(base) if peer else fxadapt_models(base, prime))}
    setup_s = time.perf_counter() - t0
    for m in models.values():
        m.eval()
    added = {k: sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in base.parameters())
             for k, m in models.items()}  # fmt: skip
    with torch.no_grad():
        first, times = interleaved({k: (lambda m=m: m(**inputs)) for k, m in models.items()}, repeats)
    load1 = os.getloadavg()[0]
    provider = "adapters" if peer else "fxadapt"
    rows = []
    for k in SETUPS:
        secs, ref = times[k], times["base"]
        rows.append({
            "setup": k, "provider": "base" if k == "base" else provider, "n": len(secs),
            **{f"p{q}_ms": pct(secs, q / 100) * 1e3 for q in (20, 50, 80)},
            "first_ms": first[k] * 1e3, "ratio": pct(secs, 0.5) / pct(ref, 0.5),
            "paired_ratio": pct([a / b for a, b in zip(secs, ref)], 0.5), "added_params": added[k],
            "setup_s": setup_s, "load_before": round(load0, 2), "load_after": round(load1, 2),
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    head = (
        f"{'setup':<14} {'provider':<9} {'n':>3} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} {'first ms':>8}  "
    )
    head += f"{'ratio':>6} {'paired':>6}  {'added params':>12}"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['setup']:<14} {r['provider']:<9} {r['n']:>3} {r['p20_ms']:8.1f} {r['p50_ms']:8.1f} "
            f"{r['p80_ms']:8.1f} {r['first_ms']:8.0f}  {r['ratio']:6.3f} {r['paired_ratio']:6.3f}  "
            f"{r['added_params'] / 1e6:11.2f}M"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", action="store_true", help="measure AdapterHub adapters (run under .venv-peer)")
    ap.add_argument(
        "--quick", action="store_true", help=f"{QUICK_REPEATS} rounds instead of {REPEATS} (~1 min)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per setup")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch.set_num_threads (default 2; use 1 on a busy box)"
    )
    ap.add_argument(
        "--out", default=str(ROOT / "bench/results/compose.jsonl"), help="JSONL file to append to"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    info = env(args.peer)
    print(f"# {info['cpu']}, {info['threads']} threads, torch {info['torch']}, transformers {info['transformers']}, "
          f"{info['library']}, fxadapt @ {info['git_sha']}{' (dirty)' if info['fxadapt_dirty'] else ''}; "
          "BERT-base, batch 8 x seq 128, eval, no_grad")  # fmt: skip
    repeats = args.repeats or (QUICK_REPEATS if args.quick else REPEATS)
    t0 = time.perf_counter()
    rows = bench(args.peer, repeats)
    print(table(rows))
    print(f"# ratio vs the base model in this process; {time.perf_counter() - t0:.0f} s (setup "
          f"{rows[0]['setup_s']:.1f} s), load {rows[0]['load_before']} -> {rows[0]['load_after']}")  # fmt: skip
    out = append_rows(args.out, "compose", info, rows)
    print(f"# appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()

"""Inject cost per layer (issue 14): fxadapt against PEFT on fresh copies, interleaved, with the floor it has.

Usage: .venv/bin/python bench/inject.py [--models bert-base,llama-32] [--repeats 3] [--threads 1]

Rows, per model (random weights from a config; ``llama-32`` is 32 LLaMA layers of width 64, so that the count
and not the width is what is measured):

- ``fxadapt seq_bn`` / ``fxadapt LoRA r=8 (q,v)``: wall time of ``fxadapt.inject`` on a fresh copy. It runs the
  priming forward (every layer's eager output recorded), checks every layer's generated code against it bit for
  bit, and primes the other usual kinds of call (all-ones mask, train mode, the KV-cache call of models that
  generate), each with one trace per block class and a forward that stops after one layer per group of siblings.
- ``peft LoRA r=8 (q,v)``: ``peft.get_peft_model`` on a fresh copy (wraps modules by name; no forward, no check).
- ``eager forward``: one forward of the base model on the priming batch (the config-built 2 x 8 example inputs):
  the unit inject's verification costs at least twice (an eager output per layer and a run of the generated code).

Also printed: the captures fxadapt made (distinct traces over all layers and kinds of call). Timings interleave the
providers round by round in one process; read the ratios, not the milliseconds. Rows are appended to
``bench/results/inject.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from machine import append_rows, cpu_run_info

# then drop bench/ from the path: transformers probes for the hub ``kernels`` package and would get bench/kernels.py
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import peft  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.install import layer_state  # noqa: E402
from fxadapt.model import default_example_inputs, layers_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(name: str) -> tuple[torch.nn.Module, list[str]]:
    """A model from its config and the LoRA target module names (q, v) for PEFT."""
    torch.manual_seed(0)
    if name == "llama-32":
        cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000)  # fmt: skip
        return tf.LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"]
    if name == "bert-base":
        return tf.BertModel(tf.BertConfig()).eval(), ["query", "value"]
    raise SystemExit(f"unknown model {name!r}; choose from bert-base, llama-32")


def captures(model: torch.nn.Module) -> int:
    return len(
        {
            id(t.capture)
            for layer in layers_of(model)[1]
            for ts in layer_state(layer).traced.values()
            for t in ts
        }
    )


def run(name: str, repeats: int) -> list[dict]:
    base, targets = build(name)
    layers = len(layers_of(base)[1])
    example = default_example_inputs(base)
    lora = fxadapt.LoRAConfig(sites=("attn.q", "attn.v"), r=8, alpha=16)
    makers = {
        "fxadapt seq_bn": lambda m: fxadapt.inject(m, {"a": "seq_bn"}),
        "fxadapt LoRA r=8 (q,v)": lambda m: fxadapt.inject(m, {"a": lora}),
        "peft LoRA r=8 (q,v)": lambda m: peft.get_peft_model(
            m, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
        ),
        "eager forward": lambda m: m(**example),
    }
    secs: dict[str, list[float]] = {k: [] for k in makers}
    made: dict[str, int] = {}
    with torch.no_grad():
        base(**example)  # warm-up of the base's own first call
    for i in range(repeats + 1):  # round 0 is a warm-up of each provider (imports, first allocations)
        for k in list(makers)[i % len(makers) :] + list(makers)[: i % len(makers)]:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            if k == "eager forward":
                with torch.no_grad():
                    makers[k](model)
            else:
                makers[k](model)
            dt = time.perf_counter() - t0
            if i:
                secs[k].append(dt)
            if k.startswith("fxadapt"):
                made[k] = captures(model)
    rows = []
    floor = sorted(secs["eager forward"])[len(secs["eager forward"]) // 2]
    for k, xs in secs.items():
        p50 = sorted(xs)[len(xs) // 2]
        rows.append({"model": name, "provider": k, "layers": layers, "n": len(xs), "p50_s": p50,
                     "per_layer_ms": p50 * 1e3 / layers, "vs_eager_forward": p50 / floor,
                     "captures": made.get(k)})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="bert-base,llama-32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench/results/inject.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    info = {**cpu_run_info(), "threads": args.threads, "torch": torch.__version__, "transformers": tf.__version__,
            "peft": peft.__version__}  # fmt: skip
    print(f"# {info['cpu']}, {args.threads} threads, torch {info['torch']}, transformers {info['transformers']}, "
          f"peft {info['peft']}, fxadapt @ {info['git_sha']}{' (dirty)' if info['fxadapt_dirty'] else ''}")  # fmt: skip
    print(f"{'model':<10} {'provider':<24} {'n':>2} {'ms/layer':>9} {'x eager fwd':>11} {'captures':>8}")
    rows = []
    for name in args.models.split(","):
        for r in run(name, args.repeats):
            caps = "" if r["captures"] is None else r["captures"]
            print(f"{r['model']:<10} {r['provider']:<24} {r['n']:>2} {r['per_layer_ms']:9.1f} "
                  f"{r['vs_eager_forward']:11.1f} {caps:>8}", flush=True)  # fmt: skip
            rows.append(r)
    out = append_rows(args.out, "inject", info, rows)
    print(f"# appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()

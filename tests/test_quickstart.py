"""The README quickstart (inject -> HF Trainer -> save -> load -> predict) on a tiny BERT."""

from __future__ import annotations

import torch
import transformers as tf
from tiny_models import make_config

import fxadapt


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=9, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 99, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()  # learnable from the first token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_quickstart_with_hf_trainer(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(make_config("bert", num_labels=2))
    base_before = {k: v.clone() for k, v in model.bert.state_dict().items()}

    fxadapt.inject(model, {"sst-2": "seq_bn"})
    fxadapt.train_adapter(model, "sst-2")
    adapter_before = {k: v.clone() for k, v in fxadapt.adapter_parameters(model, "sst-2").items()}
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
    )
    tf.Trainer(model=model, args=args, train_dataset=_Rows()).train()

    base_after = {k: v for k, v in model.bert.state_dict().items() if ".fxadapt." not in f".{k}"}
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())  # the encoder stayed frozen
    changed = [k for k, v in fxadapt.adapter_parameters(model, "sst-2").items() if not torch.equal(v, adapter_before[k])]
    assert changed  # the adapter trained

    fxadapt.save_adapter(model, tmp_path / "sst-2", "sst-2", with_head=True)
    fresh = tf.BertForSequenceClassification(make_config("bert", num_labels=2))
    fresh.bert.load_state_dict(base_before)  # same pretrained encoder, untrained head
    fxadapt.load_adapter(fresh, tmp_path / "sst-2")
    batch = _Rows(n=6, seed=3)[:]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)

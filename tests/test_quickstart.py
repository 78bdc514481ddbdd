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
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def test_quickstart_with_hf_trainer(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(make_config("bert", num_labels=2))
    base_before = {k: v.clone() for k, v in model.bert.state_dict().items()}

    fxadapt.inject(model, {"sst-2": "seq_bn"})
    fxadapt.train_adapter(model, "sst-2")
    adapter_before = {k: v.clone() for k, v in fxadapt.adapter_parameters(model, "sst-2").items()}
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_strategy="no",
    )
    tf.Trainer(model=model, args=args, train_dataset=_Rows()).train()

    base_after = {k: v for k, v in model.bert.state_dict().items() if ".fxadapt." not in f".{k}"}
    assert all(torch.equal(base_after[k], v) for k, v in base_before.items())  # the encoder stayed frozen
    changed = [
        k
        for k, v in fxadapt.adapter_parameters(model, "sst-2").items()
        if not torch.equal(v, adapter_before[k])
    ]
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


def test_adapter_trainer_checkpoints_hold_only_the_adapter_and_resume(tmp_path):
    from fxadapt.trainer import AdapterTrainer

    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(make_config("bert", num_labels=2))
        fxadapt.inject(model, {"sst-2": "seq_bn"})
        fxadapt.train_adapter(model, "sst-2")
        args = tf.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=max_steps,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="steps",
            save_steps=2,
            use_cpu=True,
            logging_strategy="no",
            seed=0,
            data_seed=0,
        )
        AdapterTrainer(model=model, args=args, train_dataset=_Rows()).train(resume_from_checkpoint=resume)
        return model

    full = run(4)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    files = sorted(p.name for p in (checkpoint / "sst-2").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "head_model.safetensors"]
    assert not any(
        p.name.endswith("model.safetensors") and p.parent == checkpoint for p in checkpoint.iterdir()
    )
    resumed = run(4, resume=str(checkpoint))
    for (k, a), (_, b) in zip(
        fxadapt.adapter_parameters(full, "sst-2").items(),
        fxadapt.adapter_parameters(resumed, "sst-2").items(),
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)

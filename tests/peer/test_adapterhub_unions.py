"""ConfigUnion side by side with AdapterHub ``adapters`` 1.3.0: MAM and UniPELT (prefix tuning + bottleneck
(+ LoRA) under one name, UniPELT with AdapterHub's gates on all three) on BERT; a union of gated LoRA and gated
``seq_bn`` on BERT and GPT-2.

MAM and UniPELT are not compared on a decoder: AdapterHub 1.3.0's prefix tuning has no working decoder forward to
compare with (:func:`test_adapterhub_decoder_prefixes_are_inert_with_a_padding_mask` records it: with a padding
mask it masks its own prefixes out; without one, SDPA's top-left ``is_causal`` hides each token from itself).

Adapters are trained a few steps in ``adapters``, saved by it and loaded by fxadapt (equal outputs), then trained
in fxadapt, written in AdapterHub's format and loaded by ``adapters`` (equal outputs again).
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from tiny_models import make_config, make_inputs  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer

TOL = 1e-5
NAME = "u"


def _models(arch):
    torch.manual_seed(0)
    if arch == "bert":
        base = tf.BertForSequenceClassification(make_config("bert", num_labels=3))
    else:
        base = tf.GPT2LMHeadModel(make_config("gpt2"))
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    return base.eval(), theirs


def _out(model, inputs):
    out = model(**inputs, output_hidden_states=True)
    valid = inputs["attention_mask"].bool()
    logits = out.logits if out.logits.dim() == 2 else out.logits[valid]
    return torch.cat([logits.flatten(), out.hidden_states[-1][valid].flatten()])


def _train(model, inputs, params, steps=3, lr=0.5, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        result = model(**inputs).logits
        loss = (result - torch.randn(result.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize(
    "arch, union", [("bert", "mam"), ("bert", "unipelt"), ("bert", "lora+seq_bn"), ("gpt2", "lora+seq_bn")]
)
def test_union_through_the_formats(arch, union, tmp_path):
    inputs = make_inputs(arch)
    ours, theirs = _models(arch)
    fresh = copy.deepcopy(theirs)
    config = union
    if union == "lora+seq_bn":  # no prefix tuning: also on a decoder
        config = adapters.ConfigUnion(
            adapters.LoRAConfig(r=4, alpha=4, use_gating=True), adapters.SeqBnConfig(use_gating=True)
        )
    theirs.add_adapter(NAME, config=config)
    theirs.set_active_adapters(NAME)
    _train(theirs, inputs, [p for n, p in theirs.named_parameters() if f".{NAME}." in n])
    theirs.save_adapter(str(tmp_path / "ah"), NAME, with_head=False)

    fxadapt.load_adapter(ours, tmp_path / "ah")
    ours.eval()
    assert isinstance(fxadapt.list_adapters(ours)[NAME], fxadapt.ConfigUnion)
    with torch.no_grad():
        expected, got = _out(theirs, inputs), _out(ours, inputs)
        fxadapt.activate(ours, None)
        plain = _out(ours, inputs)
        fxadapt.activate(ours, NAME)
    assert (expected - plain).abs().max().item() > 1e-3  # the adapter does something
    assert (got - expected).abs().max().item() <= TOL

    _train(ours, inputs, list(fxadapt.adapter_parameters(ours, NAME).values()), steps=2, seed=3)
    fxadapt.save_adapter(ours, tmp_path / "fx", NAME, format="adapterhub")
    fresh.load_adapter(str(tmp_path / "fx"))
    fresh.set_active_adapters(NAME)
    fresh.eval()
    with torch.no_grad():
        expected, got = _out(ours, inputs), _out(fresh, inputs)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapterhub_decoder_prefixes_are_inert_with_a_padding_mask(arch):
    """Why MAM/UniPELT have no decoder comparison: AdapterHub's prefixes change nothing on a padded batch."""
    from tiny_models import make_model

    base = make_model(arch)
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter(NAME, config=adapters.PrefixTuningConfig(prefix_length=3, bottleneck_size=8))
    theirs.set_active_adapters(NAME)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if f".{NAME}." in n:
                p.normal_(std=0.3)
        inputs = make_inputs(arch)
        padded = (theirs(**inputs).logits - base(**inputs).logits).abs().max().item()
        unmasked = theirs(input_ids=inputs["input_ids"]).logits - base(input_ids=inputs["input_ids"]).logits
    assert padded <= 1e-6
    assert unmasked.abs().max().item() > 1e-2

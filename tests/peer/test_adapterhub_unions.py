"""ConfigUnion side by side with AdapterHub ``adapters`` 1.3.0: MAM and UniPELT (prefix tuning + bottleneck
(+ LoRA) under one name, UniPELT with AdapterHub's gates on all three) on BERT; a union of gated LoRA and gated
``seq_bn`` on BERT and GPT-2.

MAM and UniPELT are not compared on a decoder: AdapterHub 1.3.0's prefix tuning has no working decoder forward to
compare with (:func:`test_adapterhub_decoder_prefixes_are_inert_with_a_padding_mask` records it: with a padding
mask it masks its own prefixes out; without one, SDPA's top-left ``is_causal`` hides each token from itself).

Their weights are trained a few steps in ``adapters`` and copied into fxadapt's union by a hand-written map of
AdapterHub's parameter names (fxadapt cannot read AdapterHub's prefix-tuning weights from a checkpoint yet); then
trained in fxadapt and copied back into a fresh ``adapters`` model: equal outputs both ways. A union without prefix
tuning (gated LoRA + gated ``seq_bn``) also goes both ways through the checkpoint formats.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from tiny_models import make_config, make_inputs  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.model import layers_of  # noqa: E402

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


_LORA_MODULE = {"query": ["attn.q"], "value": ["attn.v"], "c_attn": ["attn.q", "attn.v"]}


def _mapping(theirs, ours):
    """AdapterHub parameter -> [(fxadapt parameter, slice of the AdapterHub tensor or None)], written from the
    parameter names AdapterHub uses (prefix pool, prefix gates, bottleneck, LoRA incl. its merged c_attn)."""
    paths, _ = layers_of(ours)
    fx = fxadapt.adapter_parameters(ours, NAME)
    out = {}
    for n, p in theirs.named_parameters():
        if f".{NAME}." not in n:
            continue
        m = re.search(r"\.(?:layer|h)\.(\d+)\.", n)
        layer = paths[int(m.group(1))] if m else paths[0]
        pre = f"{layer}.fxadapt.{NAME}"
        if ".prefix_tunings." in n:
            (rest,) = re.findall(rf"prefix_tunings\.{NAME}\.self_prefix\.(.+)$", n)
            targets = [(f"{paths[0]}.fxadapt.{NAME}.attn_kv.pool.{rest}", None)]
        elif ".prefix_gates." in n:
            targets = [(f"{pre}.attn_kv.gate.{n.rsplit('.', 1)[1]}", None)]
        elif ".adapters." in n:
            rest = n.split(f".adapters.{NAME}.", 1)[1]
            rest = re.sub(r"^adapter_down\.0\.", "down.", rest).replace("adapter_up.", "up.")
            targets = [(f"{pre}.ffn_out.{rest}", None)]
        elif ".loras." in n:
            module = n.split(".loras.")[0].rsplit(".", 1)[1]
            param = n.split(f".loras.{NAME}.", 1)[1]
            kinds = _LORA_MODULE[module]
            targets = []
            for j, kind in enumerate(kinds):
                if len(kinds) == 1:
                    rows = None
                else:  # AdapterHub's LoRAMergedLinear: the enabled parts stacked
                    size = p.shape[0] // len(kinds)
                    rows = slice(j * size, (j + 1) * size)
                targets.append((f"{pre}.{kind.replace('.', '_')}.{param}", rows))
        else:
            raise AssertionError(f"unmapped AdapterHub parameter {n}")
        for key, _ in targets:
            assert key in fx, (n, key, sorted(fx)[:8])
        out[n] = targets
    mapped = {k for ts in out.values() for k, _ in ts}
    assert mapped == set(fx), sorted(set(fx) - mapped)
    return out


def _copy(theirs, ours, to_ours: bool):
    fx = fxadapt.adapter_parameters(ours, NAME)
    ah = dict(theirs.named_parameters())
    with torch.no_grad():
        for n, targets in _mapping(theirs, ours).items():
            for key, rows in targets:
                src = ah[n] if rows is None else ah[n][rows]
                if to_ours:
                    fx[key].copy_(src.reshape(fx[key].shape))
                else:
                    src.copy_(fx[key].reshape(src.shape))


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


@pytest.mark.parametrize("arch", ["bert"])
@pytest.mark.parametrize("union", ["mam", "unipelt"])
def test_union_both_directions(arch, union):
    inputs = make_inputs(arch)
    ours, theirs = _models(arch)
    fresh = copy.deepcopy(theirs)
    theirs.add_adapter(NAME, config=union)
    theirs.set_active_adapters(NAME)
    _train(theirs, inputs, [p for n, p in theirs.named_parameters() if f".{NAME}." in n])

    fxadapt.inject(ours, {NAME: union})
    ours.eval()
    _copy(theirs, ours, to_ours=True)
    with torch.no_grad():
        expected, got = _out(theirs, inputs), _out(ours, inputs)
        fxadapt.activate(ours, None)
        plain = _out(ours, inputs)
        fxadapt.activate(ours, NAME)
    assert (expected - plain).abs().max().item() > 1e-3
    assert (got - expected).abs().max().item() <= TOL

    _train(ours, inputs, list(fxadapt.adapter_parameters(ours, NAME).values()), steps=2, seed=3)
    fresh.add_adapter(NAME, config=union)
    fresh.set_active_adapters(NAME)
    fresh.eval()
    _copy(fresh, ours, to_ours=False)
    with torch.no_grad():
        expected, got = _out(ours, inputs), _out(fresh, inputs)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_union_without_prefix_through_the_formats(arch, tmp_path):
    inputs = make_inputs(arch)
    ours, theirs = _models(arch)
    fresh = copy.deepcopy(theirs)
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

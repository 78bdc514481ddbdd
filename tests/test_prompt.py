"""Prompt tuning: the model equals the untouched model fed the prompted embeddings (its definition), plus the
usual invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import layers_of

P = 3


def _prompted(arch):
    model = make_model(arch)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"p": fxadapt.PromptTuningConfig(prompt_length=P)})
    prompt = layers_of(model)[1][0].fxadapt["p"]["embed"].prompt
    return base, model, prompt.detach()


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "t5", "distilbert"])
def test_equals_base_model_on_prompted_embeddings(arch):
    base, model, prompt = _prompted(arch)
    inputs = make_inputs(arch)
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    b = ids.shape[0]
    with torch.no_grad():
        got = main_output(model(input_ids=ids, attention_mask=mask, **inputs))
        embeds = torch.cat([prompt.expand(b, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        expected = main_output(
            base(
                inputs_embeds=embeds,
                attention_mask=torch.cat([torch.ones(b, P, dtype=mask.dtype), mask], 1),
                **inputs,
            )
        )
    assert torch.equal(got, expected)


def test_vit_prompt_after_the_embeddings():
    base, model, prompt = _prompted("vit")
    inputs = make_inputs("vit")
    handle = base.embeddings.register_forward_hook(
        lambda m, a, out: torch.cat([prompt.expand(out.shape[0], -1, -1), out], 1)
    )
    with torch.no_grad():
        expected = base(**inputs).last_hidden_state
        got = model(**inputs).last_hidden_state
    handle.remove()
    assert got.shape[1] == expected.shape[1] and torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_and_labels(arch):
    base, model, prompt = _prompted(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        b = labels.shape[0]
        embeds = torch.cat([prompt.expand(b, -1, -1), base.get_input_embeddings()(inputs["input_ids"])], 1)
        expected = base(
            inputs_embeds=embeds,
            attention_mask=torch.cat([torch.ones(b, P, dtype=torch.long), inputs["attention_mask"]], 1),
            labels=torch.cat([torch.full((b, P), -100), labels], 1),
        ).loss
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_invariants(arch, tmp_path):
    base, model, _ = _prompted(arch)
    inputs = make_inputs(arch)
    fxadapt.train_adapter(model, "p")
    model.eval()
    main_output(model(**inputs)).pow(2).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(
        fxadapt.adapter_parameters(model, "p")
    )
    with torch.no_grad():
        out = main_output(model(**inputs))
    fxadapt.save_adapter(model, tmp_path, "p")
    fresh = copy.deepcopy(base)
    fxadapt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), out)
        fxadapt.activate(model, None)
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))
    fxadapt.remove(model, "p")
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))


def test_invalid_config():
    with pytest.raises(fxadapt.ConfigError, match=r"prompt_length=0"):
        fxadapt.PromptTuningConfig(prompt_length=0)
    with pytest.raises(fxadapt.ConfigError, match=r"combine='suffix'"):
        fxadapt.PromptTuningConfig(combine="suffix")
    with pytest.raises(fxadapt.ConfigError, match=r"prompt_init_ids"):
        fxadapt.PromptTuningConfig(prompt_init="from_string")

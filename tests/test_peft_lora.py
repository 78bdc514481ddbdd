"""Side by side with PEFT (same venv): PEFT's LoRA and fxadapt's LoRA on the same base weights and LoRA weights.

The fxadapt config is built from PEFT's with ``LoRAConfig.from_peft``; PEFT's randomised ``lora_A``/``lora_B`` are
copied across; outputs must agree within 1e-5, and merging must give PEFT's merged weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import get_state, layers_of

peft = pytest.importorskip("peft")

CASES = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj", "up_proj"],
    "gpt2": ["c_attn"],  # fused q/k/v projection, HF Conv1D (PEFT sets fan_in_fan_out itself)
}


def _peft_model(base, targets, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kwargs)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), config


def _copy_from_peft(peft_model, model, name):
    """PEFT keeps ``<layer path>.<module path>.lora_A.default.weight``; fxadapt the site's ``lora_A``."""
    peft_params = dict(peft_model.named_parameters())
    paths, layers = layers_of(model)
    record = get_state(model).adapters[name]
    with torch.no_grad():
        for (index, kind), site in record.sites.items():
            module = layers[index].fxadapt[name][kind.replace(".", "_")]
            for which in ("lora_A", "lora_B"):
                key = f"base_model.model.{paths[index]}.{site.module}.{which}.default.weight"
                getattr(module, which).copy_(peft_params[key])
    return len(record.sites)


@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_equals_peft(arch, rslora):
    base = make_model(arch)
    inputs = make_inputs(arch)
    peft_model, peft_config = _peft_model(base, CASES[arch], use_rslora=rslora)
    config = fxadapt.LoRAConfig.from_peft(peft_config)
    assert (config.r, config.alpha, config.use_rslora) == (4, 8, rslora)
    assert config.target_modules == tuple(sorted(CASES[arch]))

    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": config})
    n_sites = _copy_from_peft(peft_model, model, "a")
    assert n_sites == len(CASES[arch]) * len(layers_of(model)[0])
    with torch.no_grad():
        expected = main_output(peft_model(**inputs))
        got = main_output(model(**inputs))
        plain = main_output(base(**inputs))
    assert not torch.allclose(expected, plain, atol=1e-3)
    assert (got - expected).abs().max().item() <= 1e-5

    # merging: fxadapt's merged weights are PEFT's merged weights (GPT-2: Conv1D's [in, out] layout)
    fxadapt.merge(model, "a")
    merged = peft_model.merge_and_unload().state_dict()
    ours = model.state_dict()
    diffs = [(ours[k] - v).abs().max().item() for k, v in merged.items()]
    assert max(diffs) <= 1e-6


def test_gpt2_fused_qkv_site_equals_peft_c_attn():
    """PEFT's LoRA on the whole ``c_attn`` is fxadapt's ``attn.qkv`` site (a LoRA over all 3·d outputs)."""
    base = make_model("gpt2")
    inputs = make_inputs("gpt2")
    peft_model, _ = _peft_model(base, ["c_attn"])
    assert peft_model.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=("attn.qkv",), r=4, alpha=8)})
    _copy_from_peft(peft_model, model, "a")
    with torch.no_grad():
        diff = (main_output(model(**inputs)) - main_output(peft_model(**inputs))).abs().max().item()
    assert diff <= 1e-5


def test_from_peft_dict_and_unsupported_settings():
    data = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.1).to_dict()
    config = fxadapt.LoRAConfig.from_peft(data)
    assert config == fxadapt.LoRAConfig(target_modules=("q_proj",), r=2, alpha=4, dropout=0.1)
    assert fxadapt.LoRAConfig.from_peft({**data, "init_lora_weights": "gaussian"}).init_weights == "gaussian"
    for change, match in [
        ({"rank_pattern": {"query": 2}}, r"rank_pattern=\{'query': 2\} is not supported"),
        ({"bias": "all"}, r"bias='all'"),
        ({"layers_to_transform": [0]}, r"layers_to_transform=\[0\]"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa'"),
        ({"target_modules": "all-linear"}, r"target_modules='all-linear'"),
        ({"peft_type": "IA3"}, r"peft_type='IA3'"),
    ]:
        with pytest.raises(fxadapt.ConfigError, match=match):
            fxadapt.LoRAConfig.from_peft({**data, **change})

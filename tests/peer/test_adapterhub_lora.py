"""Side by side with AdapterHub ``adapters`` 1.3.0 (transformers 4.57.6, run in .venv-peer): ``lora`` and ``ia3``.

Same base weights; AdapterHub's randomised ``loras.<name>.lora_A/lora_B`` copied into fxadapt's sites; outputs must
agree within 1e-5. On GPT-2 AdapterHub keeps one ``LoRAMergedLinear`` for the fused ``c_attn`` whose A/B stack the
enabled q/k/v parts (a grouped product); fxadapt has one LoRA per slice site: the copy splits them.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from tiny_models import main_output, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.model import get_state, layers_of  # noqa: E402

pytestmark = pytest.mark.peer


def _adapterhub_model(base, preset, seed=1, **config):
    model = copy.deepcopy(base)
    adapters.init(model)
    model.add_adapter("a", config=preset if not config else getattr(adapters, preset)(**config))
    model.set_active_adapters("a")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".loras.a." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "ia3" in str(preset) else 0.0))
    return model.eval()


def _copy_from_adapterhub(ah_model, model, name):
    """fxadapt site (layer, kind) -> AdapterHub's ``<layer>.<module>.loras.<name>``; fused c_attn split by part."""
    paths, layers = layers_of(model)
    record = get_state(model).adapters[name]
    config = record.config
    with torch.no_grad():
        for (index, kind), site in record.sites.items():
            ours = layers[index].fxadapt[name][kind.replace(".", "_")]
            theirs = ah_model.get_submodule(f"{paths[index]}.{site.module}").loras[name]
            b, a = theirs.lora_B, getattr(theirs, "lora_A", None)
            if site.out_slice is not None:  # the part's position among the enabled q/k/v parts
                roles = [m for m in "qkv" if f"attn.{m}" in config.sites]
                j, width = roles.index(kind[-1]), site.out_slice[1] - site.out_slice[0]
                b = b[j * width : (j + 1) * width]
                a = a[j * config.r : (j + 1) * config.r] if a is not None else None
            ours.lora_B.copy_(b)
            if a is not None:
                ours.lora_A.copy_(a)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2"])
@pytest.mark.parametrize("preset", ["lora", "ia3"])
def test_equals_adapterhub(arch, preset):
    base = make_model(arch)
    inputs = make_inputs(arch)
    ah_model = _adapterhub_model(base, preset)
    config = fxadapt.LoRAConfig.from_adapterhub(ah_model.adapters_config.get("a"))
    assert config == fxadapt.methods.preset(preset)  # AdapterHub's preset is fxadapt's preset

    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": preset})
    _copy_from_adapterhub(ah_model, model, "a")
    with torch.no_grad():
        expected = main_output(ah_model(**inputs))
        got = main_output(model(**inputs))
        plain = main_output(base(**inputs))
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter does something
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_lora_options_and_merge_equal_adapterhub(arch):
    """Rank, alpha, all of q/k/v, the FFN projections; merged weights equal AdapterHub's merge_adapter."""
    base = make_model(arch)
    inputs = make_inputs(arch)
    ah_kwargs = dict(r=3, alpha=5, attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)
    ah_model = _adapterhub_model(base, "LoRAConfig", **ah_kwargs)
    config = fxadapt.LoRAConfig.from_adapterhub(ah_model.adapters_config.get("a"))
    assert config.sites == ("attn.q", "attn.k", "attn.v", "ffn.up", "ffn.down")
    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": config})
    _copy_from_adapterhub(ah_model, model, "a")
    with torch.no_grad():
        assert (main_output(model(**inputs)) - main_output(ah_model(**inputs))).abs().max().item() <= 1e-5

    fxadapt.merge(model, "a")
    ah_model.merge_adapter("a")
    theirs = ah_model.state_dict()
    ours = {k: v for k, v in model.state_dict().items() if ".fxadapt." not in k}
    assert max((theirs[k] - v).abs().max().item() for k, v in ours.items()) <= 1e-6
    with torch.no_grad():
        assert (main_output(model(**inputs)) - main_output(ah_model(**inputs))).abs().max().item() <= 1e-5

"""Side by side with AdapterHub ``adapters`` 1.3.0 (transformers 4.57.6, run in .venv-peer).

Same base weights, same adapter weights copied across: fxadapt's bottleneck presets must give AdapterHub's outputs.
Also the transformers 4.57 smoke test of the core compiler. Skipped where ``adapters`` is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from tiny_models import main_output, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.model import layers_of  # noqa: E402

pytestmark = pytest.mark.peer

# our site key -> AdapterHub's module holding the adapter, relative to the layer
_AH_SITE = {"attn_out": "attention.output", "ffn_out": "output"}


def _copy_into_fxadapt(ah_model, model, name):
    """Copy AdapterHub's adapter weights (adapter_down.0 / adapter_up / scaling) into fxadapt's adapter."""
    paths, layers = layers_of(model)
    with torch.no_grad():
        for path, layer in zip(paths, layers):
            ah_layer = ah_model.get_submodule(path)
            for key, module in layer.fxadapt[name].items():
                ah = ah_layer.get_submodule(_AH_SITE[key]).adapters[name]
                module.down.weight.copy_(ah.adapter_down[0].weight)
                module.down.bias.copy_(ah.adapter_down[0].bias)
                module.up.weight.copy_(ah.adapter_up.weight)
                module.up.bias.copy_(ah.adapter_up.bias)
                if isinstance(module.scaling, torch.nn.Parameter):
                    module.scaling.copy_(ah.scaling)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"])
def test_bottleneck_equals_adapterhub(arch, preset):
    base = make_model(arch)
    inputs = make_inputs(arch)
    ah_model = copy.deepcopy(base)
    adapters.init(ah_model)
    ah_model.add_adapter("a", config=preset)
    ah_model.set_active_adapters("a")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ah_model.named_parameters():
            if ".adapters.a." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ah_model.eval()

    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": preset})
    _copy_into_fxadapt(ah_model, model, "a")
    with torch.no_grad():
        expected = main_output(ah_model(**inputs))
        got = main_output(model(**inputs))
        plain = main_output(base(**inputs))
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter does something
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama", "t5", "bart", "vit", "deberta-v2"])
def test_core_on_transformers_457(arch):
    import transformers

    assert transformers.__version__.startswith("4.57")
    model = make_model(arch)
    base = copy.deepcopy(model)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": "double_seq_bn"})
    with torch.no_grad():
        for n, p in fxadapt.adapter_parameters(model, "a").items():
            if ".up." in n:
                p.zero_()
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.normal_(std=0.2)
        assert not torch.allclose(main_output(model(**inputs)), main_output(base(**inputs)), atol=1e-4)
    explanation = fxadapt.explain(model)
    assert all({"attn.out", "ffn.out"} <= {s.split()[0] for s in le.sites} for le in explanation.layers)

"""The declared ``Method`` capabilities the generic verbs call (``methods/base.py``), exercised by a toy method
that no verb knows: a learned per-channel scale on the embedding output (a model part applied by a hook)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model
from torch import nn

import fxadapt
from fxadapt.methods import base
from fxadapt.parts import active_parts


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmbedScaleConfig(base.AdapterConfig):
    method = "test_embed_scale"


class _Scale(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(hidden))


class EmbedScale(base.Method):
    name = "test_embed_scale"
    config_class = EmbedScaleConfig
    installs = 0

    def site_kinds(self, config):
        return ()

    def build_model_parts(self, config, context):
        return {(1, "embed.scale"): _Scale(context.hidden_size)}  # kept in the second layer's container

    def model_hooks(self, config, context):
        _, embed = context.embed()

        def install(model):
            type(self).installs += 1

            def hook(module, args, output):
                for _, part in active_parts(model, "embed.scale"):
                    output = output * part.scale
                return output

            return embed.register_forward_hook(hook)

        return {"scale": install}


@pytest.fixture
def toy_method():
    base.register_method(EmbedScale)
    yield
    base._METHODS.pop(EmbedScale.name)
    base._BY_CONFIG.pop(EmbedScaleConfig)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_model_part_with_shared_hook(toy_method, arch, tmp_path):
    model = make_model(arch)
    base_model = copy.deepcopy(model)
    inputs = make_inputs(arch)
    with torch.no_grad():
        plain = main_output(model(**inputs))
    EmbedScale.installs = 0
    fxadapt.inject(model, {"a": EmbedScaleConfig(), "b": EmbedScaleConfig()}, activate=False)
    assert EmbedScale.installs == 1  # one hook serves both adapters
    params = fxadapt.adapter_parameters(model, "a")
    assert len(params) == 1 and next(iter(params)).endswith("fxadapt.a.embed_scale.scale")
    with torch.no_grad():
        fxadapt.adapter_parameters(model, "a")[next(iter(params))].fill_(2.0)
        fxadapt.activate(model, None)
        assert torch.equal(main_output(model(**inputs)), plain)
        fxadapt.activate(model, "a")
        scaled = main_output(model(**inputs))
        # independent reference: the untouched model fed twice its embedding output
        _, embed = fxadapt.parts.find_embed_module(base_model, _first_layer(base_model), None)
        handle = embed.register_forward_hook(lambda m, a, out: out * 2.0)
        expected = main_output(base_model(**inputs))
        handle.remove()
    assert (scaled - expected).abs().max().item() <= 1e-6
    fxadapt.save_adapter(model, tmp_path / "a", "a")
    fxadapt.remove(model, "a")
    assert model.__dict__.get("_fxadapt_hooks")  # still needed by "b"
    fxadapt.remove(model, "b")
    assert "_fxadapt_hooks" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), plain)
    fxadapt.load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), scaled)


def _first_layer(model):
    from fxadapt.model import layers_of

    return layers_of(model)[1][0]


def test_capability_errors(toy_method):
    model = make_model("bert")
    fxadapt.inject(model, {"s": EmbedScaleConfig(), "bn": "seq_bn"}, activate=False)
    with pytest.raises(fxadapt.NotMergeableError, match=r"'s' \(test_embed_scale\) cannot be merged.*"):
        fxadapt.merge(model, "s")
    with pytest.raises(fxadapt.CompositionError, match="'s' is test_embed_scale"):
        fxadapt.add_fusion(model, ["bn", "s"])
    with pytest.raises(fxadapt.ConfigError, match=r"'s' .* has no reparameterisation to eject"):
        fxadapt.eject_prefix(model, "s")

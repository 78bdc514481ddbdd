"""(IA)^3 on bert, llama, gpt2 (k/v slices of the fused c_attn), t5 and vit.

The reference scales the rows of each adapted projection's weight and bias by hand (``alpha · B``; ``Conv1D``
columns) in a deepcopy of the untouched base model: independent of the graph rewrite and of ``Method.merge``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_lora import ARCHS, check_invariants, edit_projection, site_weights
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import get_state


def ia3_reference(base, model, name, arch, kinds, alpha: float = 1.0):
    ref = copy.deepcopy(base)
    weights = site_weights(model, name)
    for i, path in enumerate(get_state(model).layer_paths):
        for kind in kinds:
            scale = alpha * weights[(i, kind.replace(".", "_"))]["lora_B"].view(-1)

            def edit(w, bias, scale=scale):
                w *= scale[:, None]
                if bias is not None:
                    bias *= scale

            edit_projection(ref.get_submodule(path), arch, kind, edit)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_invariants(arch, tmp_path):
    """The preset: keys, values and the FFN up projection (AdapterHub's IA3Config), init ones."""
    # self-attention only: the reference writes out self-attention sites (cross-attention: test_zoo, peer tests)
    check_invariants(arch, fxadapt.IA3Config(cross_attention=False), ia3_reference, tmp_path)


def test_ia3_alpha_and_sites(tmp_path):
    """The scale is alpha · B (AdapterHub), so with alpha != 1 the ones init is not a no-op."""
    config = fxadapt.IA3Config(sites=("attn.q", "attn.v"), alpha=2.5)

    def reference(base, model, name, arch, kinds):
        return ia3_reference(base, model, name, arch, kinds, alpha=2.5)

    check_invariants("gpt2", config, reference, tmp_path, noop_init=False)


def test_ia3_preset_and_shapes():
    config = fxadapt.methods.preset("ia3")
    assert isinstance(config, fxadapt.IA3Config) and isinstance(config, fxadapt.LoRAConfig)
    assert config.method == "ia3" and config.composition_mode == "scale"
    assert (config.sites, config.r, config.alpha, config.init_weights) == (
        ("attn.k", "attn.v", "ffn.up"),
        1,
        1,
        "ia3",
    )
    model = make_model("bert")
    fxadapt.inject(model, {"a": "ia3"})
    params = fxadapt.adapter_parameters(model, "a")
    shapes = {k.split(".fxadapt.a.")[1]: tuple(p.shape) for k, p in params.items() if "layer.0." in k}
    assert shapes == {"attn_k.lora_B": (32, 1), "attn_v.lora_B": (32, 1), "ffn_up.lora_B": (48, 1)}
    assert all(torch.equal(p, torch.ones_like(p)) for p in params.values())


def test_lora_scale_mode_is_ia3():
    """LoRAConfig(composition_mode="scale") is AdapterHub's (IA)^3 math under the "lora" method name."""
    base = make_model("llama")
    inputs = make_inputs("llama")
    outs = []
    for config in (
        fxadapt.IA3Config(sites=("attn.v",)),
        fxadapt.LoRAConfig(sites=("attn.v",), r=1, alpha=1, composition_mode="scale", init_weights="ia3"),
    ):
        model = copy.deepcopy(base)
        fxadapt.inject(model, {"a": config})
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in fxadapt.adapter_parameters(model, "a").values():
                p.copy_(torch.randn(p.shape, generator=gen))
            outs.append(main_output(model(**inputs)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 2}, r"r=2 .*1 with composition_mode='scale'"),
        ({"composition_mode": "add"}, r"IA3Config.composition_mode='add' is invalid; expected 'scale'"),
        ({"dropout": 0.1}, r"dropout=0.1 .*composition_mode='scale'"),
        ({"init_weights": "gaussian"}, r"init_weights='gaussian'"),
        ({"alpha": 0}, r"IA3Config.alpha=0"),
        ({"sites": ("attn.kk",)}, r"'attn.kk'.*did you mean 'attn.k'"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(fxadapt.ConfigError, match=match):
        fxadapt.IA3Config(**kwargs)


def test_config_roundtrip_through_dict():
    from fxadapt.methods.base import config_from_dict

    for config in (fxadapt.IA3Config(leave_out=(1,)), fxadapt.LoRAConfig(target_modules=["q_proj"], r=2)):
        assert config_from_dict(config.to_dict()) == config

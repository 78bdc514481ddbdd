"""What stays unsupported in the LoRA family and ReFT: one readable sentence naming the method and the missing
feature, a typed error, and the model (and the folder) left as they were."""

from __future__ import annotations

import pytest
from lora_family_reference import snapshot
from tiny_models import make_inputs, make_model

import fxadapt

L = fxadapt.LoRAConfig


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: L(vera_d=0.1), fxadapt.ConfigError, r"VeRA needs both vera_d and vera_b"),
        (
            lambda: fxadapt.IA3Config(use_dora=True),
            fxadapt.ConfigError,
            r"\(IA\)\^3 scales have no low-rank update",
        ),
        (lambda: L(variant="hf"), fxadapt.ConfigError, r"variant='hf' is invalid.*'adapterhub', 'peft'"),
        (
            lambda: fxadapt.MTLLoRAConfig(task_specific_matrix_type="linear"),
            fxadapt.ConfigError,
            r"'linear' TaskSpecificLinear .* cannot be built",
        ),
        (lambda: fxadapt.ReftConfig(prefix_positions=0), fxadapt.ConfigError, r"positions to intervene on"),
    ],
)
def test_invalid_configs(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_inject_refusals_leave_the_model_unchanged():
    model = make_model("llama")
    inputs = make_inputs("llama")
    unchanged = snapshot(model, inputs)
    cases = [
        (
            L(vera_d=0.1, vera_b=0.0, sites=("attn.q", "attn.v")),
            fxadapt.ConfigError,
            r"VeRA \(variant='adapterhub'\)",
        ),
        (
            L(target_modules=["q_prj"]),
            fxadapt.SiteNotFoundError,
            r"target_modules \['q_prj'\] not found.*q_proj",
        ),
        (
            L(sites=("model:lm_haed",)),
            fxadapt.SiteNotFoundError,
            r"no Linear-like module 'lm_haed'.*'lm_head'",
        ),
        (
            L(vera_d=0.1, vera_b=0.0, sites=("model:lm_head",), variant="peft"),
            fxadapt.ConfigError,
            r"VeRA on modules",
        ),
    ]
    for config, error, match in cases:
        with pytest.raises(error, match=match):
            fxadapt.inject(model, {"a": config})
        unchanged()
    gpt2 = make_model("gpt2")
    unchanged_gpt2 = snapshot(gpt2, make_inputs("gpt2"))
    with pytest.raises(fxadapt.ConfigError, match=r"\(IA\)\^3 on the input of 'attn.k'.*slice of the fused"):
        fxadapt.inject(gpt2, {"a": fxadapt.IA3Config(sites=("attn.k",), feedforward_modules=("attn.k",))})
    unchanged_gpt2()


def test_composition_and_format_refusals(tmp_path):
    model = make_model("bert")
    inputs = make_inputs("bert")
    fxadapt.inject(model, {"d": L(use_dora=True, variant="peft"), "l": "lora", "r": "direft"}, activate=False)
    unchanged = snapshot(model, inputs)
    with pytest.raises(
        fxadapt.CompositionError, match=r"'d' \(lora, DoRA \(use_dora=True\)\).*alone or in a Stack"
    ):
        fxadapt.activate(model, fxadapt.Parallel("d", "l"))
    unchanged()
    for name, fmt, match in [
        ("d", "adapterhub", r"DoRA with variant='peft' computes PEFT's formula"),
        ("r", "adapterhub", r"DiReFT \(subtract_projection=False\).*NoReFT"),
        ("r", "peft", r"fxadapt writes LoRA, DoRA, VeRA, \(IA\)\^3, prompt and prefix tuning, not 'reft'"),
    ]:
        with pytest.raises(fxadapt.CheckpointError, match=match):
            fxadapt.save_adapter(model, tmp_path / name / fmt, name, format=fmt)
        assert not (tmp_path / name / fmt).exists()
    fxadapt.activate(model, fxadapt.Parallel("r", "l"))
    with pytest.raises(fxadapt.CompositionError, match=r"ReFT adapters act on the layer output.*Stack"):
        model(**inputs)

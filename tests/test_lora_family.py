"""DoRA, VeRA, DoRA+VeRA, MTL-LoRA, input-scaled (IA)^3, LoRA outside the layers and ReFT on bert, llama, gpt2, t5 and
vit (tiny configs): no-op init ⇒ bit-identical (where the method has one); random weights ⇒ equal to the
hand-written eager references of ``lora_family_reference.py`` (≤ 1e-6 fp32); gradients reach only the adapter's
trainable parameters; save → load identical; merge ≈ unmerged and unmerge restores the weights; remove ⇒
bit-identical. All adapters of one architecture live in one model (one tracing), activated one at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_family_reference import OUTSIDE, reference, reft_reference
from tiny_models import assert_fp64_equal, fp64, in_fp64, main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import get_state, layers_of
from fxadapt.rewrite import site_key

ARCHS = ["bert", "llama", "gpt2", "t5", "vit"]
L = fxadapt.LoRAConfig
QVU = ("attn.q", "attn.v", "ffn.up")


def configs(arch):
    """name -> (config, no-op at init)"""
    return {
        "dora": (L(use_dora=True, sites=QVU), True),
        "dora_peft": (L(use_dora=True, sites=QVU, variant="peft", alpha=4), True),
        "vera": (L(vera_d=0.1, vera_b=0.0, init_weights="vera", sites=("attn.q",), r=4), True),
        "vera_peft": (L(vera_d=0.1, vera_b=0.0, init_weights="vera", sites=QVU, variant="peft", r=6), True),
        "dvora": (
            L(use_dora=True, vera_d=0.1, vera_b=0.0, init_weights="vera", sites=("attn.q",), r=4),
            True,
        ),
        "ia3_input": (
            fxadapt.IA3Config(sites=("attn.k", "ffn.down"), feedforward_modules=("ffn.down",)),
            True,
        ),
        "mtl_lora": (fxadapt.MTLLoRAConfig(n_up_projection=2, r=4, sites=("attn.q", "attn.v")), True),
        "lora_outside": (L(sites=("attn.q", f"model:{OUTSIDE[arch]}"), r=4, alpha=8), True),
        "loreft": (fxadapt.ReftConfig(prefix_positions=2, suffix_positions=1), False),
        "direft_tied": (
            fxadapt.ReftConfig(
                orthogonality=False, subtract_projection=False, tied_weights=True, suffix_positions=2
            ),
            False,
        ),
    }


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    pooled = getattr(out, "pooler_output", None)  # where pooler.dense acts
    return torch.cat([main_output(out).flatten(), *([pooled.flatten()] if pooled is not None else [])])


def _randomise(model, name, gen):
    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(model, name).items():
            if (
                ".shared." in key or "parametrizations" in key
            ):  # VeRA's frozen projections; an orthogonal factor
                continue
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _tensors(model, name):
    """{(layer index | None for model parts, site kind | module path, param): tensor} from the state names."""
    state = get_state(model)
    record = state.adapters[name]
    _, layers = layers_of(model)
    out = {}
    for index, kinds in record.placements.items():
        for kind in kinds:
            module = layers[index].fxadapt[name][site_key(kind)]
            where = (None, kind[len("model:") :]) if kind.startswith("model:") else (index, kind)
            for pname, t in module.state_dict().items():
                out[(*where, pname)] = t.detach().clone()
    return out


def _reft_units(model, name):
    _, layers = layers_of(model)
    out = {}
    for index, layer in enumerate(layers):
        container = layer._modules.get("fxadapt")
        if container is None or name not in container or "reft" not in container[name]:
            continue
        module = container[name]["reft"]
        p = {}
        for u, unit in enumerate(module.units):
            p[f"units.{u}.learned_source.weight"] = unit.learned_source.weight.detach()
            p[f"units.{u}.learned_source.bias"] = unit.learned_source.bias.detach()
            p[f"units.{u}.projection_weight"] = (
                unit.projection.weight.detach()
            )  # R (orthogonalised if LoReFT)
        out[index] = p
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_family_invariants(arch, tmp_path):
    base = make_model(arch, attention_dropout=0.0) if arch == "llama" else make_model(arch)
    inputs = make_inputs(arch)
    plain = _out(base, inputs)
    cases = configs(arch)
    model = copy.deepcopy(base)
    fxadapt.inject(model, {name: config for name, (config, _) in cases.items()}, activate=False)
    paths, _ = layers_of(model)
    gen = torch.Generator().manual_seed(11)
    outputs = {}
    for name, (config, noop) in cases.items():
        fxadapt.activate(model, name)
        model.eval()
        assert torch.equal(_out(model, inputs), plain) == noop, name
        _randomise(model, name, gen)
        got = _out(model, inputs)
        assert (got - plain).abs().max() > 1e-4, name
        if config.method == "reft" and config.orthogonality:
            r = _reft_units(model, name)[0]["units.0.projection_weight"]
            assert torch.allclose(r @ r.t(), torch.eye(r.shape[0]), atol=1e-5)
        # in fp64: the reference's order of the arithmetic agrees far below fp32's rounding (CPU-dependent)
        with fp64(model, base):
            if config.method == "reft":
                units = _reft_units(model, name)
                ref = reft_reference(base, config, units, paths, inputs.get("attention_mask"))
            else:
                ref = reference(base, arch, config, _tensors(model, name), paths)
            got64 = _out(model, in_fp64(inputs))
            assert_fp64_equal(got64, _out(ref, in_fp64(inputs)), name)

        # gradients: exactly the adapter's trainable parameters
        fxadapt.train_adapter(model, name, train_head=False)
        out = model(**inputs)
        pooled = getattr(out, "pooler_output", None)
        (main_output(out).pow(2).mean() + (pooled.pow(2).mean() if pooled is not None else 0)).backward()
        adapter = fxadapt.adapter_parameters(model, name)
        trainable = {k for k, p in adapter.items() if ".shared." not in k}
        for key, p in model.named_parameters():
            if key in trainable:
                assert p.grad is not None and p.grad.abs().sum() > 0, (name, key)
            else:
                assert p.grad is None, (name, key)
        model.zero_grad(set_to_none=True)
        model.eval()

        if fxadapt.parts.why_not_mergeable(config) is None and not any(
            k.startswith("model:") for k in config.sites
        ):
            merged = copy.deepcopy(model)  # unmerge restores the weights to rounding, not bit for bit
            before = {k: v.clone() for k, v in merged.state_dict().items()}
            fxadapt.merge(merged, name)
            assert (_out(merged, inputs) - got).abs().max().item() <= 1e-5, name
            fxadapt.unmerge(merged, name)
            after = merged.state_dict()
            assert all((after[k] - v).abs().max() <= 1e-5 for k, v in before.items()), name
            # an fp64 model merges in fp64: the folded weights are not rounded through fp32
            merged = copy.deepcopy(model).double()
            fxadapt.merge(merged, name)
            assert_fp64_equal(_out(merged, in_fp64(inputs)), got64, name)

        fxadapt.save_adapter(model, tmp_path / name, name)
        outputs[name] = got

    fresh = copy.deepcopy(base)  # save -> load: every adapter into one fresh model (the captures are reused)
    for name in cases:
        fxadapt.load_adapter(fresh, tmp_path / name, activate=False)
    for name in cases:
        fxadapt.activate(fresh, name)
        assert torch.equal(_out(fresh.eval(), inputs), outputs[name]), name

    for name in cases:
        fxadapt.remove(model, name)
    assert [type(m) for m in model.modules()] == [type(m) for m in base.modules()]
    assert model.state_dict().keys() == base.state_dict().keys()
    assert torch.equal(_out(model.eval(), inputs), plain)

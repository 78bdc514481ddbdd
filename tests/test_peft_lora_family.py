"""PEFT 0.21 side by side (same venv, transformers 5): DoRA, VeRA, the default ``IA3Config()`` (feed-forward input
scaling), LoRA on linears outside the repeating layers, prompt tuning and prefix tuning, both ways: PEFT-trained adapters loaded with
``fxadapt.load_adapter`` and fxadapt adapters written with ``format="peft"`` and loaded by
``PeftModel.from_pretrained``, outputs equal within 1e-5; the configs through ``from_peft`` too."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt

peft = pytest.importorskip("peft")


def _trained(model, inputs, steps=3, lr=0.5):
    """Perturb the adapter weights, then a few SGD steps on random targets: every weight non-trivial."""
    gen = torch.Generator().manual_seed(3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    opt = torch.optim.SGD(trainable, lr=lr)
    model.train()
    for _ in range(steps):
        out = main_output(model(**inputs))
        loss = (out - torch.randn(out.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _out(model, inputs):
    """The main output, and BERT's pooled output (where ``pooler.dense`` acts)."""
    with torch.no_grad():
        out = model(**inputs)
    pooled = getattr(out, "pooler_output", None)
    return torch.cat([main_output(out).flatten(), *([pooled.flatten()] if pooled is not None else [])])


def _diff(a, b, inputs):
    return (_out(a, inputs) - _out(b, inputs)).abs().max().item()


def _by_module(model):
    """Adapter tensors keyed by (layer, projection path, parameter), whatever the site is called."""
    from fxadapt.model import get_state, layers_of

    record = get_state(model).adapters["default"]
    _, layers = layers_of(model)
    out = {}
    for index, kind in [(i, k) for i, kinds in record.placements.items() for k in kinds]:
        site = record.sites.get((index, kind))  # None: a model part (outside the layers), named by its path
        module = layers[index].fxadapt["default"][kind.replace(".", "_")]
        for pname, p in module.state_dict(keep_vars=True).items():
            shared = pname.startswith("shared.")  # VeRA's projections: one pair, owned by one of the sites
            where = (index, site.module) if site is not None else (None, kind)
            out[(None, None, pname) if shared else (*where, pname)] = p
    return out


CASES = {
    "dora": lambda arch: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=["query", "value"] if arch == "bert" else ["q_proj", "v_proj"],
    ),
    "vera": lambda arch: peft.VeraConfig(
        r=6,
        target_modules=["query", "intermediate.dense"] if arch == "bert" else ["q_proj", "v_proj", "up_proj"],
    ),
    "ia3_default": lambda arch: peft.IA3Config(),
    # outside the repeating layers: BERT's pooler.dense (and every layer's *.dense), LLaMA's lm_head
    "lora_outside": lambda arch: peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"] if arch == "bert" else ["q_proj", "lm_head"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_both_ways(arch, case, tmp_path):
    base = make_model(arch, attention_dropout=0.0) if arch == "llama" else make_model(arch)
    inputs = make_inputs(arch)
    peft_config = CASES[case](arch)
    theirs = _trained(peft.get_peft_model(copy.deepcopy(base), copy.deepcopy(peft_config)), inputs)
    theirs.save_pretrained(tmp_path / "theirs")

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "default"
    assert _diff(ours, base, inputs) > 1e-4  # the adapter does something
    assert _diff(ours, theirs, inputs) <= 1e-5
    if case == "lora_outside":
        outside = "pooler.dense" if arch == "bert" else "lm_head"
        assert f"model:{outside}" in fxadapt.list_adapters(ours)["default"].sites

    # the config alone gives the same sites and the same function on the same weights
    if case == "ia3_default":
        config = fxadapt.IA3Config.from_peft(peft.IA3Config(), model=base)
    else:
        config = fxadapt.LoRAConfig.from_peft(peft_config)
    fresh = copy.deepcopy(base)
    fxadapt.inject(fresh, {"default": config})
    loaded, built = _by_module(ours), _by_module(fresh)
    assert set(built) == set(loaded)
    with torch.no_grad():
        for key, p in built.items():
            p.copy_(loaded[key])
    assert _diff(fresh, ours, inputs) == 0.0

    with torch.no_grad():  # fxadapt -> PEFT
        for p in fxadapt.adapter_parameters(ours, "default").values():
            if p.requires_grad:
                p.mul_(1.1).add_(0.01)
    fxadapt.save_adapter(ours, tmp_path / "ours", "default", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert _diff(ours, back, inputs) <= 1e-5

    # merging: the same function, the base weights after unmerge
    merged = copy.deepcopy(ours)
    fxadapt.merge(merged, "default")
    assert _diff(merged, ours, inputs) <= 1e-5


def test_ia3_default_is_input_scaling_on_bert():
    """PEFT's default on BERT targets key, value and every ``output.dense`` (also ``attention.output.dense``),
    the dense ones feed-forward: their *input* is scaled."""
    config = fxadapt.IA3Config.from_peft(peft.IA3Config(), model=make_model("bert"))
    assert config.target_modules == ("key", "value", "output.dense")
    assert config.feedforward_modules == ("output.dense",)
    model = make_model("bert")
    fxadapt.inject(model, {"a": config})
    shapes = {
        k.split(".fxadapt.a.")[1]: tuple(p.shape) for k, p in fxadapt.adapter_parameters(model, "a").items()
    }
    layer0 = {k: v for k, v in shapes.items()}
    assert layer0["linear:output_dense.lora_B"] == (48, 1)  # the FFN's intermediate width: its input


PROMPT_CASES = {
    "prompt_tuning": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4),
    "prefix_tuning": lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3),
    "prefix_projection": lambda task: peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    ),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_peft_prompt_learning_both_ways(arch, case, tmp_path):
    """PEFT's task models put the prompt in front of ``inputs_embeds`` / hand the prefixes over as a KV cache
    (the real tokens' positions after them): equal to fxadapt's prompt tuning and ``shift_positions`` prefixes."""
    base = make_model(arch, attention_dropout=0.0) if arch == "llama" else make_model(arch)
    inputs = make_inputs(arch)
    task = "CAUSAL_LM" if arch == "llama" else "FEATURE_EXTRACTION"
    theirs = _trained(peft.get_peft_model(copy.deepcopy(base), PROMPT_CASES[case](task)), inputs)
    theirs.save_pretrained(tmp_path / "theirs")

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "default"
    assert _diff(ours, base, inputs) > 1e-4 if case != "prompt_tuning" else True
    assert _diff(ours, theirs, inputs) <= 1e-5

    with torch.no_grad():
        for p in fxadapt.adapter_parameters(ours, "default").values():
            p.add_(torch.randn(p.shape) * 0.05)
    fxadapt.save_adapter(ours, tmp_path / "ours", "default", format="peft")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert _diff(ours, back, inputs) <= 1e-5

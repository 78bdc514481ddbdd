"""Prefix tuning and prompt tuning checkpoints side by side with AdapterHub ``adapters`` 1.3.0 (.venv-peer): trained
there a few steps, saved, loaded with fxadapt (equal outputs), perturbed, written with ``format="adapterhub"`` and
loaded by ``adapters`` (equal outputs), on BERT.

On LLaMA, adapters 1.3.0's prefix tuning is not a reference: with a padding mask (a boolean mask under transformers
4.57) it "inverts" its all-ones prefix mask to False and masks the prefixes out (the output is the base model's),
and without one SDPA's ``is_causal`` aligns the causal mask top-left over prefixes + keys. There the checkpoint
format is checked: fxadapt → adapters → fxadapt gives the same tensors and outputs. adapters has no prompt tuning
for LLaMA (``support_prompt_tuning = False``)."""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from peer_helpers import max_abs, train_adapterhub  # noqa: E402
from tiny_models import main_output, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer

CONFIGS = {
    "prefix_tuning": lambda: adapters.PrefixTuningConfig(prefix_length=4, bottleneck_size=16),
    "prefix_tuning_flat": lambda: adapters.PrefixTuningConfig(prefix_length=3, flat=True),
    "prompt_tuning": lambda: adapters.PromptTuningConfig(prompt_length=4),
}


def _out(model, inputs, prompt):
    with torch.no_grad():
        out = main_output(model(**inputs))
    return (
        out[:, prompt:] if prompt else out
    )  # AdapterHub's outputs include the prompt positions, as fxadapt's


def _valid(out, inputs, arch):
    """Outputs at real tokens: padded positions of an encoder see different (masked) garbage in each library."""
    if arch == "bert":
        return out[inputs["attention_mask"].bool()]
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["bert"])
def test_prompts_both_ways(arch, name, tmp_path):
    base = make_model(arch, attention_dropout=0.0) if arch == "llama" else make_model(arch)
    inputs = make_inputs(arch)
    prompt = 4 if name == "prompt_tuning" else 0
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("a", config=CONFIGS[name]())
    train_adapterhub(theirs, inputs, "a", out=main_output)
    theirs.save_adapter(str(tmp_path / "theirs"), "a")

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "a"
    ours.eval()
    assert max_abs(_out(ours, inputs, prompt), _out(base, inputs, 0)) > 1e-4
    assert max_abs(*(_valid(_out(m, inputs, prompt), inputs, arch) for m in (ours, theirs))) <= 1e-5

    with torch.no_grad():
        for p in fxadapt.adapter_parameters(ours, "a").values():
            p.add_(torch.randn(p.shape) * 0.05)
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub")
    back = copy.deepcopy(base)
    adapters.init(back)
    assert back.load_adapter(str(tmp_path / "ours")) == "a"
    back.set_active_adapters("a")
    back.eval()
    assert max_abs(*(_valid(_out(m, inputs, prompt), inputs, arch) for m in (ours, back))) <= 1e-5


@pytest.mark.parametrize("flat", [False, True])
def test_prefix_format_through_adapterhub_on_llama(flat, tmp_path):
    base = make_model("llama", attention_dropout=0.0)
    inputs = make_inputs("llama")
    ours = copy.deepcopy(base)
    fxadapt.inject(ours, {"a": fxadapt.PrefixTuningConfig(prefix_length=4, bottleneck_size=16, flat=flat)})
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(ours, "a").values():
            p.add_(torch.randn(p.shape) * 0.3)
    ours.eval()
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub")
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    assert theirs.load_adapter(str(tmp_path / "ours")) == "a"
    theirs.save_adapter(str(tmp_path / "theirs"), "a")
    back = copy.deepcopy(base)
    fxadapt.load_adapter(back, tmp_path / "theirs")
    before, after = fxadapt.adapter_parameters(ours, "a"), fxadapt.adapter_parameters(back, "a")
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert max_abs(_out(back.eval(), inputs, 0), _out(ours, inputs, 0)) == 0.0

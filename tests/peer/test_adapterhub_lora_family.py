"""DoRA, VeRA, DoRA+VeRA ("dvora") and MTL-LoRA side by side with AdapterHub ``adapters`` 1.3.0 (.venv-peer).

Trained a few steps in ``adapters`` (high learning rate), saved, loaded with ``fxadapt.load_adapter``: equal outputs;
then perturbed in fxadapt, written with ``format="adapterhub"`` and loaded by ``adapters``: equal outputs. BERT with a
head (AdapterHub 1.3.0 saves VeRA's shared projections only under a base-model prefix) and a LLaMA without GQA
(AdapterHub's VeRA shares one A/B, so q and v must have one shape).
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from peer_helpers import max_abs, train_adapterhub  # noqa: E402
from tiny_models import main_output, make_config, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer


def _base(arch):
    if arch == "bert":
        torch.manual_seed(0)
        return tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    return make_model("llama", num_key_value_heads=4)


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("preset", ["dora", "vera", "dvora", "mtl_lora", "mtl_lora_3"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_lora_family_both_ways(arch, preset, tmp_path):
    base = _base(arch)
    inputs = make_inputs(arch)
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    config = adapters.MTLLoRAConfig(n_up_projection=3, r=4) if preset == "mtl_lora_3" else preset
    theirs.add_adapter("a", config=config)
    train_adapterhub(theirs, inputs, "a", out=main_output)
    theirs.save_adapter(str(tmp_path / "theirs"), "a")

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "a"
    config = fxadapt.list_adapters(ours)["a"]
    if preset.startswith("mtl_lora"):
        assert config.method == "mtl_lora" and config.n_up_projection == (3 if preset == "mtl_lora_3" else 1)
    else:
        assert config.use_dora == (preset != "vera") and config.is_vera == (preset != "dora")
    assert max_abs(_out(ours, inputs), _out(base, inputs)) > 1e-4  # the adapter does something
    assert max_abs(_out(ours, inputs), _out(theirs, inputs)) <= 1e-5

    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(ours, "a").items():
            if ".shared." not in key:
                p.add_(torch.randn(p.shape) * 0.05)
    head = arch == "bert"  # AdapterHub trained the classifier too
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub", with_head=head)
    back = copy.deepcopy(base)
    adapters.init(back)
    assert back.load_adapter(str(tmp_path / "ours")) == "a"
    back.set_active_adapters("a")
    assert max_abs(_out(ours, inputs), _out(back.eval(), inputs)) <= 1e-5

"""Parallel generation side by side with AdapterHub ``adapters`` 1.3.0 (transformers 4.57.6, run in .venv-peer):
the same adapters (saved by AdapterHub, loaded by fxadapt) under ``Parallel`` give the same n·B sequences."""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from adapters import composition as ah_compose  # noqa: E402
from tiny_models import make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_parallel_generate_equals_adapterhub(arch, tmp_path):
    base = make_model(arch)
    ah_model = copy.deepcopy(base)
    adapters.init(ah_model)
    gen = torch.Generator().manual_seed(5)
    for name in ("x", "y"):
        ah_model.add_adapter(name, config="seq_bn")
    with torch.no_grad():
        for n, p in ah_model.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model = copy.deepcopy(base)
    for name in ("x", "y"):
        ah_model.save_adapter(str(tmp_path / name), name)
        fxadapt.load_adapter(model, tmp_path / name, name=name, activate=False)
    # input ids only: AdapterHub replicates input_ids for Parallel generation, not the attention mask
    inputs = {"input_ids": make_inputs(arch, batch=2)["input_ids"]}
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ah_model.eval().set_active_adapters(ah_compose.Parallel("x", "y"))
    fxadapt.activate(model.eval(), fxadapt.Parallel("x", "y"))
    with torch.no_grad():
        theirs = ah_model.generate(**inputs, **kwargs)
        ours = model.generate(**inputs, **kwargs)
    assert ours.shape == theirs.shape == (4, inputs["input_ids"].shape[1] + 4)
    assert torch.equal(ours, theirs)

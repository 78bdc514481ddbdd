"""Prefix tuning side by side with AdapterHub ``adapters`` 1.3.0 (transformers 4.57.6, .venv-peer)."""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from tiny_models import main_output, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.model import layers_of  # noqa: E402

pytestmark = pytest.mark.peer


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_prefix_tuning_equals_adapterhub(arch, flat):
    base = make_model(arch)
    ah_model = copy.deepcopy(base)
    adapters.init(ah_model)
    config = adapters.PrefixTuningConfig(prefix_length=5, bottleneck_size=16, flat=flat)
    ah_model.add_adapter("p", config=config)
    ah_model.set_active_adapters("p")
    gen = torch.Generator().manual_seed(2)
    ah_params = {n: p for n, p in ah_model.named_parameters() if ".prefix_tunings.p." in n}
    assert ah_params
    with torch.no_grad():
        for p in ah_params.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ah_model.eval()

    model = copy.deepcopy(base)
    fxadapt.inject(model, {"p": fxadapt.PrefixTuningConfig(prefix_length=5, bottleneck_size=16, flat=flat)})
    pool = layers_of(model)[1][0].fxadapt["p"]["attn_kv"].get_pool()
    ours = dict(pool.named_parameters())
    theirs = {n.split(".prefix_tunings.p.", 1)[1].split(".", 1)[1]: p for n, p in ah_params.items()}
    assert set(ours) == set(theirs), (sorted(ours), sorted(theirs))
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(theirs[k].view_as(p))

    inputs = make_inputs(arch)
    with torch.no_grad():
        expected = main_output(ah_model(**inputs))
        got = main_output(model(**inputs))
        plain = main_output(base(**inputs))
    assert not torch.allclose(expected, plain, atol=1e-3)
    valid = inputs["attention_mask"].bool()
    assert (got[valid] - expected[valid]).abs().max().item() <= 1e-5

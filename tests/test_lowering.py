"""Lowering: adapter nodes become fused kernel ops; forced on CPU under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import fxadapt.kernels as K
import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.install import layer_state
from fxadapt.model import layers_of

triton = pytest.importorskip("triton")


def _model(arch, preset):
    model = make_model(arch)
    fxadapt.inject(model, {"a": preset}, activate=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("arch, preset", [("bert", "seq_bn"), ("llama", "double_seq_bn"), ("bert", "par_bn")])
def test_forced_kernel_path_matches_reference_path(arch, preset):
    model = _model(arch, preset)
    inputs = make_inputs(arch)
    fxadapt.activate(model, "a")
    with torch.no_grad():
        expected = main_output(model(**inputs))
    layer = layers_of(model)[1][0]
    assert not any("lowered to" in n for n in layer_state(layer).notes)  # CPU, auto backend: not lowered

    fxadapt.activate(model, None)
    with K.force_triton():
        fxadapt.activate(model, "a")  # compiled while the Triton backend is forced: adapter nodes are lowered
        notes = layer_state(layer).notes
        assert any("lowered to fxadapt.kernels.bottleneck" in n for n in notes), notes
        with torch.no_grad():
            got = main_output(model(**inputs))
        source = "\n".join(layer_state(layer).sources())
    assert "fused_bottleneck" in source
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_explain_says_why_not_lowered():
    model = _model("bert", "seq_bn")
    fxadapt.activate(model, "a")
    with torch.no_grad():
        model(**make_inputs("bert"))
    text = str(fxadapt.explain(model))
    assert "kernels: not lowered: inputs on cpu" in text

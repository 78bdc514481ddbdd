"""Lowering: adapter nodes become fused kernel ops; forced on CPU under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
import fxadapt.kernels as K
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


# ---------------------------------------------------------------------------------------------------------------
# LoRA at module sites → fxadapt.kernels.lora_linear.
def _lowered_run(model, arch, train=False):
    """(output, grads of the adapter parameters, notes, generated source) with the Triton backend forced."""
    inputs = make_inputs(arch)
    params = fxadapt.adapter_parameters(model, "a")
    model.train(train)
    with K.force_triton():
        fxadapt.activate(model, "a")
        layer = layers_of(model)[1][0]
        out = main_output(model(**inputs))
        grads = torch.autograd.grad(out.square().mean(), list(params.values()))
        notes, source = list(layer_state(layer).notes), "\n".join(layer_state(layer).sources())
    fxadapt.activate(model, None)
    return out.detach(), grads, notes, source


def _reference_run(model, arch, train=False):
    inputs = make_inputs(arch)
    params = fxadapt.adapter_parameters(model, "a")
    model.train(train)
    fxadapt.activate(model, "a")
    out = main_output(model(**inputs))
    grads = torch.autograd.grad(out.square().mean(), list(params.values()))
    fxadapt.activate(model, None)
    return out.detach(), grads


@pytest.mark.parametrize(
    "arch, spec",
    [
        ("bert", "lora"),  # nn.Linear q and v
        ("llama", fxadapt.LoRAConfig(sites=("attn.q", "attn.v", "ffn.down"), r=4, alpha=8)),
        ("gpt2", fxadapt.LoRAConfig(sites=("attn.o", "ffn.up"), r=4)),  # HF Conv1D: weight read transposed
    ],
    ids=["bert-lora", "llama-lora", "gpt2-conv1d"],
)
def test_lora_lowered_matches_reference_path(arch, spec):
    """Forward and every adapter gradient through the fused LoRA op equal the unlowered graph's (fp32)."""
    model = _model(arch, spec)
    expected, expected_grads = _reference_run(model, arch)
    got, grads, notes, source = _lowered_run(model, arch)
    assert any("lowered to fxadapt.kernels.lora_linear" in n for n in notes), notes
    assert not any("not lowered" in n for n in notes), notes
    assert "fused_lora" in source
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, ge in zip(grads, expected_grads):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-6)


def test_lora_not_lowered_says_why():
    """A slice of a fused projection (GPT-2 attn.q of c_attn), (IA)^3, and LoRA dropout in training stay unlowered,
    each with its reason in the notes; the results are the reference path's."""
    model = _model("gpt2", fxadapt.LoRAConfig(sites=("attn.q",), r=4))
    expected, _ = _reference_run(model, "gpt2")
    got, _, notes, _ = _lowered_run(model, "gpt2")
    assert any("slice of a fused projection" in n for n in notes), notes
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    model = _model("bert", "ia3")
    expected, _ = _reference_run(model, "bert")
    got, _, notes, _ = _lowered_run(model, "bert")
    assert any("(IA)^3" in n and "not lowered" in n for n in notes), notes
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    model = _model("bert", fxadapt.LoRAConfig(r=4, dropout=0.1))
    _, _, notes, _ = _lowered_run(model, "bert", train=True)
    assert any("LoRA dropout 0.1 (training)" in n for n in notes), notes


def test_explain_reports_lora_lowering():
    model = _model("bert", "lora")
    with K.force_triton():
        fxadapt.activate(model, "a")
        with torch.no_grad():
            model(**make_inputs("bert"))
        text = str(fxadapt.explain(model))
    assert "lowered to fxadapt.kernels.lora_linear" in text, text


def test_per_row_lora_matches_each_adapter():
    """The PerRow LoRA rule (fxadapt.lowering.per_row_lora, for routing.py): one lora_multi call equals the
    projection plus each row's own LoRA, in the interpreter and on the reference path alike."""
    from fxadapt.lowering import per_row_lora
    from fxadapt.methods.lora import LoRA

    gen = torch.Generator().manual_seed(0)
    proj = torch.nn.Linear(16, 12)
    loras = [LoRA(16, 12, fxadapt.LoRAConfig(r=4, init_weights="bert")) for _ in range(3)]
    x = torch.randn(5, 3, 16, generator=gen)
    ids = torch.tensor([2, -1, 0, 1, 2])  # per sequence
    expected = proj(x).clone()
    for b, i in enumerate(ids.tolist()):
        if i >= 0:
            expected[b] = expected[b] + loras[i](x[b])
    torch.testing.assert_close(per_row_lora(proj, x, ids, loras), expected, rtol=1e-5, atol=1e-5)
    with K.force_triton():
        torch.testing.assert_close(per_row_lora(proj, x, ids, loras), expected, rtol=1e-5, atol=1e-5)

"""torch.compile of injected models: same outputs as eager, no graph breaks."""

from __future__ import annotations

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt


def _adapted(arch):
    model = make_model(arch)
    fxadapt.inject(model, {"a": "double_seq_bn"})
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_no_graph_breaks(arch):
    model = _adapted(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        model(**inputs)  # first call: captures for this call shape exist
        torch._dynamo.reset()
        report = torch._dynamo.explain(model)(**inputs)
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]
    assert report.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_inductor_matches_eager(arch):
    model = _adapted(arch)
    inputs = make_inputs(arch)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        expected = main_output(model(**inputs))
        got = main_output(compiled(**inputs))
        again = main_output(compiled(**make_inputs(arch, seed=9)))
        expected_again = main_output(model(**make_inputs(arch, seed=9)))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected_again, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager():
    model = _adapted("bert")
    inputs = make_inputs("bert")
    fxadapt.train_adapter(model, "a")
    model.eval()  # no dropout: compare exact gradients
    main_output(model(**inputs)).pow(2).sum().backward()
    eager = {n: p.grad.clone() for n, p in fxadapt.adapter_parameters(model, "a").items()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    main_output(compiled(**inputs)).pow(2).sum().backward()
    for n, p in fxadapt.adapter_parameters(model, "a").items():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6)


def test_stack_and_fuse_fullgraph_and_one_recompile_per_switch():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn", "b": "seq_bn", "c": "double_seq_bn"}, activate=False)
    fuse = fxadapt.add_fusion(model, ["a", "b"])
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in "abc":
            for p in fxadapt.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    setup_1 = fxadapt.Stack("c", fuse)
    setup_2 = fxadapt.Stack("a", "b")
    inputs = make_inputs("bert")
    eager = {}
    with torch.no_grad():
        for setup in (setup_1, setup_2):
            fxadapt.activate(model, setup)
            eager[setup] = main_output(model(**inputs))

    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    with torch.no_grad():
        fxadapt.activate(model, setup_1)
        torch.testing.assert_close(main_output(compiled(**inputs)), eager[setup_1], rtol=1e-6, atol=1e-6)
        compiled(**inputs)
        assert len(compiles) == 1  # no graph break (fullgraph) and no recompile on a repeated call
        fxadapt.activate(model, setup_2)
        torch.testing.assert_close(main_output(compiled(**inputs)), eager[setup_2], rtol=1e-6, atol=1e-6)
        assert len(compiles) == 2  # switching the setup: one recompile
        fxadapt.activate(model, setup_1)
        compiled(**inputs)
        assert len(compiles) <= 3

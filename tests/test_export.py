"""fxadapt.export: one ExportedProgram per adapted model, equal to the eager model at several batch sizes and
sequence lengths (dynamic dims); merged LoRA exports the base model's graph; an AOTInductor package on CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_fp64_equal, in_fp64, main_output, make_inputs, make_model

import fxadapt

SHAPES = [(2, 7), (3, 5), (1, 11), (4, 9)]  # (batch, sequence): two of each beyond the example's, batch 1 too


def _random(model, name, std=0.05):
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.normal_(std=std)


def _inputs(arch, batch, seq, seed=5):
    inputs = make_inputs(arch, batch=batch, seq=seq, seed=seed)
    if arch == "llama":
        inputs["use_cache"] = False
    return inputs


def _check(model, arch, program, atol=1e-6):
    runner = program.module()
    for batch, seq in SHAPES:
        inputs = _inputs(arch, batch, seq)
        with torch.no_grad():
            expected, got = main_output(model(**inputs)), main_output(runner(**inputs))
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_bert_seq_bn():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    _random(model, "a")
    program = fxadapt.export(model, _inputs("bert", 2, 7))
    assert isinstance(program, torch.export.ExportedProgram)
    _check(model, "bert", program)
    # the adapter's ops are in the graph (its weights are parameters of the program)
    assert any(".fxadapt.a." in name for name in program.state_dict)


def test_llama_lora():
    model = make_model("llama")
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(r=4, alpha=8, init_weights="bert")})
    program = fxadapt.export(model, _inputs("llama", 2, 7))
    _check(model, "llama", program)


def test_stack_of_two_adapters():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn", "b": "double_seq_bn"}, activate=False)
    _random(model, "a")
    _random(model, "b")
    fxadapt.activate(model, fxadapt.Stack("a", "b"))
    program = fxadapt.export(model, _inputs("bert", 2, 7))
    _check(model, "bert", program)
    fxadapt.activate(model, "a")  # the program keeps the setup it was exported with
    inputs = _inputs("bert", 3, 5)
    with torch.no_grad():
        assert not torch.allclose(main_output(program.module()(**inputs)), main_output(model(**inputs)))


def _ops(program):
    return [str(n.target) for n in program.graph.nodes if n.op == "call_function"]


def test_merged_lora_exports_the_base_graph():
    base = make_model("llama")
    base_program = fxadapt.export(base, _inputs("llama", 2, 7))
    model = make_model("llama")
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(r=4, alpha=8, init_weights="bert")})
    with torch.no_grad():
        unmerged = main_output(model(**_inputs("llama", 3, 5)))
    fxadapt.merge(model, "l")
    program = fxadapt.export(model, _inputs("llama", 2, 7))
    assert _ops(program) == _ops(base_program)  # no adapter ops: the base-shaped graph
    # the merged adapter's weights stay parameters of the model (unmerge needs them) but no op reads them
    extra = set(program.state_dict) - set(base_program.state_dict)
    assert extra == set(fxadapt.adapter_parameters(model, "l"))
    _check(model, "llama", program)
    with torch.no_grad():
        merged_out = main_output(program.module()(**_inputs("llama", 3, 5)))
    torch.testing.assert_close(merged_out, unmerged, rtol=1e-5, atol=1e-5)


def test_static_export_and_typed_errors():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    program = fxadapt.export(model, _inputs("bert", 2, 7), dynamic=False)
    with torch.no_grad(), pytest.raises(Exception):  # noqa: B017 - torch's own shape-guard error
        program.module()(**_inputs("bert", 3, 5))
    model.train()
    with pytest.raises(fxadapt.ConfigError, match="training mode"):
        fxadapt.export(model)
    model.eval()
    fxadapt.activate(model, fxadapt.PerRow("a"))
    with pytest.raises(fxadapt.CompositionError, match="per-row"):
        fxadapt.export(model)
    with pytest.raises(fxadapt.ConfigError, match=r"\.pt2"):
        fxadapt.aot_package(program, "model.zip")


@pytest.mark.slow
def test_aot_inductor_package_on_cpu(tmp_path):
    # in fp64: Inductor's generated C++ reorders float sums, and in fp32 how much that shows depends on the CPU
    model = make_model("bert", num_hidden_layers=1).double()
    fxadapt.inject(model, {"a": "seq_bn"})
    _random(model, "a")
    program = fxadapt.export(model, in_fp64(_inputs("bert", 2, 7)))
    path = fxadapt.aot_package(
        program, tmp_path / "bert.pt2", inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"}
    )
    runner = fxadapt.load_package(path)
    for batch, seq in SHAPES[:2]:
        inputs = in_fp64(_inputs("bert", batch, seq))
        with torch.no_grad():
            expected, got = main_output(model(**inputs)), main_output(runner(**inputs))
        assert_fp64_equal(got, expected, (batch, seq))

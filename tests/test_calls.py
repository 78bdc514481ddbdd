"""Per-call setups (fxadapt.using, compat adapter_names=, per-row adapter_ids=): carried by the call's context,
never written into the model; equal to activating the same setup."""

from __future__ import annotations

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt import Fuse, Parallel, PerRow, Stack
from fxadapt.install import layer_state
from fxadapt.model import layers_of


def _model(arch="bert", wrap=None):
    model = make_model(arch) if wrap is None else wrap(make_model(arch))
    fxadapt.inject(model, {"a": "seq_bn", "b": "seq_bn", "c": "double_seq_bn"}, activate=False)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n in "abc":
            for p in fxadapt.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _run(model, inputs, **kw):
    with torch.no_grad():
        return main_output(model(**inputs, **kw))


def _plans(model):
    return [layer_state(layer).plan for layer in layers_of(model)[1]]


SETUPS = ["a", ["a", "c"], Stack("b", "a"), Parallel("a", "b"), None, "fuse"]


@pytest.mark.parametrize("setup", SETUPS, ids=repr)
def test_using_equals_activate_and_changes_nothing(setup):
    model = _model()
    if setup == "fuse":
        setup = fxadapt.add_fusion(model, Fuse("a", "b"))
    inputs = make_inputs("bert")
    fxadapt.activate(model, "c")
    plans, active = _plans(model), fxadapt.active_setup(model)
    with fxadapt.using(model, setup) as entered:
        got = _run(model, inputs)
        assert fxadapt.active_setup(model) == active  # the model's setup is untouched
    assert entered == (None if setup is None else fxadapt.compose.parse_setup(setup))
    assert _plans(model) == plans
    default = _run(model, inputs)
    fxadapt.activate(model, setup)
    assert torch.equal(got, _run(model, inputs))
    fxadapt.activate(model, "c")
    assert torch.equal(default, _run(model, inputs))


def test_nested_using_inner_wins_and_outer_returns():
    model = _model()
    inputs = make_inputs("bert")
    expected = {}
    for name in ("a", "b"):
        fxadapt.activate(model, name)
        expected[name] = _run(model, inputs)
    fxadapt.activate(model, None)
    base = _run(model, inputs)
    with fxadapt.using(model, "a"):
        with fxadapt.using(model, "b"):
            assert torch.equal(_run(model, inputs), expected["b"])
        assert torch.equal(_run(model, inputs), expected["a"])
    assert torch.equal(_run(model, inputs), base)


def test_using_errors_on_entry():
    model = _model()
    with pytest.raises(fxadapt.AdapterNotFoundError, match="did you mean 'a'"), fxadapt.using(model, "aa"):
        pass
    with (
        pytest.raises(fxadapt.CompositionError, match="no fusion layers"),
        fxadapt.using(model, Fuse("a", "b")),
    ):
        pass
    with pytest.raises(fxadapt.AdapterNotFoundError), fxadapt.using(make_model("bert"), "a"):
        pass
    assert fxadapt.active_setup(model) is None


def test_compat_adapter_names_is_per_call():
    from fxadapt.compat import AdapterModel, init

    for wrap in (init, AdapterModel):
        model = _model(wrap=wrap)
        model.set_active_adapters("c")
        inputs = make_inputs("bert")
        with torch.no_grad():
            got = main_output(model(**inputs, adapter_names=["a", "b"]))
            assert fxadapt.active_setup(model) == Stack("c")
            fxadapt.activate(model, Stack("a", "b"))
            assert torch.equal(got, main_output(model(**inputs)))


def _per_row_model():
    model = _model()
    fxadapt.activate(model, PerRow("a", "b"))
    return model


def test_per_row_ids_are_per_call():
    model = _per_row_model()
    inputs = make_inputs("bert", batch=3)
    with torch.no_grad():
        model(**inputs, adapter_ids=torch.tensor([0, 1, 1]))
        with pytest.raises(fxadapt.CompositionError, match="no adapter_ids were given"):
            model(**inputs)  # never the previous call's ids
        with fxadapt.adapter_ids(model, [1, -1, 0]):
            scoped = main_output(model(**inputs))
            given = main_output(model(**inputs, adapter_ids=[0, 0, 0]))  # the call's own ids win
        assert torch.equal(scoped, main_output(model(**inputs, adapter_ids=[1, -1, 0])))
        assert torch.equal(given, main_output(model(**inputs, adapter_ids=[0, 0, 0])))


@pytest.mark.parametrize(
    "ids, match",
    [
        (torch.tensor([0.0, 1.0, 1.0]), r"dtype torch.float32; expected an integer tensor .*not rounded"),
        (torch.tensor([0.7, 1.2, 2.9], dtype=torch.float64), "dtype torch.float64"),
        (torch.tensor([True, False, True]), "dtype torch.bool"),
        ([0, 3, 1], r"holds 3, outside \[-1, 2\).*nearest valid id is 1"),
        ([0, -2, 1], r"holds -2, outside .*nearest valid id is -1"),
        ([0, 1], "has 2 entries, but this call's batch has 3 rows"),
        ([[0, 1, 2]], r"shape \(1, 3\); expected one id per batch row"),
        (["a", "b", "c"], "not a sequence of integers"),
    ],
)
def test_bad_adapter_ids_are_typed_errors(ids, match):
    model = _per_row_model()
    inputs = make_inputs("bert", batch=3)
    with torch.no_grad():
        expected = main_output(model(**inputs, adapter_ids=[1, 1, 1]))
        with pytest.raises(fxadapt.AdapterIdsError, match=match) as info:
            model(**inputs, adapter_ids=ids)
        assert isinstance(info.value, (TypeError, ValueError))
        with pytest.raises(fxadapt.AdapterIdsError, match=match), fxadapt.adapter_ids(model, ids):
            model(**inputs)
        assert torch.equal(main_output(model(**inputs, adapter_ids=[1, 1, 1])), expected)


def test_adapter_ids_need_a_per_row_setup():
    model = _model()
    fxadapt.activate(model, "a")
    inputs = make_inputs("bert", batch=2)
    with pytest.raises(fxadapt.AdapterIdsError, match="not a PerRow"), fxadapt.adapter_ids(model, [0, 1]):
        pass
    # a PerRow setup for one call, with per-row ids
    with torch.no_grad(), fxadapt.using(model, PerRow("a", "b")):
        got = main_output(model(**inputs, adapter_ids=[1, 0]))
    with torch.no_grad():
        fxadapt.activate(model, "b")
        # the same batch (a matmul's rounding may depend on the batch size)
        assert torch.equal(got[:1], main_output(model(**inputs))[:1])
        fxadapt.activate(model, "a")
        assert torch.equal(got[1:], main_output(model(**inputs))[1:])


def test_prompt_tuning_follows_the_call_setup():
    model = make_model("bert")
    fxadapt.inject(model, {"p": fxadapt.PromptTuningConfig(prompt_length=3)}, activate=False)
    inputs = make_inputs("bert")
    with torch.no_grad():
        base = model(**inputs).last_hidden_state
        with fxadapt.using(model, "p"):
            prompted = model(**inputs).last_hidden_state
        fxadapt.activate(model, "p")
        assert torch.equal(prompted, model(**inputs).last_hidden_state)
        fxadapt.activate(model, None)
        assert torch.equal(base, model(**inputs).last_hidden_state)
    assert prompted.shape[1] == base.shape[1] + 3

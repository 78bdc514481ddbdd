"""One capture per block class, call variants captured at inject, and torch.compile in any order (issue 14).

References are the untouched model (a deepcopy before inject) and eager calls, never fxadapt itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import main_output, make_inputs, make_model

import fxadapt
from fxadapt.install import layer_state
from fxadapt.layers import record_layer_calls
from fxadapt.model import layers_of


def _captures(model) -> dict[tuple, set[int]]:
    """Guard key -> distinct captures over all layers."""
    out: dict[tuple, set[int]] = {}
    for layer in layers_of(model)[1]:
        for key, entries in layer_state(layer).traced.items():
            out.setdefault(key, set()).update(id(t.capture) for t in entries)
    return out


def _trace_count(model) -> int:
    return sum(len(v) for v in _captures(model).values())


def _zero_up(model, name="a"):
    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(model, name).items():
            if ".up." in key:
                p.zero_()


def _kinds(model, entry):
    """The kinds of call a user makes first: padded and unpadded masks, eval and train, the default call."""
    batch = make_inputs(model, entry)
    unpadded = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    return [batch, unpadded]


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_siblings_share_one_capture_and_stay_exact(model_type):
    model = make_model(model_type, num_hidden_layers=4)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"a": "double_seq_bn"})
    assert all(len(c) == 1 for c in _captures(model).values())  # 4 layers, one capture per kind of call
    # and the kinds share: a padded batch's capture serves the unpadded one (no mask reaches the attention
    # function, which takes None); BERT: one per mode (its attention dropout is chosen by the mode); LLaMA
    # (attention dropout 0): one without and one with a KV cache
    assert len({i for ids in _captures(model).values() for i in ids}) == 2
    _zero_up(model)
    for inputs in _kinds(model, model_type):
        for training in (False, True):
            model.train(training), base.train(training)
            torch.manual_seed(5)
            got = main_output(model(**inputs))
            torch.manual_seed(5)
            assert torch.equal(got, main_output(base(**inputs)))  # every layer's capture is exact on it


def test_layers_that_differ_in_a_baked_constant_get_their_own_capture():
    """Gemma-2 alternates sliding-window and global layers: the window decides the attention code path."""
    model = make_model("gemma2", num_hidden_layers=4)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"a": "double_seq_bn"})
    assert all(len(c) == 2 for c in _captures(model).values())
    _zero_up(model)
    inputs = make_inputs(model, "gemma2", seq=9)  # longer than the window (4): the two kinds of layer differ
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))


def test_layer_index_is_looked_up_not_baked():
    """The KV cache is indexed by ``self.layer_idx``: decoder layers still share one capture with a cache, and
    generation (every layer writing its own cache slot) is unchanged by a zero adapter."""
    model = make_model("llama", num_hidden_layers=4)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"a": "double_seq_bn"})
    _zero_up(model)
    inputs = {k: v for k, v in make_inputs(model, "llama").items()}
    with torch.no_grad():
        want = base.generate(**inputs, max_new_tokens=4, do_sample=False)
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert all(len(c) == 1 for c in _captures(model).values())


@pytest.mark.parametrize("model_type", ["bert", "llama", "gemma2"])
def test_first_calls_of_the_usual_kinds_trace_nothing(model_type):
    """The variants' priming forwards stop after one layer per group of siblings (gemma2: a sliding and a global
    one); the layers they did not reach share their group's captures."""
    model = make_model(model_type, num_hidden_layers=4)
    fxadapt.inject(model, {"a": "seq_bn"})
    before = _trace_count(model)
    for inputs in _kinds(model, model_type):
        for training in (False, True):
            model.train(training)
            with torch.no_grad():
                model(**inputs)
                if model_type != "bert":
                    model(**{**inputs, "use_cache": False})
    assert _trace_count(model) == before


def _graph_breaks(model, inputs) -> tuple[int, int]:
    torch._dynamo.reset()
    with torch.no_grad():
        report = torch._dynamo.explain(model)(**inputs)
    return report.graph_count, report.graph_break_count


@pytest.mark.parametrize("when", ["after inject", "after explain", "after activate"])
def test_compile_in_any_order_has_no_graph_break(when):
    """No eager call first: the compiled region must never meet a lazy build."""
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn", "b": "double_seq_bn"})
    if when == "after explain":
        fxadapt.explain(model)
    if when == "after activate":
        fxadapt.activate(model, fxadapt.Stack("a", "b"))
    for inputs in _kinds(model, "bert"):
        assert _graph_breaks(model, inputs) == (1, 0)


def test_recording_stops_once_the_awaited_layers_were_called():
    """``until``: the forward ends after the last awaited layer; later layers and the head never run."""
    model = make_model("bert", num_hidden_layers=4)
    _, layers = layers_of(model)
    ran: list[int] = []
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    inputs = make_inputs(model, "bert")
    outputs: dict = {}
    calls = record_layer_calls(model, layers, lambda: model(**inputs), outputs, until={id(layers[1])})
    assert ran == [0, 1] and set(calls) == set(outputs) == {id(layers[0]), id(layers[1])}
    with torch.no_grad():  # the recorded output is the layer's own eager output on that call
        args, kwargs = calls[id(layers[1])]
        assert torch.equal(main_output(layers[1](*args, **kwargs)), main_output(outputs[id(layers[1])]))
    ran.clear()
    assert set(record_layer_calls(model, layers, lambda: model(**inputs))) == {id(m) for m in layers}
    assert ran == [0, 1, 2, 3]


def test_hooks_added_after_inject_run_as_in_eager():
    """A hook on a leaf module (no children: always a call of the generated code) fires as it is, without a new
    capture; one on a traced-through module is a new kind of call, traced with the hook replayed."""
    model = make_model("bert", num_hidden_layers=2)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"a": "seq_bn"})
    _zero_up(model)
    inputs = make_inputs(model, "bert")
    before = _trace_count(model)
    for path, traced in (("attention.self.query", 0), ("attention.self", 1)):
        handles = [
            m.encoder.layer[1]
            .get_submodule(path)
            .register_forward_hook(
                lambda mod, a, out: (out[0] * 2.0, *out[1:]) if isinstance(out, tuple) else out * 2.0
            )
            for m in (model, base)
        ]
        with torch.no_grad():
            assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))
        assert _trace_count(model) == before + traced
        for h in handles:
            h.remove()


@pytest.mark.parametrize(("model_type", "dropout", "shared"), [("llama", 0.0, True), ("llama", 0.1, False)])
def test_one_capture_serves_both_modes_only_where_the_mode_changes_nothing(model_type, dropout, shared):
    """LLaMA picks its attention dropout with ``self.training``: at probability 0 the train-mode call is the
    eval-mode one (one capture for both), at 0.1 it is not (a capture per mode). Train mode stays exact."""
    model = make_model(model_type, num_hidden_layers=2, attention_dropout=dropout)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"a": "seq_bn"})
    by_mode: dict[bool, set[int]] = {}
    for key, ids in _captures(model).items():
        by_mode.setdefault(key[2], set()).update(ids)
    assert (by_mode[True] == by_mode[False]) is shared
    _zero_up(model)
    inputs = make_inputs(model, model_type)
    model.train(), base.train()
    torch.manual_seed(3)
    got = main_output(model(**inputs))
    torch.manual_seed(3)
    assert torch.equal(got, main_output(base(**inputs)))


class _AttentionBlock(torch.nn.Module):
    """Attention with an optional mask; ``causal_without_mask``: no mask means causal (a Python branch on None
    that a trace bakes in, so a capture made with a mask cannot serve a call without one)."""

    def __init__(self, causal_without_mask: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)
        self.causal_without_mask = causal_without_mask

    def forward(self, x, mask=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        causal = mask is None and self.causal_without_mask
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return x + self.out(a)


class _AttentionNet(torch.nn.Module):
    def __init__(self, causal_without_mask: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_AttentionBlock(causal_without_mask) for _ in range(3)])

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return x


@pytest.mark.parametrize("causal_without_mask", [False, True])
def test_a_call_without_mask_shares_the_masked_capture_only_where_it_computes_the_same(causal_without_mask):
    """A None where the capture had a tensor: shared when the traced path just hands it to an op taking None
    (one capture for both calls), traced anew when a Python branch on ``mask is None`` changed the code."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=gen)
    mask = torch.ones(2, 5, 5, dtype=torch.bool).tril()
    mask[-1, :, -2:] = False
    mask[-1, -2:, -2:] = torch.eye(2, dtype=torch.bool)  # padded rows attend to themselves (no all-False row)
    model = _AttentionNet(causal_without_mask).eval()
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(sites=("linear:out",))}, example_inputs=(x, mask))
    with torch.no_grad():
        for m in (mask, None, mask):
            assert torch.equal(model(x, m), base(x, m))  # LoRA starts at zero: the base model's output
    layer = layers_of(model)[1][0]
    traced = {key: ts for key, ts in layer_state(layer).traced.items() if not key[2]}  # eval mode's
    captures = {id(t.capture) for ts in traced.values() for t in ts}
    assert len(traced) == 2  # two kinds of call: with and without a mask
    assert len(captures) == (2 if causal_without_mask else 1)
    with torch.no_grad():  # and no result differs between the layers sharing a capture
        assert torch.equal(model(x * 2, None), base(x * 2, None))

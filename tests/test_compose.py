"""Composition blocks compiled into the graph vs. an independent eager interpreter (tests/composition_reference.py).

The reference runs an untouched copy of the model whose residual sites are patched with forward hooks that apply
the interpreter; fxadapt runs its generated code. Setups cover every block and allowed nesting, plus random trees.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from composition_reference import Fusion, interpret, site_weights
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import (
    assert_fp64_equal,
    fp64,
    in_fp64,
    main_output,
    make_inputs,
    make_model,
    randomise_adapters,
)

import fxadapt
from fxadapt import Average, BatchSplit, Fuse, Parallel, Split, Stack
from fxadapt.model import get_state, layers_of

NAMES = ("a", "b", "c")
CONFIGS = {
    "a": "seq_bn",
    "b": "double_seq_bn",
    "c": fxadapt.BottleneckConfig(reduction_factor=4, non_linearity="gelu", original_ln_before=False),
}
SEQ = 7
BATCH = 2


# -- reference: hooks applying the interpreter on an untouched model ----------------------------------------


def _hook_bert(ref_model, weights_for, setup):
    handles = []
    for path in layers_of(ref_model)[0]:
        layer = ref_model.get_submodule(path)
        for key, module in (("attn_out", layer.attention.output), ("ffn_out", layer.output)):

            def hook(mod, args, out, key=key, path=path):
                adapters, fusions = weights_for[path][key]
                h = mod.dropout(mod.dense(args[0]))
                return interpret(setup, adapters, fusions, h, args[1], mod.LayerNorm)

            handles.append(module.register_forward_hook(hook))
    return handles


def _hook_prenorm(ref_model, weights_for, setup, sublayers):
    """Pre-LN layers: record x at the norm feeding a sublayer; replace the sublayer output h by ref - x."""
    handles = []
    for path in layers_of(ref_model)[0]:
        layer = ref_model.get_submodule(path)
        for key, norm_path, sub_path in sublayers(layer):
            box = {}
            norm, sub = layer.get_submodule(norm_path), layer.get_submodule(sub_path)
            handles.append(norm.register_forward_pre_hook(lambda m, a, box=box: box.__setitem__("x", a[0])))

            def hook(mod, args, out, key=key, path=path, box=box):
                adapters, fusions = weights_for[path][key]
                h = out[0] if isinstance(out, tuple) else out
                y = interpret(setup, adapters, fusions, h, box["x"], None)
                new = y - box["x"]
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handles.append(sub.register_forward_hook(hook))
    return handles


def _llama_sublayers(layer):
    return [("attn_out", "input_layernorm", "self_attn"), ("ffn_out", "post_attention_layernorm", "mlp")]


def _t5_sublayers(layer):
    out = [("attn_out", "layer.0.layer_norm", "layer.0.SelfAttention")]
    if len(layer.layer) == 3:
        out.append(("cross_out", "layer.1.layer_norm", "layer.1.EncDecAttention"))
    out.append(
        (
            "ffn_out",
            f"layer.{len(layer.layer) - 1}.layer_norm",
            f"layer.{len(layer.layer) - 1}.DenseReluDense",
        )
    )
    return out


def reference_output(arch, base, model, setup, inputs):
    ref_model = copy.deepcopy(base)
    paths, layers = layers_of(model)
    weights_for = {p: site_weights(model, layer, i, setup) for i, (p, layer) in enumerate(zip(paths, layers))}
    if arch == "bert":
        handles = _hook_bert(ref_model, weights_for, setup)
    else:
        handles = _hook_prenorm(
            ref_model, weights_for, setup, _llama_sublayers if arch == "llama" else _t5_sublayers
        )
    n = fxadapt.compose.parallel_channels(setup)
    if n > 1:
        inputs = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    try:
        with torch.no_grad():
            return main_output(ref_model(**inputs))
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module", params=["bert", "llama", "t5"])
def composed(request):
    arch = request.param
    base = make_model(arch)
    model = copy.deepcopy(base)
    fxadapt.inject(model, CONFIGS, activate=False)
    randomise_adapters(model, NAMES, seed=11, std=0.1)
    return arch, base, model


def _ensure_fusions(model, setup, gen=None):
    if isinstance(setup, str):
        return
    if isinstance(setup, Fuse) and setup.name not in get_state(model).fusions:
        fxadapt.add_fusion(model, setup)
        gen = gen or torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in fxadapt.fusion_parameters(model, setup).values():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    for child in setup.children:
        _ensure_fusions(model, child, gen)


def check(composed, setup, rtol=1e-12):
    """fxadapt's output for ``setup`` equals the reference interpreter's, both in fp64 (the two orders of the
    same arithmetic agree to ~1e-15 there; in fp32 their rounding depends on the CPU's kernels)."""
    arch, base, model = composed
    _ensure_fusions(model, setup)
    fxadapt.activate(model, setup)
    inputs = make_inputs(arch, batch=BATCH, seq=SEQ)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    if "decoder_input_ids" in inputs:  # Split needs the same sequence length in encoder and decoder
        inputs["decoder_input_ids"] = inputs["input_ids"].flip(-1)
    with fp64(base, model):
        with torch.no_grad():
            got = main_output(model(**in_fp64(inputs)))
        expected = reference_output(arch, base, model, setup, in_fp64(inputs))
    assert_fp64_equal(got, expected, repr(setup), rtol)


EXPLICIT = [
    Stack("a"),
    Stack("b"),
    Stack("a", "b"),
    Stack("b", "c", "a"),
    Fuse("a", "b"),
    Fuse("a", "b", "c"),
    Stack("c", Fuse("a", "b")),
    Fuse(Stack("a", "c"), "b"),  # Fuse of Stacks (AdapterHub #574)
    Stack(Fuse("a", "b"), "c"),  # Stack + Fuse (AdapterHub #496)
    Parallel("a", "b"),
    Parallel("a", Stack("b", "c")),
    Stack(Parallel("a", "b")),
    BatchSplit("a", "b", batch_sizes=[1, 1]),
    BatchSplit(Stack("a", "b"), "c", batch_sizes=[1, 1]),
    Split("a", "b", splits=[3, 4]),
    Split(Stack("a", "b"), BatchSplit("c", "a", batch_sizes=[1, 1]), splits=[4, 3]),
    Average("a", "b"),
    Average("a", "b", "c", weights=[0.2, 0.3, 0.5]),
    Average(Stack("a", "b"), "c", weights=[2.0, 1.0]),
    Stack("a", Average("b", "c")),
    Stack(Split("a", "b", splits=[3, 4]), "c"),
    Parallel(BatchSplit("a", "b", batch_sizes=[1, 1]), Average("b", "c")),
]


@pytest.mark.parametrize("setup", EXPLICIT, ids=repr)
def test_block_matches_reference(composed, setup):
    check(composed, setup)


# -- random trees ------------------------------------------------------------------------------------------


def _trees():
    """Valid setups of depth <= 3 (sizes fit: a BatchSplit/Split slice is never split again the same way)."""
    names = st.sampled_from(NAMES)
    leaf_stack = st.lists(names, min_size=1, max_size=2).map(lambda c: Stack(*c))

    def children(inner, n_min, n_max):
        return st.lists(st.one_of(names, inner), min_size=n_min, max_size=n_max)

    def average(inner):
        return children(inner, 2, 3).flatmap(
            lambda c: st.lists(st.floats(0.1, 2.0), min_size=len(c), max_size=len(c)).map(
                lambda w, c=c: Average(*c, weights=w)
            )
        )

    def batch_split(inner):
        return children(inner, 2, 2).map(lambda c: BatchSplit(*c, batch_sizes=[1, 1]))

    def split(inner):
        return children(inner, 2, 2).map(lambda c: Split(*c, splits=[3, 4]))

    def fuse(inner):
        return children(inner, 2, 3).map(lambda c: Fuse(*c))

    in_average = st.one_of(leaf_stack, split(leaf_stack), batch_split(leaf_stack))
    in_batch_split = st.one_of(leaf_stack, split(leaf_stack), average(leaf_stack))
    in_split = st.one_of(leaf_stack, batch_split(leaf_stack), average(leaf_stack))
    in_stack = st.one_of(
        leaf_stack, fuse(leaf_stack), average(in_average), batch_split(in_batch_split), split(in_split)
    )
    return st.one_of(
        children(in_stack, 1, 3).map(lambda c: Stack(*c)),
        fuse(leaf_stack),
        average(in_average),
        batch_split(in_batch_split),
        split(in_split),
    )


@given(setup=_trees())
def test_random_trees_match_reference(composed, setup):
    check(composed, setup)


# -- behaviour ---------------------------------------------------------------------------------------------


def test_invalid_nestings_raise_and_keep_setup():
    model = make_model("bert")
    fxadapt.inject(model, CONFIGS, activate=False)
    fxadapt.activate(model, "a")
    for bad, match in [
        (Fuse("a", Average("b", "c")), "cannot nest Average inside Fuse"),
        (Average("a", Parallel("b", "c")), "cannot nest Parallel inside Average"),
        (Split("a", Fuse("b", "c"), splits=[3, 4]), "cannot nest Fuse inside Split"),
        (Stack("a", Stack("b", Stack("c", Stack("a", Stack("b"))))), "too deep"),
    ]:
        with pytest.raises(fxadapt.CompositionError, match=match):
            fxadapt.activate(model, bad)
        assert fxadapt.active_setup(model) == Stack("a")


def test_batch_split_size_mismatch_is_a_clear_error():
    model = make_model("bert")
    fxadapt.inject(model, CONFIGS, activate=False)
    fxadapt.activate(model, BatchSplit("a", "b", batch_sizes=[1, 2]))
    with (
        pytest.raises(
            fxadapt.CompositionError, match=r"BatchSplit\[1, 2\] \(batch size\): the input has size 2"
        ),
        torch.no_grad(),
    ):
        model(**make_inputs("bert", batch=2))


def test_parallel_stacks_outputs_along_batch():
    model = make_model("bert")
    fxadapt.inject(model, CONFIGS, activate=False)
    inputs = make_inputs("bert", batch=2)
    with torch.no_grad():
        singles = []
        for name in ("a", "b"):
            fxadapt.activate(model, name)
            singles.append(main_output(model(**inputs)))
        fxadapt.activate(model, Parallel("a", "b"))
        both = main_output(model(**inputs))
    assert both.shape[0] == 4
    torch.testing.assert_close(both[:2], singles[0], rtol=0, atol=1e-6)


def test_train_fusion_trains_only_fusion_and_saves(tmp_path):
    import transformers as tf
    from tiny_models import make_config

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(make_config("bert", num_labels=2))
    fxadapt.inject(model, {"a": "seq_bn", "b": "seq_bn"}, activate=False)
    fuse = fxadapt.add_fusion(model, ["a", "b"])
    fxadapt.train_fusion(model, fuse)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(fxadapt.fusion_parameters(model, fuse)) | {"classifier.weight", "classifier.bias"}
    inputs = make_inputs("bert")
    out = model(**inputs, labels=torch.tensor([0, 1]))
    (out.loss + fxadapt.fusion_regularization_loss(model)).backward()
    assert all(p.grad is not None for p in fxadapt.fusion_parameters(model, fuse).values())
    assert all(p.grad is None for p in fxadapt.adapter_parameters(model, "a").values())


def test_fusion_layer_matches_adapterhub_definition():
    """AdapterFusion's forward on random tensors vs the reference definition (dynamic config)."""
    from fxadapt.fusion import AdapterFusion, FusionConfig

    torch.manual_seed(0)
    fusion = AdapterFusion(16, FusionConfig()).eval()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    q, ups, res = torch.randn(2, 5, 16), torch.randn(2, 5, 3, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(fusion(q, ups, res), Fusion(fusion)(q, ups, res), rtol=1e-6, atol=1e-6)
    # "dynamic" starts the value matrix at the identity (off-diagonal 1e-6)
    fresh = AdapterFusion(8, FusionConfig())
    assert torch.allclose(fresh.value.weight, torch.eye(8), atol=1e-6)


def test_switching_setups_reuses_compiled_code():
    model = make_model("llama")
    fxadapt.inject(model, CONFIGS, activate=False)
    inputs = make_inputs("llama")
    layer = layers_of(model)[1][0]
    state = fxadapt.install.layer_state(layer)
    with torch.no_grad():
        fxadapt.activate(model, Stack("a", "b"))
        model(**inputs)
        traces = sum(len(v) for v in state.traced.values())
        fxadapt.activate(model, Average("a", "c"))
        model(**inputs)
        fxadapt.activate(model, Stack("a", "b"))
        model(**inputs)
    assert (
        sum(len(v) for v in state.traced.values()) == traces
    )  # a setup switch re-plans; it does not re-trace


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_parallel_captures_a_new_kind_of_call_at_run_time(arch):
    """A kind of call first seen under Parallel (here fp64, after fp32 priming) is traced at run time on the
    inputs as the generated code replicates them: in a decoder the encoder states arrive replicated, the hidden
    states not yet, and the base layer would fail on that mix."""
    base = make_model(arch)
    model = copy.deepcopy(base)
    fxadapt.inject(model, CONFIGS, activate=False)
    randomise_adapters(model, NAMES, seed=3, std=0.1)
    setup = Parallel("a", Stack("b", "c"))
    fxadapt.activate(model, setup)
    states = [fxadapt.install.layer_state(layer) for layer in layers_of(model)[1]]
    before = [sum(len(v) for v in s.traced.values()) for s in states]
    inputs = in_fp64(make_inputs(arch, batch=BATCH, seq=SEQ))
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    with fp64(base, model):
        with torch.no_grad():
            got = main_output(model(**inputs))
        expected = reference_output(arch, base, model, setup, inputs)
    assert [sum(len(v) for v in s.traced.values()) for s in states] != before  # it did capture at run time
    assert_fp64_equal(got, expected, setup)


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("entry", ["activate", "using"])
def test_parallel_on_encoder_decoder_with_padding(arch, entry):
    """The decoder stack builds its cross-attention mask from the encoder mask [B, S] and the encoder states, which
    Parallel returns replicated [n·B, S, d]: channel i of the output equals child i alone, padding included.
    (Single adapters of one config: with a Stack child or other norm options a channel is not its child alone, in
    AdapterHub as in fxadapt.)"""
    model = make_model(arch)
    fxadapt.inject(model, {"x": "seq_bn", "y": "seq_bn"}, activate=False)
    randomise_adapters(model, ("x", "y"), seed=3, std=0.1)
    inputs = in_fp64(make_inputs(arch, batch=BATCH, seq=SEQ))
    assert not inputs["attention_mask"].all()  # a padded row
    setup = Parallel("x", "y")
    with torch.no_grad(), fp64(model):
        if entry == "activate":
            fxadapt.activate(model, setup)
            got = main_output(model(**inputs))
        else:
            with fxadapt.using(model, setup):
                got = main_output(model(**inputs))
        for i, child in enumerate(setup.children):
            with fxadapt.using(model, child):
                alone = main_output(model(**inputs))
            assert_fp64_equal(got[i * BATCH : (i + 1) * BATCH], alone, (arch, child))


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("entry", ["activate", "using"])
def test_parallel_generate_returns_each_channel(arch, entry):
    """AdapterHub's parallel generation: ``generate`` under Parallel returns n·B sequences, channel i being child i's
    own greedy decoding (fp64, so that no argmax is a rounding tie)."""
    model = make_model(arch)
    fxadapt.inject(model, {"x": "seq_bn", "y": "seq_bn"}, activate=False)
    randomise_adapters(model, ("x", "y"), seed=3, std=0.3)
    inputs = make_inputs(arch, batch=BATCH)
    inputs.pop("decoder_input_ids", None)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])  # right padding would warn (decoder)
    setup = Parallel("x", "y")
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad(), fp64(model):
        if entry == "activate":
            fxadapt.activate(model, setup)
            got = model.generate(**inputs, **kwargs)
            assert copy.deepcopy(model).generate.model is not model  # a copy generates with its own weights
            restored = pickle.loads(pickle.dumps(model))
            assert restored.generate.model is restored
            assert "generation_config" in inspect.signature(model.generate).parameters
        else:
            with fxadapt.using(model, setup):
                got = model.generate(**inputs, **kwargs)
        assert got.shape[0] == 2 * BATCH
        for i, child in enumerate(setup.children):
            with fxadapt.using(model, child):
                alone = model.generate(**inputs, **kwargs)
            assert torch.equal(got[i * BATCH : (i + 1) * BATCH], alone), (arch, child)
    fxadapt.activate(model, "x")
    if entry == "activate":  # the wrapper goes with the Parallel setup (a using block's stays, and defers)
        assert "generate" not in model.__dict__
    with torch.no_grad():
        assert model.generate(**inputs, **kwargs).shape[0] == BATCH


# -- per-row adapters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
def test_per_row_equals_each_row_alone(arch, preset):
    model = make_model(arch)
    fxadapt.inject(model, {n: preset for n in ("x", "y", "z")}, activate=False)
    randomise_adapters(model, ("x", "y", "z"), seed=4, std=0.2)
    inputs = in_fp64(make_inputs(arch, batch=5))
    ids = torch.tensor([2, -1, 0, 1, 2])
    fxadapt.activate(model, fxadapt.PerRow("x", "y", "z"))
    with torch.no_grad(), fp64(model):  # rows of a batch of 5 vs batches of 1: fp32 rounding differs by shape
        got = main_output(model(**inputs, adapter_ids=ids))
        for row, i in enumerate(ids.tolist()):
            fxadapt.activate(model, None if i < 0 else ("x", "y", "z")[i])
            alone = main_output(model(**{k: v[row : row + 1] for k, v in inputs.items()}))
            assert_fp64_equal(got[row : row + 1], alone, (row, i))


def test_per_row_needs_ids_and_works_in_generate():
    model = make_model("llama")
    fxadapt.inject(model, {"x": "seq_bn", "y": "seq_bn"}, activate=False)
    fxadapt.activate(model, fxadapt.PerRow("x", "y"))
    inputs = make_inputs("llama", batch=2)
    with pytest.raises(fxadapt.CompositionError, match="no adapter_ids were given"), torch.no_grad():
        model(**inputs)
    with torch.no_grad(), fxadapt.adapter_ids(model, [1, -1]):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 10)

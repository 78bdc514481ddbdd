"""inject() across 13 Hugging Face architectures (transformers 5, tiny random configs).

Reference for every comparison is the untouched model (a deepcopy taken before inject), never fxadapt itself.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tiny_models import ARCHS, DECODERS, SPECS, adapter_grads, main_output, make_inputs, make_model

import fxadapt
from fxadapt.install import layer_state
from fxadapt.model import layers_of

# Residual sites each architecture's layers must expose: (layer count, sites per layer list)
EXPECTED = {arch: {"attn.out", "ffn.out"} for arch in ARCHS}
ENC_DEC = {a for a, s in SPECS.items() if s[3] == "seq2seq"}


def _zero_up(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(model, name).items():
            if ".up." in key:
                p.zero_()


def _randomise(model: torch.nn.Module, name: str, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _all_sites_config(arch: str) -> fxadapt.BottleneckConfig:
    sites = ("attn.out", "ffn.out", "cross.out") if arch in ENC_DEC else ("attn.out", "ffn.out")
    return fxadapt.BottleneckConfig(sites=sites, original_ln_before=False, non_linearity="swish")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_residual_site_found(arch):
    model = make_model(arch)
    report = fxadapt.explain(model)
    paths, _ = layers_of(model)
    n_layers = 4 if arch in ENC_DEC else 2
    assert len(report.layers) == len(paths) == n_layers
    for layer in report.layers:
        kinds = {s.split(" ")[0] for s in layer.sites}
        expected = set(EXPECTED[arch])
        if arch in ENC_DEC and "decoder" in layer.path:
            expected.add("cross.out")
        assert kinds == expected, (layer.path, layer.sites)

    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    placements = fxadapt.model.get_state(model).adapters["a"].placements
    expected_count = sum(3 if (arch in ENC_DEC and "decoder" in p) else 2 for p in paths)
    assert sum(len(k) for k in placements.values()) == expected_count


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_adapter_is_bit_identical_and_nonzero_changes(arch):
    model = make_model(arch)
    base = copy.deepcopy(model)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _zero_up(model, "a")
    with torch.no_grad():
        expected = main_output(base(**inputs))
        assert torch.equal(main_output(model(**inputs)), expected)
        # a different batch/sequence length reuses the capture (sizes are symbolic) and stays exact
        other = make_inputs(arch, batch=3, seq=5, seed=4)
        assert torch.equal(main_output(model(**other)), main_output(base(**other)))
        _randomise(model, "a")
        changed = main_output(model(**inputs))
    assert not torch.allclose(changed, expected, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_mode_keeps_dropout_and_rng_stream(arch):
    model = make_model(arch)
    base = copy.deepcopy(model)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _zero_up(model, "a")
    model.train()
    base.train()
    torch.manual_seed(11)
    expected = main_output(base(**inputs))
    torch.manual_seed(11)
    got = main_output(model(**inputs))
    torch.manual_seed(12)
    again = main_output(model(**inputs))
    assert torch.equal(got, expected)  # same dropout masks as the untouched model: RNG use is unchanged
    assert not torch.equal(got, again)  # and dropout is live


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_only_adapter_params(arch):
    model = make_model(arch)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _randomise(model, "a")
    grads = adapter_grads(model, "a", inputs)
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("arch", ["bert", "llama", "t5", "gpt2"])
def test_gradient_checkpointing_recomputes(arch):
    model = make_model(arch)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _randomise(model, "a")
    fxadapt.train_adapter(model, "a")

    torch.manual_seed(0)
    main_output(model(**inputs)).sum().backward()
    plain = {n: p.grad.clone() for n, p in fxadapt.adapter_parameters(model, "a").items()}
    model.zero_grad()

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, layers = layers_of(model)
    first = layers[0].fxadapt["a"].ffn_out
    calls = []
    handle = first.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    # without early stop, the recompute replays the whole layer (with it, it may stop before the FFN adapter)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        main_output(model(**inputs)).sum().backward()
    handle.remove()
    assert len(calls) == 2  # forward + recompute in backward
    for n, p in fxadapt.adapter_parameters(model, "a").items():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_unchanged_with_zero_adapter(arch):
    model = make_model(arch)
    inputs = {k: v for k, v in make_inputs(arch).items() if k != "decoder_input_ids"}
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _zero_up(model, "a")
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        _randomise(model, "a", std=0.5)
        model.generate(**inputs, max_new_tokens=4, do_sample=False)  # runs with a non-zero adapter too
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["bert", "llama", "t5", "gpt2", "vit", "bart"])
def test_copy_pickle_and_save_pretrained(arch, tmp_path):
    model = make_model(arch)
    inputs = make_inputs(arch)
    base_keys = sorted(model.state_dict())
    fxadapt.inject(model, {"a": _all_sites_config(arch)})
    _randomise(model, "a")
    keys = sorted(model.state_dict())
    assert [k for k in keys if ".fxadapt." not in k] == base_keys  # base keys unchanged, adapter keys added
    with torch.no_grad():
        expected = main_output(model(**inputs))
        clone = copy.deepcopy(model)
        assert torch.equal(main_output(clone(**inputs)), expected)
        assert type(layers_of(clone)[1][0]) is type(layers_of(model)[1][0])
        restored = pickle.loads(pickle.dumps(model))
        assert torch.equal(main_output(restored(**inputs)), expected)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        assert torch.equal(main_output(torch.load(buf, weights_only=False)(**inputs)), expected)
    assert isinstance(layers_of(model)[1][0], layer_state(layers_of(model)[1][0]).orig_class)

    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path).eval()
    fxadapt.inject(fresh, {"a": _all_sites_config(arch)})
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), expected)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_remove_restores_original(arch):
    model = make_model(arch)
    base = copy.deepcopy(model)
    inputs = make_inputs(arch)
    cls = type(layers_of(model)[1][0])
    fxadapt.inject(model, {"a": "seq_bn"})
    fxadapt.inject(model, {"b": "double_seq_bn"})
    _randomise(model, "a")
    fxadapt.remove(model, "a")
    fxadapt.remove(model, "b")
    assert type(layers_of(model)[1][0]) is cls
    assert model.state_dict().keys() == base.state_dict().keys()
    assert fxadapt.model.get_state(model) is None
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))


def test_activate_switches_and_deactivates():
    model = make_model("bert")
    base = copy.deepcopy(model)
    inputs = make_inputs("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    fxadapt.inject(model, {"b": "par_bn"})
    _randomise(model, "a")
    _randomise(model, "b")
    assert fxadapt.active_adapters(model) == ("b",)
    with torch.no_grad():
        out_b = main_output(model(**inputs))
        fxadapt.activate(model, "a")
        out_a = main_output(model(**inputs))
        fxadapt.activate(model, None)
        out_none = main_output(model(**inputs))
        expected = main_output(base(**inputs))
    assert torch.equal(out_none, expected)
    assert not torch.allclose(out_a, out_b)
    assert not torch.allclose(out_a, expected)


def test_train_adapter_freezes_base_and_keeps_head():
    import transformers as tf
    from tiny_models import make_config

    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(make_config("bert", num_labels=3))
    fxadapt.inject(model, {"a": "seq_bn"})
    fxadapt.train_adapter(model, "a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(fxadapt.adapter_parameters(model, "a")) | {"classifier.weight", "classifier.bias"}
    assert model.training


def test_no_retrace_for_new_lengths():
    model = make_model("llama")
    fxadapt.inject(model, {"a": "seq_bn"})
    _, layers = layers_of(model)

    def traces() -> list[int]:
        return [sum(len(v) for v in layer_state(layer).traced.values()) for layer in layers]

    with torch.no_grad():
        model(**make_inputs("llama", batch=2, seq=7))
        first = traces()
        for batch, seq in ((3, 11), (1, 4), (5, 30)):
            model(**make_inputs("llama", batch=batch, seq=seq))
    assert traces() == first


def test_pickle_roundtrip_of_dynamic_class():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    layer = layers_of(model)[1][0]
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone).__name__ == "BertLayer"
    assert type(clone) is type(layer)

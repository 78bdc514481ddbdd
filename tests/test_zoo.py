"""The architecture zoo (tests/zoo.py): every model type passes every check or raises a typed fxadapt error.

One test per model type runs the whole list on one tiny model (building it is the cost). References are the
untouched model (a deepcopy taken before inject) and the model's own eager forward, never fxadapt.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import adapter_grads
from zoo import REFUSED, ZOO, main_output, make_inputs, make_model

import fxadapt
from fxadapt.errors import FxAdaptError
from fxadapt.model import get_state, layers_of

HOULSBY = fxadapt.BottleneckConfig(
    sites=("attn.out", "ffn.out", "cross.out"), original_ln_before=False, non_linearity="swish"
)


def _bn_config(entry) -> fxadapt.BottleneckConfig:
    sites = (
        ("attn.out", "ffn.out", "cross.out") if entry.kind in ("seq2seq", "speech") and entry.sites else None
    )
    return HOULSBY if sites else HOULSBY.replace(sites=("attn.out", "ffn.out"))


def _set(model, name: str, which: str, std: float | None) -> None:
    """Zero (std None) or randomise the adapter parameters whose key contains ``which``."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(model, name).items():
            if which in key:
                p.copy_(torch.zeros_like(p) if std is None else torch.randn(p.shape, generator=gen) * std)


def _run(model, inputs, seed: int = 0) -> torch.Tensor:
    """The model's main output; seeded, since some models draw random numbers even in eval (ViT-MAE's shuffle)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # wav2vec2-style SpecAugment draws its train-mode masks with numpy
    with torch.no_grad():
        return main_output(model(**inputs))


def _expected_sites(entry, path: str) -> list[str]:
    if entry.sites:
        for fragment, kinds in entry.sites.items():
            if fragment in path:
                return sorted(kinds)
    return ["attn.out", "ffn.out"]


@pytest.mark.parametrize("entry", ZOO, ids=[e.model_type for e in ZOO])
def test_zoo(entry):
    model = make_model(entry)
    base = copy.deepcopy(model)
    inputs = make_inputs(model, entry)
    paths, layers = layers_of(model)
    classes = [type(m) for m in layers]
    keys = sorted(model.state_dict())

    # every residual site of every block
    report = fxadapt.explain(model)
    assert len(report.layers) == len(paths)
    for layer in report.layers:
        kinds = sorted(s.split(" ")[0] for s in layer.sites)
        assert kinds == _expected_sites(entry, layer.path), (layer.path, layer.sites, layer.leaves)

    # a zero adapter is the base model, in eval and in train mode (same RNG stream: same dropout masks)
    fxadapt.inject(model, {"a": _bn_config(entry)})
    placed = sum(len(k) for k in get_state(model).adapters["a"].placements.values())
    assert placed == sum(len(_expected_sites(entry, p)) for p in paths)
    _set(model, "a", ".up.", None)
    expected = _run(base, inputs)
    assert torch.equal(_run(model, inputs), expected)
    model.train(), base.train()
    assert torch.equal(_run(model, inputs, seed=3), _run(base, inputs, seed=3))
    model.eval(), base.eval()

    # a non-zero adapter changes the outputs; gradients reach exactly the adapter
    _set(model, "a", "", 0.2)
    assert not torch.allclose(_run(model, inputs), expected, atol=1e-5)
    grads = adapter_grads(model, "a", inputs)
    assert any(g.abs().sum() > 0 for g in grads.values())

    # remove restores the original classes, keys and outputs
    fxadapt.remove(model, "a")
    assert [type(m) for m in layers_of(model)[1]] == classes
    assert sorted(model.state_dict()) == keys
    assert torch.equal(_run(model, inputs), expected)

    # default LoRA (attn.q, attn.v) on every block: zero B is the base model, a random B changes it
    if entry.lora_error is not None:
        with pytest.raises(entry.lora_error) as info:
            fxadapt.inject(model, {"l": "lora"})
        assert "attn.q" in str(info.value) or "attn.v" in str(info.value)
        assert get_state(model) is None
    else:
        fxadapt.inject(model, {"l": "lora"})
        placements = get_state(model).adapters["l"].placements
        for i, path in enumerate(paths):  # cross-attention too where a block has one (as in both peers)
            want = {"attn.q", "attn.v"} | (
                {"cross.q", "cross.v"} if "cross.out" in _expected_sites(entry, path) else set()
            )
            assert set(placements.get(i, ())) == want, (path, placements)
        assert torch.equal(_run(model, inputs), expected)
        _set(model, "l", "lora_B", 0.2)
        assert not torch.allclose(_run(model, inputs), expected, atol=1e-5)
        fxadapt.remove(model, "l")

    # generation is unchanged by a zero adapter
    if entry.kind in ("decoder", "seq2seq"):
        gen_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        with torch.no_grad():
            want = base.generate(**gen_inputs, max_new_tokens=3, do_sample=False)
        fxadapt.inject(model, {"g": _bn_config(entry)})
        _set(model, "g", ".up.", None)
        with torch.no_grad():
            got = model.generate(**gen_inputs, max_new_tokens=3, do_sample=False)
        assert torch.equal(got, want)
        fxadapt.remove(model, "g")

    # the user's own batch as example inputs
    fresh = copy.deepcopy(base)
    user_batch = make_inputs(fresh, entry, batch=3, seq=6, seed=5)
    fxadapt.inject(fresh, {"u": _bn_config(entry)}, example_inputs=user_batch)
    _set(fresh, "u", ".up.", None)
    assert torch.equal(_run(fresh, user_batch), _run(base, user_batch))


def test_zoo_covers_the_categories():
    """At least two model types per structural category, and every kind of model."""
    for category in (
        "between",
        "parallel",
        "moe",
        "nested",
        "handwritten",
        "fused_qkv",
        "nonlinear_proj",
        "capture",
    ):
        assert sum(category in e.categories for e in ZOO) >= 2, category
    assert {e.kind for e in ZOO} >= {"encoder", "decoder", "seq2seq", "vision", "speech", "multimodal"}
    assert len(ZOO) >= 45


@pytest.mark.parametrize("model_type", [e.model_type for e in REFUSED])
def test_refused_models_get_a_typed_error(model_type):
    """XLM-style models keep attention and feed-forward in separate lists with the residual adds in the model's
    own loop (no block to adapt); SqueezeBERT's stream is channels-first. Inject says so with a typed error and
    changes nothing."""
    model = make_model(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FxAdaptError):
        fxadapt.inject(model, {"a": "double_seq_bn"})
    assert get_state(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

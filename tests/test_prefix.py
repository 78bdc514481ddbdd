"""Prefix tuning against independent references: a hand-written BERT layer, and HF's own KV cache pre-filled with
the prefixes (decoder LMs), plus the usual invariants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import layers_of

P = 4


def _prefixed(arch, flat=False, seed=0):
    model = make_model(arch)
    base = copy.deepcopy(model)
    fxadapt.inject(model, {"p": fxadapt.PrefixTuningConfig(prefix_length=P, bottleneck_size=12, flat=flat)})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "p").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return base, model


def _all_prefixes(model, kv_heads, head_dim):
    """Every layer's (keys, values) [kv_heads, P, head_dim], by AdapterHub's formula on the whole pool output."""
    layers = layers_of(model)[1]
    pool = layers[0].fxadapt["p"]["attn_kv"].get_pool()
    n = pool.n_layers
    with torch.no_grad():
        if pool.flat:
            out = pool.control_trans.view(P, n * 2, kv_heads, head_dim)
        else:
            out = pool.control_trans(pool.wte(torch.arange(P))).view(P, n * 2, kv_heads, head_dim)
    out = out.permute(1, 2, 0, 3)  # [n*2, heads, P, dim]
    return [(out[2 * i], out[2 * i + 1]) for i in range(n)]


@pytest.mark.parametrize("flat", [False, True])
def test_bert_matches_handwritten_attention_with_prefix(flat):
    base, model = _prefixed("bert", flat)
    inputs = make_inputs("bert")
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    prefixes = _all_prefixes(model, 4, 8)
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
        x = base.embeddings(input_ids=inputs["input_ids"])
        for layer, (pk, pv) in zip(layers_of(base)[1], prefixes):
            sa, so = layer.attention.self, layer.attention.output
            b, t, d = x.shape

            def split(v, b=b, t=t):
                return v.view(b, t, 4, 8).transpose(1, 2)

            q, k, v = (split(F.linear(x, m.weight, m.bias)) for m in (sa.query, sa.key, sa.value))
            k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
            ctx = (
                (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v)
                .transpose(1, 2)
                .reshape(b, t, d)
            )
            a = so.LayerNorm(so.dense(ctx) + x)
            x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + a)
    assert (got - x).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch, kv_heads", [("llama", 2), ("gpt2", 4)])
def test_decoder_equals_hf_cache_prefilled_with_prefixes(arch, kv_heads):
    from transformers import DynamicCache

    base, model = _prefixed(arch)
    inputs = make_inputs(arch)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    b, t = ids.shape
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache(config=base.config)
        for i, (pk, pv) in enumerate(_all_prefixes(model, kv_heads, 8)):
            cache.update(pk.expand(b, -1, -1, -1).contiguous(), pv.expand(b, -1, -1, -1).contiguous(), i)
        expected = base(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones(b, P, dtype=mask.dtype), mask], 1),
            position_ids=torch.arange(t).expand(b, -1),
            cache=cache,
            use_cache=True,
        ).logits
    valid = mask.bool()  # compare the non-padded positions
    assert (got[valid] - expected[valid]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "t5", "vit", "bart"])
def test_invariants(arch, tmp_path):
    base, model = _prefixed(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        out = main_output(model(**inputs))
        assert not torch.allclose(out, main_output(base(**inputs)), atol=1e-4)
    # gradients reach only the prefix parameters
    fxadapt.train_adapter(model, "p")
    model.eval()
    main_output(model(**inputs)).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(fxadapt.adapter_parameters(model, "p"))
    # save -> load
    fxadapt.save_adapter(model, tmp_path, "p")
    fresh = copy.deepcopy(base)
    fxadapt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), out)
    # eject: same outputs from flat prefixes
    n_before = sum(p.numel() for p in fxadapt.adapter_parameters(model, "p").values())
    fxadapt.eject_prefix(model, "p")
    assert fxadapt.list_adapters(model)["p"].flat
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), out, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in fxadapt.adapter_parameters(model, "p").values()) != n_before
    # remove -> bit-identical to the base model
    fxadapt.remove(model, "p")
    with torch.no_grad():
        assert torch.equal(main_output(model(**inputs)), main_output(base(**inputs)))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_generate_with_cache(arch):
    _, model = _prefixed(arch)
    inputs = {k: v for k, v in make_inputs(arch).items() if k != "decoder_input_ids"}
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_handwritten_attention_is_a_clear_error():
    model = make_model("deberta-v2")  # its disentangled attention is written by hand: no attention call
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxadapt.SiteNotFoundError, match=r"\['attn.kv'\] not found.*written by hand"):
        fxadapt.inject(model, {"p": "prefix_tuning"})
    assert model.state_dict().keys() == before.keys()
    assert fxadapt.list_adapters(model) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prefix_length": 0}, r"prefix_length=0"),
        ({"bottleneck_size": -1}, r"bottleneck_size=-1"),
        ({"non_linearity": "tanhh"}, r"non_linearity='tanhh'"),
        ({"dropout": 1.0}, r"dropout=1.0"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(fxadapt.ConfigError, match=match):
        fxadapt.PrefixTuningConfig(**kwargs)

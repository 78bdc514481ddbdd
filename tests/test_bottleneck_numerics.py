"""Bottleneck adapters on BERT against a hand-written eager BERT layer implementing docs/design.md §3's formulas.

The reference below re-implements the BERT layer from its weights (F.linear, an explicit softmax attention) and
applies the adapter formulas literally; it shares no code with fxadapt.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import fp64, make_inputs, make_model

import fxadapt
from fxadapt.model import layers_of


def _adapter(params: dict[str, torch.Tensor], z: torch.Tensor, act, scale) -> torch.Tensor:
    """A(z) = s · (act(z Wdᵀ + bd) Wuᵀ + bu)."""
    down = F.linear(z, params["down.weight"], params["down.bias"])
    return scale * F.linear(act(down), params["up.weight"], params["up.bias"])


def _reference_layer(
    layer, x, adapters: dict[str, dict[str, torch.Tensor]], preset: str, scale
) -> torch.Tensor:
    sa, so = layer.attention.self, layer.attention.output
    heads = sa.num_attention_heads
    b, t, d = x.shape
    dh = d // heads

    def split(v):
        return v.view(b, t, heads, dh).transpose(1, 2)

    q = split(F.linear(x, sa.query.weight, sa.query.bias))
    k = split(F.linear(x, sa.key.weight, sa.key.bias))
    v = split(F.linear(x, sa.value.weight, sa.value.bias))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    ctx = (probs @ v).transpose(1, 2).reshape(b, t, d)

    def ln(mod, z):
        return F.layer_norm(z, (d,), mod.weight, mod.bias, mod.eps)

    def site(h, res, norm, params):
        if params is None:
            return ln(norm, h + res)
        if preset == "seq_bn":  # y = LN(A(LN(h + x)) + h + x)
            return ln(norm, _adapter(params, ln(norm, h + res), F.relu, scale) + h + res)
        if preset == "double_seq_bn":  # y = LN(A(h) + h + x)
            return ln(norm, _adapter(params, h, F.silu, scale) + h + res)
        if preset in ("par_bn", "scaled_par_bn"):  # y = LN(h + x + s·A(x))
            return ln(norm, h + res + _adapter(params, res, F.relu, scale))
        raise AssertionError(preset)

    h_attn = F.linear(ctx, so.dense.weight, so.dense.bias)
    attn_out = site(h_attn, x, so.LayerNorm, adapters.get("attn_out"))
    inter = F.gelu(F.linear(attn_out, layer.intermediate.dense.weight, layer.intermediate.dense.bias))
    h_ffn = F.linear(inter, layer.output.dense.weight, layer.output.dense.bias)
    return site(h_ffn, attn_out, layer.output.LayerNorm, adapters.get("ffn_out"))


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn"])
def test_bottleneck_presets_match_handwritten_bert(preset):
    model = make_model("bert")
    inputs = make_inputs("bert")
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])  # the reference has no padding mask
    fxadapt.inject(model, {"a": preset})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)  # non-zero everywhere, incl. learned scaling

    _paths, layers = layers_of(model)
    # fp64: the hand-written order of the arithmetic agrees far below fp32's rounding (which depends on the CPU)
    with torch.no_grad(), fp64(model):
        got = model(**inputs).last_hidden_state
        hidden = model.embeddings(input_ids=inputs["input_ids"])
        for layer in layers:
            params = {
                site: {k: v.detach() for k, v in module.state_dict().items()}
                for site, module in layer.fxadapt["a"].items()
            }
            scale = {"par_bn": 4.0, "scaled_par_bn": None}.get(preset, 1.0)
            if scale is None:
                scale = layer.fxadapt["a"]["ffn_out"].scaling.detach()
            hidden = _reference_layer(layer, hidden, params, preset, scale)
    assert set(params) == ({"attn_out", "ffn_out"} if preset == "double_seq_bn" else {"ffn_out"})
    assert (got - hidden).abs().max().item() <= 1e-12


def test_widths_and_init_follow_adapterhub():
    model = make_model("bert")  # hidden 32
    fxadapt.inject(
        model,
        {
            "s": "seq_bn",
            "p": "par_bn",
            "h": fxadapt.BottleneckConfig(init_weights="houlsby", reduction_factor=4),
        },
        activate=False,
    )
    layer = layers_of(model)[1][0]
    seq, par, hou = (
        layer.fxadapt["s"]["ffn_out"],
        layer.fxadapt["p"]["ffn_out"],
        layer.fxadapt["h"]["ffn_out"],
    )
    assert (
        seq.down.out_features == 32 // 16 and par.down.out_features == 32 // 2 and hou.down.out_features == 8
    )
    # mam_adapter: zero up projection, so par_bn starts as an identity on the model
    assert torch.count_nonzero(par.up.weight) == 0 and torch.count_nonzero(par.up.bias) == 0
    # bert init: N(0, 0.02) on both projections, zero biases
    assert torch.count_nonzero(seq.up.weight) > 0 and torch.count_nonzero(seq.down.bias) == 0
    # houlsby: truncated normal within ±2e-2
    assert hou.up.weight.abs().max() <= 2e-2 and hou.down.weight.abs().max() <= 2e-2


def test_reduction_factor_mapping_per_layer():
    model = make_model("bert")
    fxadapt.inject(model, {"a": fxadapt.BottleneckConfig(reduction_factor={"0": 2, "default": 8})})
    _, layers = layers_of(model)
    assert layers[0].fxadapt["a"]["ffn_out"].down.out_features == 16
    assert layers[1].fxadapt["a"]["ffn_out"].down.out_features == 4


def test_leave_out_skips_layers():
    model = make_model("bert")
    fxadapt.inject(model, {"a": fxadapt.BottleneckConfig(leave_out=[0])})
    _, layers = layers_of(model)
    assert "fxadapt" not in layers[0]._modules and "a" in layers[1].fxadapt

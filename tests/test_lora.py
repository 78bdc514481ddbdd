"""LoRA at module sites on bert, llama, gpt2 (fused c_attn), t5 and vit.

The reference for every numeric check is independent of fxadapt's graph rewrite: a deepcopy of the untouched base
model whose projection weights are edited by hand (``W += s·B A`` on the rows of the site, HF ``Conv1D`` columns),
run eagerly. Where each site lives is written out below per architecture, not taken from fxadapt's site finder.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lora_family_reference import SITES, D
from test_errors import Snapshot
from tiny_models import in_fp64, main_output, make_inputs, make_model
from transformers.pytorch_utils import Conv1D

import fxadapt
from fxadapt.install import layer_state
from fxadapt.model import get_state, layers_of

ARCHS = ["bert", "llama", "gpt2", "t5", "vit"]


def randomise(model, name: str, std: float = 0.3, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def site_weights(model, name: str) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    """(layer index, site key) -> {param name: tensor}, read from the state_dict names."""
    paths = get_state(model).layer_paths
    out: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, p in fxadapt.adapter_parameters(model, name).items():
        layer_path, rest = key.split(f".fxadapt.{name}.")
        site, pname = rest.split(".")
        out.setdefault((paths.index(layer_path), site), {})[pname] = p.detach().clone()
    return out


def edit_projection(layer, arch: str, kind: str, edit) -> None:
    """Apply ``edit(w_rows [out_site, in], bias_rows)`` to the site's rows of the projection weight, by hand."""
    path, out_slice = SITES[arch](layer)[kind]
    proj = layer.get_submodule(path)
    with torch.no_grad():
        w = proj.weight.t() if isinstance(proj, Conv1D) else proj.weight  # [out, in] view
        rows = slice(*out_slice) if out_slice else slice(None)
        bias = proj.bias[rows] if proj.bias is not None else None
        edit(w[rows], bias)


def lora_reference(base, model, name: str, arch: str, kinds, scaling: float):
    """The base model with ``W += s·B A`` folded into each adapted projection by hand."""
    ref = copy.deepcopy(base)
    paths = get_state(model).layer_paths
    weights = site_weights(model, name)
    for i, path in enumerate(paths):
        for kind in kinds:
            p = weights[(i, kind.replace(".", "_"))]

            def edit(w, bias, p=p):
                w += scaling * (p["lora_B"] @ p["lora_A"])

            edit_projection(ref.get_submodule(path), arch, kind, edit)
    return ref


def check_invariants(arch, config, reference, tmp_path, tol: float = 1e-6, noop_init: bool = True):
    """no-op init ⇒ bit-identical (where the init is a no-op); random weights ⇒ equals ``reference(base, model)``; grads only to the adapter;
    save → load identical; merge/unmerge round trip; remove ⇒ bit-identical."""
    base = make_model(arch)
    model = copy.deepcopy(base)
    inputs = make_inputs(arch)
    fxadapt.inject(model, {"a": config})
    kinds = set(config.sites)
    placements = get_state(model).adapters["a"].placements
    paths, layers = layers_of(model)
    assert placements == {i: tuple(config.sites) for i in range(len(paths))}
    with torch.no_grad():
        plain = main_output(base(**inputs))
        assert torch.equal(main_output(model(**inputs)), plain) == noop_init

    randomise(model, "a")
    with torch.no_grad():
        got = main_output(model(**inputs))
    assert not torch.allclose(got, plain, atol=1e-3)
    # the reference (weights folded by hand) in fp64, where it and the adapter path agree far below fp32's rounding
    # (which depends on the CPU's kernels); the model goes back to fp32 exactly afterwards
    model.double()
    with torch.no_grad():
        got64 = main_output(model(**in_fp64(inputs)))
        ref64 = reference(copy.deepcopy(base).double(), model, "a", arch, kinds)
        expected = main_output(ref64(**in_fp64(inputs)))
    model.float()
    diff = (got64 - expected).abs().max().item()
    assert diff <= 1e-12 * max(1.0, expected.abs().max().item()), diff

    # backward: gradients reach exactly the adapter's parameters
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = fxadapt.adapter_parameters(model, "a")
    for p in adapter.values():
        p.requires_grad_(True)
    main_output(model(**inputs)).pow(2).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(adapter)
    assert all(p.grad.abs().sum() > 0 for p in adapter.values())
    model.zero_grad(set_to_none=True)

    # save -> load into a fresh copy of the base model
    fxadapt.save_adapter(model, tmp_path / "a", "a")
    fresh = copy.deepcopy(base)
    fxadapt.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), got)

    # merge: same outputs, base graph; unmerge: weights and outputs back
    before = {k: v.clone() for k, v in model.state_dict().items() if ".fxadapt." not in k}
    fxadapt.merge(model, "a")
    assert all(not layer_state(layer).plan for layer in layers)
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed
    with torch.no_grad():
        merged = main_output(model(**inputs))
        # the fp32 weights folded by hand
        folded = main_output(reference(base, model, "a", arch, kinds)(**inputs))
    assert (merged - folded).abs().max().item() <= tol * max(1.0, folded.abs().max().item())
    fxadapt.unmerge(model, "a")
    assert all(layer_state(layer).plan for layer in layers)
    state = model.state_dict()
    assert max((state[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    with torch.no_grad():
        unmerged = main_output(model(**inputs))
    assert (unmerged - got).abs().max().item() <= tol * max(1.0, got.abs().max().item())

    # remove (from the loaded copy, never merged: merge/unmerge round trips only to rounding): the base model
    fxadapt.remove(fresh, "a")
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), plain)
    assert [type(m) for m in fresh.modules()] == [type(m) for m in base.modules()]
    assert fresh.state_dict().keys() == base.state_dict().keys()


def _lora_sites(arch: str) -> tuple[str, ...]:
    # gpt2: q and v are slices of the fused c_attn; also a LoRA over the whole c_attn elsewhere (test below)
    return ("attn.q", "attn.v", "ffn.up") if arch != "vit" else ("attn.q", "attn.k", "attn.v")


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_invariants(arch, tmp_path):
    config = fxadapt.LoRAConfig(sites=_lora_sites(arch), r=4, alpha=8)

    def reference(base, model, name, arch, kinds):
        return lora_reference(base, model, name, arch, kinds, scaling=8 / 4)

    check_invariants(arch, config, reference, tmp_path)


def test_rslora_dropout_and_fused_qkv(tmp_path):
    """rsLoRA scaling alpha/√r; dropout only on the LoRA input (eval: none); a LoRA over GPT-2's whole c_attn."""
    config = fxadapt.LoRAConfig(sites=("attn.qkv",), r=3, alpha=5, use_rslora=True, dropout=0.2)

    def reference(base, model, name, arch, kinds):
        return lora_reference(base, model, name, arch, kinds, scaling=5 / math.sqrt(3))

    check_invariants("gpt2", config, reference, tmp_path)


def test_lora_preset_defaults():
    config = fxadapt.methods.preset("lora")
    assert isinstance(config, fxadapt.LoRAConfig)
    assert (config.sites, config.r, config.alpha, config.init_weights) == (("attn.q", "attn.v"), 8, 8, "lora")
    assert config.scaling == 1.0 and config.composition_mode == "add"
    model = make_model("bert")
    fxadapt.inject(model, {"a": "lora"})
    params = fxadapt.adapter_parameters(model, "a")
    shapes = {k.split(".fxadapt.a.")[1]: tuple(p.shape) for k, p in params.items() if "layer.0." in k}
    assert shapes == {
        "attn_q.lora_A": (8, D),
        "attn_q.lora_B": (D, 8),
        "attn_v.lora_A": (8, D),
        "attn_v.lora_B": (D, 8),
    }
    # AdapterHub's "lora" init: A Kaiming-uniform (a=√5: bound 1/√fan_in), B zeros
    a = next(p for k, p in params.items() if k.endswith("lora_A"))
    assert 0 < a.abs().max() <= 1 / math.sqrt(D) and a.std() > 0.1 / math.sqrt(D)
    assert all(p.abs().sum() == 0 for k, p in params.items() if k.endswith("lora_B"))


@pytest.mark.parametrize(
    "init, check",
    [
        ("bert", lambda a, b: abs(a.std().item() - 0.02) < 0.01 and abs(b.std().item() - 0.02) < 0.01),
        ("gaussian", lambda a, b: abs(a.std().item() - 1 / 4) < 0.1 and b.abs().sum() == 0),
    ],
)
def test_init_weights(init, check):
    model = make_model("llama")
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(r=4, init_weights=init)})
    params = fxadapt.adapter_parameters(model, "a")
    a = torch.cat([p.flatten() for k, p in params.items() if k.endswith("lora_A")])
    b = torch.cat([p.flatten() for k, p in params.items() if k.endswith("lora_B")])
    assert check(a, b)


def test_target_modules_equal_sites(tmp_path):
    """PEFT-style names select the same projections as site kinds; suffixes and full layer paths match too."""
    base = make_model("bert")
    inputs = make_inputs("bert")
    by_kind = copy.deepcopy(base)
    fxadapt.inject(by_kind, {"a": fxadapt.LoRAConfig(sites=("attn.q", "attn.v"), r=2)})
    randomise(by_kind, "a")
    with torch.no_grad():
        expected = main_output(by_kind(**inputs))
    weights = site_weights(by_kind, "a")
    for targets in (["query", "value"], ["self.query", "attention.self.value"]):
        model = copy.deepcopy(base)
        fxadapt.inject(model, {"a": fxadapt.LoRAConfig(target_modules=targets, r=2)})
        kinds = get_state(model).adapters["a"].placements[0]
        assert set(kinds) == {"linear:attention.self.query", "linear:attention.self.value"}
        paths = get_state(model).layer_paths
        with torch.no_grad():
            for key, p in fxadapt.adapter_parameters(model, "a").items():
                layer_path, rest = key.split(".fxadapt.a.")
                site, pname = rest.split(".")
                which = "attn_q" if "query" in site else "attn_v"
                p.copy_(weights[(paths.index(layer_path), which)][pname])
            assert torch.equal(main_output(model(**inputs)), expected)
    fxadapt.save_adapter(model, tmp_path / "a", "a")
    fresh = copy.deepcopy(base)
    fxadapt.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(main_output(fresh(**inputs)), expected)


def test_dropout_acts_on_the_lora_input_in_training():
    """y = W x + s·B A dropout(x): in training the base path sees x, the LoRA path a dropped-out x."""
    from fxadapt.methods.lora import LoRA, lora_delta

    config = fxadapt.LoRAConfig(r=2, alpha=3, dropout=0.5, init_weights="bert")
    module = LoRA(8, 6, config).train()
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    got = module(x)
    torch.manual_seed(0)
    expected = lora_delta(torch.nn.functional.dropout(x, 0.5, True), module.lora_A, module.lora_B, 1.5)
    assert torch.equal(got, expected)
    assert torch.equal(module.eval()(x), lora_delta(x, module.lora_A, module.lora_B, 1.5))


def test_leave_out_and_linear_site():
    model = make_model("llama")
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=("linear:mlp.down_proj",), leave_out=(0,))})
    assert get_state(model).adapters["a"].placements == {1: ("linear:mlp.down_proj",)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_and_generate(arch):
    """With a cache (use_cache=True, generation) k/v reach attention through cache.update: LoRA on q/k/v still
    applies, and generation equals the hand-merged reference."""
    base = make_model(arch)
    model = copy.deepcopy(base)
    inputs = make_inputs(arch)
    kinds = ("attn.q", "attn.k", "attn.v")
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=kinds, r=2)})
    randomise(model, "a", std=0.5)
    ref = lora_reference(base, model, "a", arch, kinds, scaling=8 / 2)
    with torch.no_grad():
        got = model(**inputs, use_cache=True).logits
        expected = ref(**inputs, use_cache=True).logits
        assert (got - expected).abs().max().item() <= 1e-5
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, ref.generate(**inputs, max_new_tokens=4, do_sample=False))


def test_compile_no_graph_breaks():
    model = make_model("llama")
    inputs = make_inputs("llama")
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=("attn.q", "attn.v", "ffn.up"), r=4)})
    randomise(model, "a")
    with torch.no_grad():
        model(**inputs)
        torch._dynamo.reset()
        report = torch._dynamo.explain(model)(**inputs)
    assert report.graph_break_count == 0, [str(r.reason)[:200] for r in report.break_reasons]
    assert report.graph_count == 1


# -- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, r"LoRAConfig.r=0 is invalid; expected an int > 0"),
        ({"r": -3}, r"r=-3"),
        ({"r": 2.5}, r"r=2.5"),
        ({"alpha": 0}, r"LoRAConfig.alpha=0 is invalid; expected a finite number > 0"),
        ({"alpha": -1.0}, r"alpha=-1.0"),
        ({"dropout": 1.0}, r"dropout=1.0 .*\[0, 1\)"),
        ({"sites": ("attn.qq",)}, r"sites='attn.qq'.*attn.q.*did you mean 'attn.q'"),
        ({"sites": ("ffn.out",)}, r"sites='ffn.out'.*module site kinds"),
        ({"init_weights": "kaiming"}, r"init_weights='kaiming'.*'lora'"),
        ({"composition_mode": "mul"}, r"composition_mode='mul'.*\['add', 'scale'\]"),
        ({"composition_mode": "scale", "r": 4}, r"r=4 .*1 with composition_mode='scale'"),
        ({"target_modules": ["query"], "sites": ("attn.q",)}, r"no sites when target_modules"),
        ({"target_modules": []}, r"target_modules=\[\]"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(fxadapt.ConfigError, match=match) as exc:
        fxadapt.LoRAConfig(**kwargs)
    assert isinstance(exc.value, ValueError)


def test_unknown_site_kind_leaves_model_unchanged():
    model = make_model("bert")
    snap = Snapshot(model)
    with pytest.raises(fxadapt.ConfigError, match=r"'attn.qv'.*expected module site kinds \[.*'attn.v'"):
        fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=("attn.qv",))})
    snap.assert_unchanged()


def test_missing_site_and_pattern_leave_model_unchanged():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "lora"})
    randomise(model, "a")
    snap = Snapshot(model)
    with pytest.raises(
        fxadapt.SiteNotFoundError, match=r"\['ffn.gate'\] not found in the blocks \(BertLayer\) of BertModel"
    ) as exc:
        fxadapt.inject(model, {"b": fxadapt.LoRAConfig(sites=("ffn.gate",))})
    assert isinstance(exc.value, LookupError)
    snap.assert_unchanged()
    with pytest.raises(
        fxadapt.SiteNotFoundError,
        match=r"target_modules \['qeury'\] not found in BertModel; it has the module sites",
    ) as exc:
        fxadapt.inject(model, {"b": fxadapt.LoRAConfig(target_modules=["qeury", "value"])})
    for kind in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"):
        assert kind in str(exc.value)  # lists the module sites that exist
    snap.assert_unchanged()


def test_merge_not_mergeable_leaves_model_unchanged():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    snap = Snapshot(model)
    with pytest.raises(fxadapt.NotMergeableError, match=r"'a' \(bottleneck\) cannot be merged") as exc:
        fxadapt.merge(model, "a")
    assert isinstance(exc.value, TypeError)
    snap.assert_unchanged()


class _OwnForwardLinear(torch.nn.Linear):
    """An nn.Linear subclass with its own forward (as wrapper libraries write them): traced through, not a leaf."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias) * 1.0


def test_lora_on_linear_subclass_traced_through():
    """LoRA reaches the projection even where fx sees only ``F.linear(x, q_proj.weight)``: the update is
    s·B A x at that call, and merging folds it into the owner's weight."""
    from fxadapt.methods.lora import lora_delta

    base = make_model("llama")
    for layer in base.model.layers:
        old = layer.self_attn.q_proj
        new = _OwnForwardLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        layer.self_attn.q_proj = new
    inputs = make_inputs("llama")
    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": fxadapt.LoRAConfig(sites=("attn.q",), r=2, alpha=4)})
    assert set(get_state(model).adapters["a"].placements[0]) == {"attn.q"}
    randomise(model, "a")
    # reference: the same update written by hand as a forward hook on the eager base
    reference = copy.deepcopy(base)
    for i, layer in enumerate(reference.model.layers):
        lora = model.model.layers[i].fxadapt["a"]["attn_q"]
        layer.self_attn.q_proj.register_forward_hook(
            lambda m, args, out, lora=lora: out + lora_delta(args[0], lora.lora_A, lora.lora_B, 2.0)
        )
    with torch.no_grad():
        expected = main_output(reference(**inputs))
        assert (main_output(model(**inputs)) - expected).abs().max().item() <= 1e-5
        fxadapt.merge(model, "a")
        assert (main_output(model(**inputs)) - expected).abs().max().item() <= 1e-5

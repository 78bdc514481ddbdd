"""Compacter(++), invertible adapters, gated adapters and AdapterPlus (drop path) on bert, llama, gpt2, t5 and vit:
equal to the hand-written reference of ``tests/bottleneck_reference.py`` with random weights (eval, and train mode
with the same RNG for drop path), a no-op with zero up-projections, gradients on the adapter only, save → load
identical, remove bit-identical. Unions (MAM, UniPELT) equal their members injected as separate adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from bottleneck_reference import reference_model
from tiny_models import in_fp64, main_output, make_inputs, make_model

import fxadapt
from fxadapt.methods import preset

ARCHS = ["bert", "llama", "gpt2", "t5", "vit"]
CONFIGS = {
    "compacter": lambda: preset("compacter").replace(reduction_factor=8),
    "compacter_pp": lambda: preset("compacter++").replace(
        reduction_factor=8, shared_W_phm=True, factorized_phm_rule=True, phm_rank=2
    ),
    "compacter_own": lambda: preset("compacter").replace(
        reduction_factor=8, shared_phm_rule=False, factorized_phm_W=False
    ),
    "seq_bn_inv": lambda: preset("seq_bn_inv"),
    "double_seq_bn_inv": lambda: preset("double_seq_bn_inv"),
    "gated": lambda: fxadapt.BottleneckConfig(use_gating=True),
    "gated_par": lambda: preset("par_bn").replace(use_gating=True, reduction_factor=4),
    "adapterplus": lambda: preset("adapterplus").replace(reduction_factor=8, stochastic_depth=0.4),
}
TOL = 1e-12  # fp64


def _randomise(model, name, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _out(model, inputs):
    return main_output(model(**inputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_bottleneck_family(arch, tmp_path):
    """Every method as its own adapter of one model (one capture serves them all), each checked alone."""
    base = make_model(arch)
    inputs = make_inputs(arch)
    if arch == "bert":
        inputs.pop("attention_mask")  # the reference BERT layers run HF's own attention: keep one mask path
    model = copy.deepcopy(base)
    with torch.no_grad():
        plain = _out(base, inputs)
    fxadapt.inject(model, {n: make() for n, make in CONFIGS.items()}, activate=False)
    for name in CONFIGS:
        fxadapt.activate(model, name)
        params = fxadapt.adapter_parameters(model, name)

        # no-op: zero up-projections (and the invertible block's output layers) change nothing, bit for bit
        with torch.no_grad():
            for n, p in params.items():
                last = n.rsplit(".", 1)[1]
                if ".up." in n or last in ("W_up_left", "W_up_right") or n.endswith(_INV_OUT):
                    p.zero_()
            assert torch.equal(_out(model, inputs), plain), name

        # random weights: the hand-written reference
        _randomise(model, name)
        with torch.no_grad():
            assert (_out(model, inputs) - plain).abs().max().item() > 1e-3, name
        # compared in fp64, where the two orders of the same arithmetic agree far below fp32's rounding (which
        # depends on the CPU's kernels); the model goes back to fp32 exactly afterwards
        model.double()
        ref = reference_model(arch, copy.deepcopy(base).double(), model, name)
        wide = in_fp64(inputs)
        with torch.no_grad():
            got, expected = _out(model, wide), _out(ref, wide)
        assert (got - expected).abs().max().item() <= TOL, name
        if name == "adapterplus" and arch in ("bert", "llama", "gpt2"):  # drop path: same RNG, same output
            model.train(), ref.train()
            with torch.no_grad():
                torch.manual_seed(5)
                got = _out(model, wide)
                torch.manual_seed(5)
                expected = _out(ref, wide)
                torch.manual_seed(6)
                other = _out(model, wide)
            model.eval()
            assert (got - expected).abs().max().item() <= TOL
            assert (other - got).abs().max().item() > 1e-4  # the draws matter
        model.float()

        # gradients reach this adapter's parameters only (all of them)
        fxadapt.train_adapter(model, name, train_head=False)
        model.eval()
        _out(model, inputs).float().pow(2).mean().backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == set(params), name
        model.zero_grad(set_to_none=True)

        # save -> load (under another name): identical
        with torch.no_grad():
            before = _out(model, inputs)
        fxadapt.save_adapter(model, tmp_path / name, name)
        fxadapt.load_adapter(model, tmp_path / name, name="loaded")
        with torch.no_grad():
            assert torch.equal(_out(model, inputs), before), name
        fxadapt.remove(model, "loaded")

    # remove: bit-identical to the untouched model, hooks gone
    for name in CONFIGS:
        fxadapt.remove(model, name)
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), plain)
    assert "_fxadapt_hooks" not in model.__dict__ and "fxadapt" not in dict(model.named_modules())


_INV_OUT = (".F.2.weight", ".F.2.bias", ".G.2.weight", ".G.2.bias")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("union", ["mam", "unipelt"])
def test_union_equals_its_members_side_by_side(arch, union, tmp_path):
    base = make_model(arch)
    inputs = make_inputs(arch)
    config = preset(union)
    model, members = copy.deepcopy(base), copy.deepcopy(base)
    fxadapt.inject(model, {"u": config})
    names = [f"m{i}" for i in range(len(config.configs))]
    fxadapt.inject(members, dict(zip(names, config.configs)))
    _randomise(model, "u")
    ours = fxadapt.adapter_parameters(model, "u")
    theirs = {k: p for n in names for k, p in fxadapt.adapter_parameters(members, n).items()}
    with torch.no_grad():
        for key, p in theirs.items():
            member = key.split(".fxadapt.", 1)
            p.copy_(ours[f"{member[0]}.fxadapt.u.{member[1].split('.', 1)[1]}"])
    assert len(theirs) == len(ours)
    with torch.no_grad():
        got, expected, plain = _out(model, inputs), _out(members, inputs), _out(base, inputs)
    assert (got - plain).abs().max().item() > 1e-3
    assert torch.equal(got, expected)
    with pytest.raises(fxadapt.NotMergeableError, match=r"its prefix_tuning member"):
        fxadapt.merge(model, "u")
    fxadapt.save_adapter(model, tmp_path / "u", "u")
    fxadapt.eject_prefix(model, "u")  # members that can eject do
    assert fxadapt.list_adapters(model)["u"].configs[0].flat
    with torch.no_grad():
        assert (_out(model, inputs) - got).abs().max().item() <= TOL
    fxadapt.remove(model, "u")
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), plain)
    fxadapt.load_adapter(model, tmp_path / "u")
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), got)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_composition_of_the_new_options(arch):
    """Parallel, BatchSplit and PerRow route rows to each adapter exactly as that adapter alone; Fuse, Split and
    Average compose Compacter and gated adapters (AdapterHub's bottleneck blocks, all of them)."""
    base = make_model(arch)
    inputs = make_inputs(arch, batch=2)
    model = copy.deepcopy(base)
    names = {"c": CONFIGS["compacter_pp"](), "g": CONFIGS["gated"](), "p": CONFIGS["adapterplus"]()}
    fxadapt.inject(model, names, activate=False)
    for n in names:
        _randomise(model, n, seed=len(n) + ord(n))
    with torch.no_grad():
        alone = {}
        for n in names:
            fxadapt.activate(model, n)
            alone[n] = _out(model, inputs)
        fxadapt.activate(model, fxadapt.Parallel("c", "g"))
        par = _out(model, inputs)
        assert torch.allclose(par[:2], alone["c"], atol=TOL) and torch.allclose(par[2:], alone["g"], atol=TOL)
        # (AdapterHub's BatchSplit and PerRow apply one structure to all rows: adapters of one structure here)
        fxadapt.activate(model, fxadapt.BatchSplit("g", "c", batch_sizes=[1, 1]))
        split = _out(model, inputs)
        assert torch.allclose(split[:1], alone["g"][:1], atol=TOL)
        assert torch.allclose(split[1:], alone["c"][1:], atol=TOL)
        fxadapt.activate(model, fxadapt.PerRow("c", "g"))
        with fxadapt.adapter_ids(model, torch.tensor([1, 0])):
            rows = _out(model, inputs)
        assert torch.allclose(rows[0], alone["g"][0], atol=TOL) and torch.allclose(
            rows[1], alone["c"][1], atol=TOL
        )
        fuse = fxadapt.add_fusion(model, ["c", "g"])
        seq = inputs["input_ids"].shape[1]
        for setup in (fuse, fxadapt.Average("c", "g", "p"), fxadapt.Split("c", "g", splits=[3, seq - 3])):
            fxadapt.activate(model, setup)
            out = _out(model, inputs)
            assert torch.isfinite(out).all() and not torch.allclose(out, alone["c"], atol=1e-4), setup


def test_what_stays_unsupported_is_named():
    with pytest.raises(
        fxadapt.ConfigError, match=r"inv_adapter='glow' is not supported: AdapterHub 1.3.0's GLOW"
    ):
        fxadapt.BottleneckConfig(inv_adapter="glow", inv_adapter_reduction_factor=2)
    with pytest.raises(
        fxadapt.ConfigError, match=r"phm_layer=True, init_weights='houlsby'\) is not supported"
    ):
        fxadapt.BottleneckConfig(phm_layer=True, init_weights="houlsby")
    with pytest.raises(fxadapt.ConfigError, match=r"both bottleneck adapters at the same places"):
        fxadapt.ConfigUnion(configs=(preset("seq_bn"), preset("par_bn")))
    with pytest.raises(fxadapt.ConfigError, match=r"cannot be unions themselves"):
        fxadapt.ConfigUnion(configs=(preset("mam"),))
    model = make_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxadapt.ConfigError, match=r"width 1 .* must both be multiples of phm_dim"):
        fxadapt.inject(model, {"c": "compacter"})  # hidden 32 / 32 = 1
    assert fxadapt.list_adapters(model) == {} and set(model.state_dict()) == set(before)
    fxadapt.inject(model, {"u": "mam", "b": "seq_bn"}, activate=False)
    with pytest.raises(fxadapt.CompositionError, match=r"prefix_tuning adapters support only Stack"):
        fxadapt.activate(model, fxadapt.Parallel("u", "b"))
    with pytest.raises(
        fxadapt.NotMergeableError, match=r"'u' \(union\) cannot be merged .*its prefix_tuning member"
    ):
        fxadapt.merge(model, "u")

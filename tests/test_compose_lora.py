"""LoRA and (IA)^3 composition (AdapterHub's LoRALayer semantics) against an independent interpreter hooked onto
the projections of an untouched model: Stack is a product (Wx + s₂B₂A₂(s₁B₁A₁x)), scales multiply."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt import Average, BatchSplit, Parallel, Stack
from fxadapt.model import get_state, layers_of


def _interpret(setup, x, adapters, scale_mode):
    """The composed update at one projection for input rows ``x`` (None when nothing applies)."""

    def run(s, x, hidden):
        if isinstance(s, str):
            if s not in adapters:
                return hidden
            a = adapters[s]
            if scale_mode:
                vec = a["B"].view(-1) * a["s"]
                ones = torch.ones(*x.shape[:-1], vec.shape[0])
                return (ones if hidden is None else hidden) * vec
            src = x if hidden is None else hidden
            return F.linear(F.linear(src, a["A"]), a["B"]) * a["s"]
        if isinstance(s, Stack):
            for c in s.children:
                hidden = run(c, x, hidden)
            return hidden
        if isinstance(s, Average):
            parts = [(run(c, x, hidden), w) for c, w in zip(s.children, s.weights)]
            parts = [(p, w) for p, w in parts if p is not None]
            return torch.stack([p * w for p, w in parts]).mean(0)
        if isinstance(s, (BatchSplit, Parallel)):
            n = x.shape[0]
            sizes = (
                list(s.batch_sizes) if isinstance(s, BatchSplit) else [n // len(s.children)] * len(s.children)
            )
            out, start = [], 0
            for c, size in zip(s.children, sizes):
                part = run(
                    c, x[start : start + size], None if hidden is None else hidden[start : start + size]
                )
                out.append(
                    part
                    if part is not None
                    else (torch.ones if scale_mode else torch.zeros)(
                        size, *x.shape[1:-1], next(iter(adapters.values()))["B"].shape[0]
                    )
                )
                start += size
            return torch.cat(out)
        raise AssertionError(s)

    return run(setup, x, None)


def _reference(base, model, setup, inputs, scale_mode):
    ref = copy.deepcopy(base)
    state = get_state(model)
    handles = []
    for path, layer in zip(*layers_of(model)):
        sites = {}
        for name in setup.names():
            record = state.adapters[name]
            for (index, kind), site in record.sites.items():
                if state.layer_paths[index] == path:
                    m = layer.fxadapt[name][kind.replace(".", "_")]
                    sites.setdefault(site.module, {})[name] = {
                        "A": getattr(m, "lora_A", None),
                        "B": m.lora_B.detach(),
                        "s": m.scaling,
                    }
        for module_path, adapters in sites.items():

            def hook(mod, args, out, adapters=adapters):
                delta = _interpret(setup, args[0], adapters, scale_mode)
                if delta is None:
                    return out
                return out * delta if scale_mode else out + delta

            handles.append(ref.get_submodule(f"{path}.{module_path}").register_forward_hook(hook))
    n = fxadapt.compose.parallel_channels(setup)
    if n > 1:
        inputs = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in inputs.items()}
    with torch.no_grad():
        out = main_output(ref(**inputs))
    for h in handles:
        h.remove()
    return out


SETUPS = [
    Stack("a", "b"),
    Stack("b", "a", "c"),
    Parallel("a", "b"),
    BatchSplit("a", Stack("b", "c"), batch_sizes=[1, 1]),
    Average("a", "b", weights=[0.3, 0.7]),
    Stack("a", Average("b", "c")),
    Parallel(Stack("a", "b"), "c"),
]


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_composition_matches_interpreter(arch, kind):
    base = make_model(arch)
    model = copy.deepcopy(base)
    config = fxadapt.LoRAConfig(sites=("attn.q", "attn.o"), r=4, alpha=8) if kind == "lora" else "ia3"
    fxadapt.inject(model, {n: config for n in "abc"}, activate=False)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for n in "abc":
            for p in fxadapt.adapter_parameters(model, n).values():
                p.copy_(
                    1 + 0.3 * torch.randn(p.shape, generator=gen)
                    if kind == "ia3"
                    else 0.3 * torch.randn(p.shape, generator=gen)
                )
    inputs = make_inputs(arch)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    for setup in SETUPS:
        fxadapt.activate(model, setup)
        with torch.no_grad():
            got = main_output(model(**inputs))
        expected = _reference(base, model, setup, inputs, kind == "ia3")
        assert got.shape == expected.shape, setup
        assert (got - expected).abs().max().item() <= 1e-5, setup


def test_stacked_lora_needs_square_projections():
    model = make_model("bert")
    fxadapt.inject(model, {n: fxadapt.LoRAConfig(sites=("ffn.up",)) for n in "ab"}, activate=False)
    with pytest.raises(fxadapt.CompositionError, match=r"Stack of LoRA adapters at 'ffn.up' \(32 -> 48"):
        fxadapt.activate(model, Stack("a", "b"))
    assert fxadapt.active_setup(model) is None
    fxadapt.activate(model, Average("a", "b"))  # no product: fine

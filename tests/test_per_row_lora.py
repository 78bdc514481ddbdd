"""Per-row LoRA and (IA)^3 (PerRow at projections): each row equals that row run alone with its adapter, equals
PEFT's mixed-batch forward (LoRA) / PEFT run row by row ((IA)^3) with the same weights, and the lowered
``lora_multi`` path (Triton forced, interpreter) equals the reference path."""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_fp64_equal, fp64, in_fp64, main_output, make_inputs, make_model

import fxadapt
from fxadapt import PerRow

peft = pytest.importorskip("peft")

NAMES = ("x", "y", "z")
IDS = torch.tensor([2, -1, 0, 1, 2])
CONFIGS = {
    "lora": (
        fxadapt.LoRAConfig(r=4, alpha=8),
        fxadapt.LoRAConfig(r=8, alpha=4, sites=("attn.q", "attn.v", "attn.k")),
        fxadapt.LoRAConfig(r=2, alpha=2, use_rslora=True),
    ),
    "ia3": (fxadapt.IA3Config(), fxadapt.IA3Config(sites=("attn.v",)), fxadapt.IA3Config(alpha=2)),
    "mixed": (
        fxadapt.LoRAConfig(r=4, sites=("attn.v", "ffn.up")),
        fxadapt.IA3Config(),
        fxadapt.LoRAConfig(r=6),
    ),
}


def _model(arch, kind, seed=4):
    model = make_model(arch)
    fxadapt.inject(model, dict(zip(NAMES, CONFIGS[kind])), activate=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in NAMES:
            for p in fxadapt.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.shape[-1] == 1 else 0.0))
    return model


def _alone(model, inputs, ids):
    out = []
    for row, i in enumerate(ids.tolist()):
        fxadapt.activate(model, None if i < 0 else NAMES[i])
        out.append(main_output(model(**{k: v[row : row + 1] for k, v in inputs.items()})))
    return torch.cat(out)


@pytest.mark.parametrize(
    "arch, kind",  # gpt2: a fused, transposed (Conv1D) projection whose q/k/v slices are the sites
    [("bert", "lora"), ("llama", "ia3"), ("llama", "mixed"), ("gpt2", "mixed")],
)
def test_per_row_equals_each_row_alone(arch, kind):
    model = _model(arch, kind)
    inputs = in_fp64(make_inputs(arch, batch=len(IDS)))
    with torch.no_grad(), fp64(model):  # a batch of 5 vs batches of 1: fp32 rounding differs by shape
        fxadapt.activate(model, PerRow(*NAMES))
        got = main_output(model(**inputs, adapter_ids=IDS))
        expected = _alone(model, inputs, IDS)
    assert_fp64_equal(got, expected, (arch, kind))


def test_per_row_gradients_are_the_rows_gradients():
    model = _model("llama", "mixed")
    inputs = make_inputs("llama", batch=len(IDS))
    params = {n: fxadapt.adapter_parameters(model, n) for n in NAMES}
    fxadapt.activate(model, PerRow(*NAMES))
    main_output(model(**inputs, adapter_ids=IDS)).pow(2).sum().backward()
    got = {(n, k): p.grad.clone() for n in NAMES for k, p in params[n].items()}
    model.zero_grad()
    for row, i in enumerate(IDS.tolist()):
        fxadapt.activate(model, None if i < 0 else NAMES[i])
        main_output(model(**{k: v[row : row + 1] for k, v in inputs.items()})).pow(2).sum().backward()
    for (n, k), g in got.items():
        assert torch.allclose(g, params[n][k].grad, atol=1e-5, rtol=1e-4), (n, k)


def test_banks_follow_weight_updates():
    model = _model("bert", "lora")
    inputs = in_fp64(make_inputs("bert", batch=len(IDS)))
    fxadapt.activate(model, PerRow(*NAMES))
    with torch.no_grad(), fp64(model):
        model(**inputs, adapter_ids=IDS)
        for p in fxadapt.adapter_parameters(model, "z").values():
            p.mul_(-2.0)  # in place: the cached bank must notice
        got = main_output(model(**inputs, adapter_ids=IDS))
        assert_fp64_equal(got, _alone(model, inputs, IDS))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_per_row_lora_equals_peft_mixed_batch(arch, tmp_path):
    targets = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj", "up_proj"]}[arch]
    base = make_model(arch)
    pm = peft.get_peft_model(
        make_model(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="a"
    )
    pm.add_adapter("b", peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets[:1], use_rslora=True))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval().save_pretrained(tmp_path)  # non-default adapters: tmp_path/<name>
    fxadapt.load_adapter(base, tmp_path / "a", name="a", activate=False)
    fxadapt.load_adapter(base, tmp_path / "b", name="b", activate=False)
    inputs = make_inputs(arch, batch=4)
    with torch.no_grad():
        theirs = main_output(pm(**inputs, adapter_names=["a", "__base__", "b", "a"]))
        with fxadapt.using(base, PerRow("a", "b")):
            ours = main_output(base(**inputs, adapter_ids=[0, -1, 1, 0]))
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_per_row_ia3_equals_peft_row_by_row(tmp_path):
    targets, ff = ["key", "value", "intermediate.dense"], ["intermediate.dense"]
    base = make_model("bert")
    pm = peft.get_peft_model(
        make_model("bert"),
        peft.IA3Config(target_modules=targets, feedforward_modules=[]),
        adapter_name="a",
    )
    pm.add_adapter("b", peft.IA3Config(target_modules=targets[1:2], feedforward_modules=[]))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval().save_pretrained(tmp_path)
    fxadapt.load_adapter(base, tmp_path / "a", name="a", activate=False)
    fxadapt.load_adapter(base, tmp_path / "b", name="b", activate=False)
    assert ff  # PEFT has no mixed-batch forward for (IA)^3: run it row by row
    inputs = make_inputs("bert", batch=4)
    ids = [1, 0, -1, 1]
    with torch.no_grad():
        rows = []
        for row, i in enumerate(ids):
            one = {k: v[row : row + 1] for k, v in inputs.items()}
            if i < 0:
                with pm.disable_adapter():
                    rows.append(main_output(pm(**one)))
            else:
                pm.set_adapter("ab"[i])
                rows.append(main_output(pm(**one)))
        with fxadapt.using(base, PerRow("a", "b")):
            ours = main_output(base(**inputs, adapter_ids=ids))
    assert (ours - torch.cat(rows)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["bert"])  # the interpreter is slow: one model (gpu tier: LLaMA on CUDA)
def test_lowered_lora_multi_equals_reference(arch):
    from fxadapt.kernels import force_triton

    model = _model(arch, "lora")
    inputs = make_inputs(arch, batch=len(IDS))
    with torch.no_grad():
        with fxadapt.using(model, PerRow(*NAMES)):
            reference = main_output(model(**inputs, adapter_ids=IDS))
        with force_triton(), fxadapt.using(model, PerRow(*NAMES)):
            fused = main_output(model(**inputs, adapter_ids=IDS))
            notes = fxadapt.explain(model).layers[0].kernels
    assert any("lowered to fxadapt.kernels.lora_multi" in n for n in notes), notes
    assert (fused - reference).abs().max().item() <= 1e-5


def test_mixed_site_is_not_lowered_and_says_why():
    from fxadapt.kernels import force_triton

    model = _model("bert", "mixed")
    inputs = make_inputs("bert", batch=len(IDS))
    with torch.no_grad(), force_triton(), fxadapt.using(model, PerRow(*NAMES)):
        model(**inputs, adapter_ids=IDS)
        notes = fxadapt.explain(model).layers[0].kernels
    assert any("(IA)^3 scales are not part of the fused LoRA kernel" in n for n in notes), notes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_row_lora_on_cuda_lowered_equals_reference(dtype):
    """On a GPU the default backend lowers per-row LoRA to lora_multi; it must equal the reference backend."""
    from fxadapt.kernels import backend

    model = _model("llama", "lora").to("cuda", dtype)
    inputs = {k: v.cuda() for k, v in make_inputs("llama", batch=len(IDS)).items()}
    with torch.no_grad():
        with fxadapt.using(model, PerRow(*NAMES)):
            fused = main_output(model(**inputs, adapter_ids=IDS)).float()
            notes = fxadapt.install.layer_state(model.model.layers[0]).notes
        with backend("reference"), fxadapt.using(model, PerRow(*NAMES)):
            reference = main_output(model(**inputs, adapter_ids=IDS)).float()
    assert any("lowered to fxadapt.kernels.lora_multi" in n for n in notes), notes
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # TF32 tl.dot / bf16 rounding (docs/kernels.md tolerances)
    torch.testing.assert_close(fused, reference, rtol=tol, atol=tol)

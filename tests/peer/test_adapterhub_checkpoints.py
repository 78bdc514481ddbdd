"""AdapterHub checkpoints both ways, side by side with ``adapters`` 1.3.0 (transformers 4.57.6, run in .venv-peer).

An adapter made and trained with ``adapters`` and saved with ``model.save_adapter`` loads with
``fxadapt.load_adapter`` into the same base weights with equal outputs; an fxadapt adapter saved with
``format="adapterhub"`` loads with ``adapters``' ``load_adapter`` with equal outputs. Also AdapterFusion
(``save_adapter_fusion`` / ``load_adapter_fusion``) and prediction heads.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from adapters import composition as ah  # noqa: E402
from tiny_models import main_output, make_config, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.formats.adapterhub import STATIC_HEADS  # noqa: E402

pytestmark = pytest.mark.peer


def _train(model, inputs, names, steps=2):
    """Randomise the adapter weights, then a few SGD steps on random targets (``adapters``' own training mode)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(f".{name}." in n for name in names):
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train_adapter(names[0]) if len(names) == 1 else model.train_adapter_fusion(ah.Fuse(*names))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        out = main_output(model(**inputs))
        loss = (out - torch.randn(out.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _max_diff(a, b, inputs):
    with torch.no_grad():
        return (main_output(a(**inputs)) - main_output(b(**inputs))).abs().max().item()


def _perturb(model, name):
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape) * 0.05)


CASES = [(a, p) for a in ("bert", "roberta") for p in ("seq_bn", "double_seq_bn", "par_bn", "lora", "ia3")]
# other families: keys located through each layer's graph (containers on the layer, T5's sublayers, GPT-2's fused
# c_attn); T5's q/k/v are plain Linear sites on transformers 4.57 (no attention role found), so AdapterHub cannot
# take its LoRA back
CASES += [(a, p) for a in ("distilbert", "gpt2", "llama", "bart", "vit") for p in ("double_seq_bn", "lora")]
CASES += [("t5", "double_seq_bn"), ("t5", "ia3")]


@pytest.mark.parametrize("arch, preset", CASES)
def test_adapter_checkpoint_both_ways(arch, preset, tmp_path):
    base = make_model(arch)
    inputs = make_inputs(arch)
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("a", config=preset)
    _train(theirs, inputs, ["a"])
    theirs.save_adapter(tmp_path / "theirs", "a")

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "a"
    assert _max_diff(ours, base, inputs) > 1e-4  # the adapter does something
    assert _max_diff(ours, theirs, inputs) <= 1e-5
    if arch == "t5" and preset != "double_seq_bn":
        return

    _perturb(ours, "a")
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub")
    back = copy.deepcopy(base)
    adapters.init(back)
    assert back.load_adapter(str(tmp_path / "ours")) == "a"
    back.set_active_adapters("a")
    assert _max_diff(ours, back.eval(), inputs) <= 1e-5


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_fusion_checkpoint_both_ways(arch, tmp_path):
    base = make_model(arch)
    inputs = make_inputs(arch)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    for name in "ab":
        theirs.add_adapter(name, config="seq_bn")
    theirs.add_adapter_fusion(ah.Fuse("a", "b"))
    _train(theirs, inputs, ["a", "b"])
    for name in "ab":
        theirs.save_adapter(tmp_path / name, name)
    theirs.save_adapter_fusion(tmp_path / "ab", "a,b")

    ours = copy.deepcopy(base)
    for name in "ab":
        fxadapt.load_adapter(ours, tmp_path / name, activate=False)
    fuse = fxadapt.load_adapter_fusion(ours, tmp_path / "ab", activate=True)
    assert fuse == fxadapt.Fuse("a", "b")
    assert _max_diff(ours, theirs, inputs) <= 1e-5

    with torch.no_grad():
        for p in fxadapt.fusion_parameters(ours, fuse).values():
            p.add_(torch.randn(p.shape) * 0.05)
    for name in "ab":
        fxadapt.save_adapter(ours, tmp_path / f"ours-{name}", name, format="adapterhub")
    fxadapt.save_adapter_fusion(ours, tmp_path / "ours-ab", fuse)
    back = copy.deepcopy(base)
    adapters.init(back)
    for name in "ab":
        back.load_adapter(str(tmp_path / f"ours-{name}"))
    back.load_adapter_fusion(str(tmp_path / "ours-ab"))
    back.set_active_adapters(ah.Fuse("a", "b"))
    assert _max_diff(ours, back.eval(), inputs) <= 1e-5


def test_static_head_both_ways(tmp_path):
    """``adapters.init`` on an HF model with a head saves that head under its own names (``classifier.*``)."""
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    inputs = make_inputs("bert")
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("a", config="seq_bn")
    _train(theirs, inputs, ["a"])
    with torch.no_grad():
        theirs.classifier.weight.add_(torch.randn(theirs.classifier.weight.shape) * 0.2)
    theirs.save_adapter(tmp_path / "theirs", "a", with_head=True)
    ours = copy.deepcopy(base)
    fxadapt.load_adapter(ours, tmp_path / "theirs")
    assert _max_diff(ours, theirs, inputs) <= 1e-5

    with torch.no_grad():
        ours.classifier.bias.add_(0.3)
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub", with_head=True)
    back = copy.deepcopy(base)
    adapters.init(back)
    back.load_adapter(str(tmp_path / "ours"))
    back.set_active_adapters("a")
    assert _max_diff(ours, back.eval(), inputs) <= 1e-5


def test_flex_head_into_hf_head():
    """AdapterHub's own classification head (Dropout, Linear, tanh, Dropout, Linear on the first token) equals
    RobertaForSequenceClassification's head: it loads there; BERT's has none (see test_formats_hub.py)."""
    import tempfile

    torch.manual_seed(0)
    config = make_config("roberta", num_labels=3)
    theirs = adapters.RobertaAdapterModel(config)
    theirs.add_adapter("a", config="seq_bn")
    theirs.add_classification_head("a", num_labels=3)
    inputs = make_inputs("roberta")
    _train(theirs, inputs, ["a"])
    ours = tf.RobertaForSequenceClassification(config).eval()
    ours.roberta.load_state_dict(theirs.roberta.state_dict(), strict=False)  # the same base weights
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_adapter(folder, "a")
        fxadapt.load_adapter(ours, folder)
    with torch.no_grad():
        assert (ours(**inputs).logits - theirs(**inputs).logits).abs().max().item() <= 1e-5


def test_head_table_agrees_with_adapters():
    """STATIC_HEADS restates rows of adapters' STATIC_TO_FLEX_HEAD_MAP; they must agree."""
    from adapters.head_utils import STATIC_TO_FLEX_HEAD_MAP

    for cls, (head_type, layers, activation, pooler, modules) in STATIC_HEADS.items():
        row = STATIC_TO_FLEX_HEAD_MAP[cls]
        assert (row["config"]["head_type"], row["config"]["layers"]) == (head_type, layers), cls
        assert bool(row["config"].get("use_pooler")) == pooler, cls
        if layers > 1:
            assert row["config"]["activation_function"] == activation, cls
        assert {i: m for i, m in enumerate(row["layers"]) if m is not None and m != "dropout"} == modules, cls

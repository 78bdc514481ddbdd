"""PEFT checkpoints both ways (same venv): ``PeftModel.save_pretrained`` → ``fxadapt.load_adapter`` and
``fxadapt.save_adapter(format="peft")`` → ``PeftModel.from_pretrained``, outputs equal within 1e-5; and the typed
errors that leave the model unchanged."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import transformers as tf
from test_errors import Snapshot
from tiny_models import main_output, make_config, make_inputs, make_model

import fxadapt

peft = pytest.importorskip("peft")

LORA_TARGETS = {"bert": ["query", "value", "intermediate.dense"], "llama": ["q_proj", "v_proj", "up_proj"]}
IA3_TARGETS = {"bert": ["key", "value", "intermediate.dense"], "llama": ["k_proj", "v_proj", "up_proj"]}


def _trained(model, inputs, steps=3):
    """A few optimizer steps on random targets, so both A and B (or the (IA)^3 vectors) move."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        out = main_output(model(**inputs))
        loss = (out - torch.randn_like(out)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _max_diff(a, b, inputs):
    with torch.no_grad():
        return (main_output(a(**inputs)) - main_output(b(**inputs))).abs().max().item()


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_checkpoint_both_ways(arch, method, tmp_path):
    base = make_model(arch, attention_dropout=0.0) if arch == "llama" else make_model(arch)
    inputs = make_inputs(arch)
    if method == "lora":
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch], use_rslora=arch == "llama"
        )
    else:
        config = peft.IA3Config(target_modules=IA3_TARGETS[arch], feedforward_modules=[])
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    _trained(peft_model, inputs)
    if method == "ia3":  # a few SGD steps barely move (IA)^3's vectors from ones
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "ia3_l" in n:
                    p.add_(torch.randn(p.shape) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")

    model = copy.deepcopy(base)
    assert fxadapt.load_adapter(model, tmp_path / "peft") == "default"
    loaded = fxadapt.list_adapters(model)["default"]
    assert type(loaded) is (fxadapt.LoRAConfig if method == "lora" else fxadapt.IA3Config)
    assert len(loaded.sites) == 3
    assert _max_diff(model, base, inputs) > 1e-3  # the adapter does something
    assert _max_diff(model, peft_model, inputs) <= 1e-5

    # back: fxadapt -> PEFT folder -> PeftModel
    with torch.no_grad():  # move away from what PEFT saved, so the check is not vacuous
        for p in fxadapt.adapter_parameters(model, "default").values():
            p.add_(torch.randn(p.shape) * 0.1)
    fxadapt.save_adapter(model, tmp_path / "back", "default", format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back").eval()
    assert _max_diff(model, reloaded, inputs) <= 1e-5


def test_gpt2_conv1d_and_head(tmp_path):
    """GPT-2's Conv1D ``c_attn`` (whole: ``attn.qkv``) and a ``modules_to_save`` classifier, both ways."""
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    inputs = make_inputs("bert")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    peft_model = _trained(peft.get_peft_model(copy.deepcopy(base), config), inputs)
    peft_model.save_pretrained(tmp_path / "clf")
    model = copy.deepcopy(base)
    fxadapt.load_adapter(model, tmp_path / "clf")
    assert _max_diff(model, peft_model, inputs) <= 1e-5
    assert not torch.equal(model.classifier.weight, base.classifier.weight)  # the head came along
    fxadapt.save_adapter(model, tmp_path / "clf-back", "default", format="peft", with_head=True)
    meta = json.loads((tmp_path / "clf-back" / "adapter_config.json").read_text())
    assert meta["modules_to_save"] == ["classifier"]
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "clf-back").eval()
    assert _max_diff(model, reloaded, inputs) <= 1e-5

    gpt2 = make_model("gpt2")
    g_inputs = make_inputs("gpt2")
    peft_model = _trained(
        peft.get_peft_model(copy.deepcopy(gpt2), peft.LoraConfig(r=2, target_modules=["c_attn"])), g_inputs
    )
    peft_model.save_pretrained(tmp_path / "gpt2")
    model = copy.deepcopy(gpt2)
    fxadapt.load_adapter(model, tmp_path / "gpt2", name="g")
    assert fxadapt.list_adapters(model)["g"].sites == ("attn.qkv",)
    assert _max_diff(model, peft_model, g_inputs) <= 1e-5
    fxadapt.save_adapter(model, tmp_path / "gpt2-back", "g", format="peft")
    assert json.loads((tmp_path / "gpt2-back" / "adapter_config.json").read_text())["fan_in_fan_out"]
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "gpt2-back").eval()
    assert _max_diff(model, reloaded, g_inputs) <= 1e-5


def _save_peft(model, config, folder):
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "config, match",
    [
        (
            lambda: peft.VeraConfig(target_modules=["query"], r=4, save_projection=False),
            r"save_projection=False",
        ),
        (lambda: peft.LoraConfig(target_modules=["query"], bias="all"), r"bias='all' is not supported"),
        (
            lambda: peft.LoraConfig(target_modules=["word_embeddings"]),
            r"map to no site of BertModel.*word_embeddings",
        ),
        (lambda: peft.LoHaConfig(target_modules=["query"]), r"peft_type='LOHA' is not supported"),
    ],
    ids=["vera-without-projections", "lora-bias", "embedding", "loha"],
)
def test_unsupported_peft_checkpoints(config, match, tmp_path):
    model = make_model("bert")
    folder = _save_peft(model, config(), tmp_path / "p")
    snap = Snapshot(model)
    with pytest.raises(fxadapt.CheckpointError, match=match):
        fxadapt.load_adapter(model, folder)
    snap.assert_unchanged()


def test_other_hidden_size_and_missing_weights(tmp_path):
    folder = _save_peft(make_model("bert"), peft.LoraConfig(target_modules=["query"]), tmp_path / "p")
    wider = make_model("bert", hidden_size=48, intermediate_size=64)
    snap = Snapshot(wider)
    with pytest.raises(
        fxadapt.CheckpointError, match=r"has shape \(8, 32\) in PEFT adapter .* but \(8, 48\)"
    ):
        fxadapt.load_adapter(wider, folder)
    snap.assert_unchanged()
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(fxadapt.CheckpointError, match=r"missing weight file .*adapter_model.safetensors"):
        fxadapt.load_adapter(wider, folder)
    snap.assert_unchanged()


class Payload:
    """Unpickling this calls ``print``: code a weights_only load must never run."""

    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    folder = _save_peft(make_model("bert"), peft.LoraConfig(target_modules=["query"]), tmp_path / "p")
    (folder / "adapter_model.safetensors").unlink()
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x.lora_A.weight": Payload()}, f)
    model = make_model("bert")
    snap = Snapshot(model)
    with pytest.raises(
        fxadapt.CheckpointError, match=r"refusing to load .*adapter_model\.bin.*arbitrary code"
    ):
        fxadapt.load_adapter(model, folder)
    assert "arbitrary code ran" not in capsys.readouterr().out
    snap.assert_unchanged()


def test_writer_refuses_a_slice_of_a_fused_projection(tmp_path):
    model = make_model("gpt2")
    fxadapt.inject(model, {"a": "lora"})  # attn.q / attn.v: slices of c_attn
    with pytest.raises(
        fxadapt.CheckpointError, match=r"slice of the fused projection '.*attn.c_attn'.*attn.qkv"
    ):
        fxadapt.save_adapter(model, tmp_path / "x", "a", format="peft")
    with pytest.raises(fxadapt.ConfigError, match=r"unknown format 'pft'.*did you mean 'peft'"):
        fxadapt.save_adapter(model, tmp_path / "x", "a", format="pft")

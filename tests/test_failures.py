"""Helpers that used to lose data on failure, and edge inputs that used to raise untyped errors.

Each test asserts the typed error *and* that the model (weights, buffers, classes, adapters, setup, heads, outputs)
and the checkpoint on disk are exactly as they were.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from state_helpers import ModelSnapshot, files_of
from tiny_models import make_config, make_inputs, make_model

import fxadapt
from fxadapt.compat import AdapterModel


def _randomise(model, name, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _compat_model():
    torch.manual_seed(0)
    model = AdapterModel(tf.BertModel(make_config("bert")))
    model.add_adapter("a", config="seq_bn", set_active=True)
    model.add_classification_head("a", num_labels=2)
    _randomise(model, "a")
    with torch.no_grad():
        for p in model.heads["a"].parameters():
            p.normal_()
    return model.eval()


# -- item 5: helpers that lose data on failure ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, error",
    [
        ("no_such_method", fxadapt.ConfigError),
        (fxadapt.LoRAConfig(target_modules=["nonexistent_proj"]), fxadapt.SiteNotFoundError),
    ],
)
def test_compat_add_adapter_overwrite_keeps_trained_adapter_on_failure(config, error):
    model = _compat_model()
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(error):
        model.add_adapter("a", config=config, overwrite_ok=True)
    snap.assert_unchanged()
    model.add_adapter("a", config="double_seq_bn", overwrite_ok=True)  # a valid overwrite replaces it
    assert fxadapt.list_adapters(model)["a"] == fxadapt.BottleneckConfig(
        sites=("attn.out", "ffn.out"), non_linearity="swish", original_ln_before=False
    )
    assert all(k.count(".fxadapt.a.") for k in fxadapt.adapter_parameters(model, "a"))


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_compat_load_adapter_with_corrupt_head_keeps_existing_head(tmp_path, damage):
    saved = _compat_model()
    saved.save_adapter(tmp_path / "a", "a")
    if damage == "weights":
        path = tmp_path / "a" / "head_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    else:
        meta = json.loads((tmp_path / "a" / "head_config.json").read_text())
        meta["config"]["head_type"] = "no_such_head"
        (tmp_path / "a" / "head_config.json").write_text(json.dumps(meta))
    files = files_of(tmp_path / "a")
    model = _compat_model()  # has its own trained head "a"
    model.delete_adapter("a")
    model.add_classification_head("a", num_labels=2)
    with torch.no_grad():
        for p in model.heads["a"].parameters():
            p.uniform_()
    snap = ModelSnapshot(model, {**make_inputs("bert"), "head": "a"})
    with pytest.raises(fxadapt.CheckpointError, match="head"):
        model.load_adapter(tmp_path / "a")
    snap.assert_unchanged()
    assert files_of(tmp_path / "a") == files
    assert "a" not in fxadapt.list_adapters(model)


def test_adapter_trainer_resume_from_mismatched_checkpoint(tmp_path):
    from fxadapt.trainer import AdapterTrainer

    def trainer_for(config):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(make_config("bert", num_labels=2)).eval()
        fxadapt.inject(model, {"a": config})
        fxadapt.train_adapter(model, "a")
        model.eval()  # (deterministic outputs for the snapshot)
        _randomise(model, "a")
        args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
        return AdapterTrainer(model=model, args=args), model

    saver, _ = trainer_for("seq_bn")
    saver._save(str(tmp_path / "ckpt"))
    files = files_of(tmp_path / "ckpt")
    trainer, model = trainer_for(fxadapt.BottleneckConfig(reduction_factor=4))
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(fxadapt.CheckpointError, match=r"has shape .*another config"):
        trainer._load_from_checkpoint(str(tmp_path / "ckpt"))
    snap.assert_unchanged()
    assert files_of(tmp_path / "ckpt") == files


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_merge_restores_every_weight(monkeypatch, interrupt):
    from fxadapt.methods.lora import LoRAMethod

    model = make_model("llama")
    fxadapt.inject(
        model, {"l": fxadapt.LoRAConfig(sites=("attn.q", "attn.v", "ffn.up"), init_weights="bert")}
    )
    snap = ModelSnapshot(model, make_inputs("llama"))
    calls = []
    real = LoRAMethod.merge

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # half way through the 6 sites
            raise interrupt("interrupted")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LoRAMethod, "merge", flaky)
    with pytest.raises(interrupt, match="interrupted"):
        fxadapt.merge(model, "l")
    snap.assert_unchanged()
    assert fxadapt.model.get_state(model).adapters["l"].merged is False
    monkeypatch.setattr(LoRAMethod, "merge", real)
    fxadapt.merge(model, "l")  # and a merge that completes still equals the unmerged forward
    with torch.no_grad():
        merged = model(**snap.inputs).logits
    assert (merged - snap.output).abs().max().item() < 1e-5


def _parallel_model():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn", "b": "seq_bn"}, activate=False)
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    return model


@pytest.mark.parametrize(
    "setup, fmt", [("parallel", "fxadapt"), ("fuse", "fxadapt"), ("parallel", "adapterhub"), ("fuse", "peft")]
)
def test_failed_load_keeps_parallel_or_fuse_setup(tmp_path, setup, fmt):
    source = make_model("bert")
    fxadapt.inject(source, {"c": "lora" if fmt == "peft" else "seq_bn"})
    fxadapt.save_adapter(source, tmp_path / "c", "c", format=fmt)
    # the checkpoint is for another model width: its weights do not fit
    wide = make_model("bert", intermediate_size=64)
    fxadapt.inject(wide, {"c": fxadapt.BottleneckConfig(sites=("ffn.out",)) if fmt != "peft" else "ia3"})
    folder = tmp_path / "c"
    if fmt == "fxadapt":
        meta = json.loads((folder / "adapter_config.json").read_text())
        meta["config"]["reduction_factor"] = 4  # weights saved for 16: shapes do not match
        (folder / "adapter_config.json").write_text(json.dumps(meta))
    else:
        target = next(p for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))
        target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    files = files_of(folder)
    model = _parallel_model()
    if setup == "parallel":
        fxadapt.activate(model, fxadapt.Parallel("a", "b"))
    else:
        fxadapt.activate(model, fxadapt.add_fusion(model, ["a", "b"]))
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(fxadapt.CheckpointError):
        fxadapt.load_adapter(model, folder)
    snap.assert_unchanged()
    assert files_of(folder) == files


class _BNBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.out(torch.relu(self.bn(self.inp(x))))


class _BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_BNBlock(), _BNBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_priming_does_not_touch_batchnorm_statistics():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    model = _BNNet().train()
    snap = ModelSnapshot(model)
    with pytest.raises(fxadapt.SiteNotFoundError):  # inject fails after its priming forward
        fxadapt.inject(model, {"l": fxadapt.LoRAConfig(sites=("linear:nope",))}, example_inputs=(x,))
    snap.assert_unchanged()
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(sites=("linear:out",))}, example_inputs=(x,))
    assert all(torch.equal(v, snap.state[k]) for k, v in model.state_dict().items() if "running" in k)
    # one training forward (a new kind of call: traced lazily) advances the statistics once, as eager does
    eager = _BNNet().train()
    with torch.no_grad():
        model(x[:4])
        eager(x[:4])
    for k, v in eager.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("name", ["keys", "forward", "training", "train"])
def test_reserved_adapter_names(name):
    model = make_model("bert")
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(fxadapt.ConfigError, match=rf"invalid adapter name '{name}'.*'{name}_adapter'"):
        fxadapt.inject(model, {name: "seq_bn"})
    snap.assert_unchanged()
    compat = _compat_model()
    snap = ModelSnapshot(compat)
    with pytest.raises(fxadapt.ConfigError, match="invalid head name"):
        compat.add_classification_head(name, num_labels=2)
    snap.assert_unchanged()


# -- item 6: edges with untyped errors -----------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    return fxadapt.save_adapter(model, tmp_path / "a", "a")


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m.update(base_model="x"),
            r"field 'base_model' is 'x' \(str\); expected an object or null",
        ),
        (lambda m: m["base_model"].update(hidden_size="32"), r"base_model.hidden_size is '32'"),
        (lambda m: m.update(sites=5), r"field 'sites' is 5"),
        (
            lambda m: m["config"].update(sites=5),
            r"sites=5 is invalid; expected a list or tuple like \('ffn.out',\)",
        ),
        (lambda m: m["config"].update(reduction=16), r"unknown key\(s\) \['reduction'\].*'reduction_factor'"),
    ],
)
def test_bad_config_fields(saved, edit, match):
    meta = json.loads((saved / "adapter_config.json").read_text())
    edit(meta)
    (saved / "adapter_config.json").write_text(json.dumps(meta))
    files = files_of(saved)
    model = make_model("bert")
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(fxadapt.CheckpointError, match=match):
        fxadapt.load_adapter(model, saved)
    snap.assert_unchanged()
    assert files_of(saved) == files


def test_deeply_nested_json(saved):
    (saved / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    files = files_of(saved)
    model = make_model("bert")
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(fxadapt.CheckpointError, match="nested too deeply"):
        fxadapt.load_adapter(model, saved)
    snap.assert_unchanged()
    assert files_of(saved) == files


def test_config_constructor_errors():
    with pytest.raises(
        fxadapt.ConfigFieldError, match=r"no field 'reduction'.*did you mean 'reduction_factor'\?"
    ):
        fxadapt.BottleneckConfig(reduction=16)
    with pytest.raises(TypeError):  # still the builtin a caller would catch
        fxadapt.LoRAConfig(rank=4)
    with pytest.raises(fxadapt.ConfigFieldError, match="keyword arguments only"):
        fxadapt.LoRAConfig(8)
    with pytest.raises(fxadapt.ConfigError, match=r"LoRAConfig.sites=5 .* like \('attn.q', 'attn.v'\)"):
        fxadapt.LoRAConfig(sites=5)
    with pytest.raises(fxadapt.ConfigError, match=r"leave_out=3 .*did you mean \(3,\)"):
        fxadapt.IA3Config(leave_out=3)
    assert fxadapt.BottleneckConfig(sites="attn.out").sites == ("attn.out",)  # a single name is still fine


def test_meta_device_model():
    with torch.device("meta"):
        model = make_model("bert")
    classes = [type(m) for m in model.modules()]
    with pytest.raises(fxadapt.CaptureError, match=r"meta device .*to_empty"):
        fxadapt.inject(model, {"a": "seq_bn"})
    assert [type(m) for m in model.modules()] == classes
    assert fxadapt.list_adapters(model) == {} and "fxadapt" not in dict(model.named_modules())


def test_legacy_id_with_a_local_model_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model("bert")
    model.config._name_or_path = str(tmp_path / "models" / "my-bert")  # loaded from a local folder
    cache = tmp_path / "cache"
    snap = ModelSnapshot(model, make_inputs("bert"))
    with pytest.raises(
        fxadapt.CheckpointError, match="local path; use the adapter's hub repo id 'AdapterHub/"
    ):
        fxadapt.load_adapter(model, "sentiment/sst-2@ukp", cache_dir=cache)
    snap.assert_unchanged()
    outside = [p for p in tmp_path.rglob("*") if "adapterhub-index" in str(p)]
    assert outside == []

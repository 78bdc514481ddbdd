"""Bad input: a typed error naming the offending value and the valid choices, and the model left unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import main_output, make_inputs, make_model

import fxadapt
from fxadapt.model import get_state


class Snapshot:
    """State dict, layer classes, adapters and outputs of a model, to prove a failed call changed nothing."""

    def __init__(self, model, arch="bert"):
        self.model = model
        self.inputs = make_inputs(arch)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.classes = [type(m) for m in model.modules()]
        self.adapters = dict(fxadapt.list_adapters(model))
        self.active = fxadapt.active_adapters(model)
        with torch.no_grad():
            self.output = main_output(model(**self.inputs))

    def assert_unchanged(self):
        state = self.model.state_dict()
        assert state.keys() == self.state.keys()
        assert all(torch.equal(state[k], v) for k, v in self.state.items())
        assert [type(m) for m in self.model.modules()] == self.classes
        assert fxadapt.list_adapters(self.model) == self.adapters
        assert fxadapt.active_adapters(self.model) == self.active
        with torch.no_grad():
            assert torch.equal(main_output(self.model(**self.inputs)), self.output)


@pytest.fixture
def adapted():
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.normal_(std=0.1)
    return model


@pytest.mark.parametrize("fresh", [True, False])
def test_unknown_method(adapted, fresh):
    model = make_model("bert") if fresh else adapted
    snap = Snapshot(model)
    with pytest.raises(fxadapt.ConfigError, match=r"'seq_bm'.*did you mean 'seq_bn'") as exc:
        fxadapt.inject(model, {"b": "seq_bm"})
    assert isinstance(exc.value, ValueError)
    assert "double_seq_bn" in str(exc.value)  # lists the valid choices
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reduction_factor": 0}, r"reduction_factor=0 .*> 0"),
        ({"reduction_factor": -2.0}, r"reduction_factor=-2.0"),
        ({"non_linearity": "rleu"}, r"non_linearity='rleu'.*did you mean 'relu'"),
        ({"scaling": "learnt"}, r"scaling='learnt'.*did you mean 'learned'"),
        ({"init_weights": "xavier"}, r"init_weights='xavier'"),
        ({"sites": ("attn.outt",)}, r"'attn.outt'.*did you mean 'attn.out'"),
        ({"residual_before_ln": "yes"}, r"residual_before_ln='yes'"),
        ({"dropout": 1.5}, r"dropout=1.5"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(fxadapt.ConfigError, match=match):
        fxadapt.BottleneckConfig(**kwargs)


def test_reduction_factor_larger_than_hidden(adapted):
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.ConfigError, match=r"reduction_factor=64.*hidden size 32"):
        fxadapt.inject(adapted, {"b": fxadapt.BottleneckConfig(reduction_factor=64)})
    snap.assert_unchanged()


def test_name_collision(adapted):
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.NameCollisionError, match=r"'a' already exists"):
        fxadapt.inject(adapted, {"a": "double_seq_bn"})
    snap.assert_unchanged()


def test_invalid_adapter_name(adapted):
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.ConfigError, match=r"invalid adapter name 'my.adapter'"):
        fxadapt.inject(adapted, {"my.adapter": "seq_bn"})
    snap.assert_unchanged()


@pytest.mark.parametrize("verb", ["activate", "remove", "train_adapter", "save"])
def test_unknown_adapter(adapted, verb, tmp_path):
    snap = Snapshot(adapted)
    call = {
        "activate": lambda: fxadapt.activate(adapted, "b"),
        "remove": lambda: fxadapt.remove(adapted, "b"),
        "train_adapter": lambda: fxadapt.train_adapter(adapted, "b"),
        "save": lambda: fxadapt.save_adapter(adapted, tmp_path, "b"),
    }[verb]
    with pytest.raises(
        fxadapt.AdapterNotFoundError, match=r"no adapter named 'b'.*known adapters: \['a'\]"
    ) as exc:
        call()
    assert isinstance(exc.value, KeyError)
    snap.assert_unchanged()


def test_missing_site(adapted):
    snap = Snapshot(adapted)
    with pytest.raises(
        fxadapt.SiteNotFoundError,
        match=r"\['cross.out'\] not found in the blocks \(BertLayer\) of BertModel; they have",
    ) as exc:
        fxadapt.inject(adapted, {"b": fxadapt.BottleneckConfig(sites=("cross.out",))})
    assert isinstance(exc.value, LookupError)
    assert "attn.out" in str(exc.value) and "ffn.out" in str(exc.value)
    snap.assert_unchanged()


def test_model_without_layers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fxadapt.CaptureError, match=r"no repeating layers found in Sequential"):
        fxadapt.inject(model, {"a": "seq_bn"}, example_inputs=(torch.randn(2, 4),))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert get_state(model) is None


def test_invalid_setup_rolls_back(adapted):
    fxadapt.inject(adapted, {"b": "par_bn"}, activate=False)
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.CompositionError, match=r"cannot nest Parallel inside Fuse"):
        fxadapt.activate(adapted, fxadapt.Fuse("a", fxadapt.Parallel("a", "b")))
    with pytest.raises(fxadapt.CompositionError, match=r"Fuse\('a', 'b'\) has no fusion layers"):
        fxadapt.activate(adapted, fxadapt.Fuse("a", "b"))
    with pytest.raises(fxadapt.AdapterNotFoundError, match=r"no adapter named 'c'"):
        fxadapt.activate(adapted, fxadapt.Stack("a", fxadapt.Average("b", "c")))
    snap.assert_unchanged()


# -- loading -----------------------------------------------------------------------------------------------


@pytest.fixture
def saved(adapted, tmp_path):
    fxadapt.save_adapter(adapted, tmp_path / "a", "a")
    return tmp_path / "a"


def test_load_hidden_size_mismatch(saved):
    model = make_model("bert", hidden_size=48, intermediate_size=64)
    snap = Snapshot(model)
    with pytest.raises(fxadapt.CheckpointError, match=r"hidden_size=32 .*BertModel has hidden_size=48"):
        fxadapt.load_adapter(model, saved)
    snap.assert_unchanged()


def test_load_layer_count_mismatch(saved):
    model = make_model("bert", num_hidden_layers=3)
    snap = Snapshot(model)
    with pytest.raises(fxadapt.CheckpointError, match=r"num_layers=2 .*has num_layers=3"):
        fxadapt.load_adapter(model, saved)
    snap.assert_unchanged()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_load_corrupt_weights(saved, damage, adapted):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 8 + data[8:])
    else:
        path.unlink()
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.CheckpointError, match=r"adapter_model.safetensors"):
        fxadapt.load_adapter(adapted, saved, name="b")
    snap.assert_unchanged()


def test_load_weights_of_wrong_shape(saved, adapted, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(saved / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("down.weight"))
    tensors[key] = torch.zeros(3, 32)
    save_file(tensors, saved / "adapter_model.safetensors")
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.CheckpointError, match=r"has shape \(3, 32\) in the checkpoint"):
        fxadapt.load_adapter(adapted, saved, name="b")
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m: m["config"].update(reduction_facter=4),
            r"unknown key\(s\) \['reduction_facter'\].*did you mean",
        ),
        (lambda m: m["config"].update(reduction_factor="sixteen"), r"reduction_factor='sixteen'"),
        (lambda m: m["config"].update(ln_before="no"), r"ln_before='no'"),
        (lambda m: m.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda m: m["config"].update(method="lora2"), r"unknown method 'lora2'"),
    ],
)
def test_load_bad_config_json(saved, adapted, edit, match):
    path = saved / "adapter_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.CheckpointError, match=match):
        fxadapt.load_adapter(adapted, saved, name="b")
    snap.assert_unchanged()


def test_load_not_json(saved, adapted):
    (saved / "adapter_config.json").write_text("{not json")
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.CheckpointError, match=r"not valid JSON"):
        fxadapt.load_adapter(adapted, saved, name="b")
    snap.assert_unchanged()


def test_load_name_collision(saved, adapted):
    snap = Snapshot(adapted)
    with pytest.raises(fxadapt.NameCollisionError):
        fxadapt.load_adapter(adapted, saved)  # saved as 'a', which exists
    snap.assert_unchanged()

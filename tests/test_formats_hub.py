"""Loading by id from a pre-filled offline hub cache, and AdapterHub folders in the main venv (no ``adapters``
package): a checkpoint AdapterHub wrote under transformers 4.57 loads into a transformers 5 ViT with equal outputs,
fxadapt's AdapterHub writer round-trips, and every unsupported feature or mismatch is a typed error that leaves
the model unchanged. No network: the cache is built on disk as huggingface_hub lays it out."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import huggingface_hub
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from test_errors import Snapshot
from tiny_models import main_output, make_config, make_inputs, make_model

import fxadapt
from fxadapt.formats.hub import legacy_repo

FIXTURE = Path(__file__).parent / "fixtures" / "adapterhub_vit"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _randomise(model, name, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _max_diff(a, b, inputs):
    with torch.no_grad():
        return (main_output(a(**inputs)) - main_output(b(**inputs))).abs().max().item()


def _prefill(cache: Path, repo_id: str, source: Path, commit: str, ref: str | None = "main") -> None:
    """Put ``source``'s files into ``cache`` as ``snapshot_download`` leaves them (blobs inlined)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


@pytest.fixture
def saved(tmp_path):
    """Two versions of a seq_bn adapter on tiny BERT, in fxadapt's format; and their outputs."""
    out = {}
    for version in ("v1", "v2"):
        model = make_model("bert")
        fxadapt.inject(model, {"sst": "seq_bn"})
        _randomise(model, "sst", seed=len(out))
        fxadapt.save_adapter(model, tmp_path / version, "sst")
        with torch.no_grad():
            out[version] = main_output(model(**make_inputs("bert")))
    return tmp_path, out


def test_load_by_id_from_the_offline_cache(saved, monkeypatch):
    folder, outputs = saved
    cache = folder / "cache"
    _prefill(cache, "org/sst", folder / "v1", "a" * 40)
    _prefill(cache, "org/sst", folder / "v2", "b" * 40, ref="v2")
    inputs = make_inputs("bert")

    def loaded(**kwargs):
        model = make_model("bert")
        fxadapt.load_adapter(model, "org/sst", **kwargs)
        with torch.no_grad():
            return main_output(model(**inputs))

    assert torch.equal(loaded(cache_dir=cache), outputs["v1"])
    assert torch.equal(loaded(cache_dir=cache, revision="v2"), outputs["v2"])
    assert torch.equal(loaded(cache_dir=cache, revision="b" * 40), outputs["v2"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # what HF_HUB_CACHE=... sets
    assert torch.equal(loaded(), outputs["v1"])


def test_id_not_in_the_offline_cache(saved):
    folder, _ = saved
    model = make_model("bert")
    snap = Snapshot(model)
    with pytest.raises(fxadapt.CheckpointError, match=r"cannot find adapter 'org/missing'.*HF_HUB_OFFLINE"):
        fxadapt.load_adapter(model, "org/missing", cache_dir=folder / "empty")
    with pytest.raises(fxadapt.CheckpointError, match=r"cannot find adapter 'org/sst'"):
        fxadapt.load_adapter(model, "org/sst", cache_dir=folder / "empty", revision="v9")
    snap.assert_unchanged()


# the real index entry of the archived AdapterHub hub (dist/v2/index/bert-base-uncased.json, task "sentiment")
SENTIMENT = {
    "sst-2": {
        "9076f36a74755ac4": {
            "versions": {"ukp": "adapters/ukp/bert-base-uncased_sentiment_sst-2_pfeiffer.json"}
        },
        "b1017368d7a97b11": {
            "versions": {"ukp": "adapters/ukp/bert-base-uncased_sentiment_sst-2_houlsby.json"}
        },
        "default": "adapters/ukp/bert-base-uncased_sentiment_sst-2_pfeiffer.json",
    },
    "imdb": {"9076f36a74755ac4": {"versions": {"ukp": "adapters/ukp/bert-base-uncased-imdb_pfeiffer.json"}}},
}


def test_legacy_adapterhub_ids(saved):
    folder, outputs = saved
    cache = folder / "cache"
    (cache / "adapterhub-index").mkdir(parents=True)
    (cache / "adapterhub-index" / "bert-base-uncased.json").write_text(json.dumps({"sentiment": SENTIMENT}))
    # the rule, as adapters' find_in_index / pull_from_hub apply it
    pfeiffer = "AdapterHub/bert-base-uncased_sentiment_sst-2_pfeiffer"
    assert legacy_repo("@ukp/bert-base-uncased_sentiment_sst-2_pfeiffer") == pfeiffer
    assert legacy_repo("sentiment/sst-2@ukp", "bert-base-uncased", cache) == pfeiffer  # "default" wins
    assert legacy_repo("sentiment/sst-2", "bert-base-uncased", cache) == pfeiffer
    assert (
        legacy_repo("sentiment/imdb@ukp", "bert-base-uncased", cache)
        == "AdapterHub/bert-base-uncased-imdb_pfeiffer"
    )
    assert legacy_repo("sst-2", "bert-base-uncased", cache) == pfeiffer  # a subtask name alone
    with pytest.raises(fxadapt.CheckpointError, match=r"several adapters"):
        legacy_repo("sentiment", "bert-base-uncased", cache)
    with pytest.raises(fxadapt.CheckpointError, match=r"no AdapterHub adapter 'nli/rte'"):
        legacy_repo("nli/rte", "bert-base-uncased", cache)
    with pytest.raises(fxadapt.CheckpointError, match=r"index for 'gpt2' is not cached .*HF_HUB_OFFLINE"):
        legacy_repo("sentiment/sst-2", "gpt2", cache)

    # end to end: the redirected repo holds an AdapterHub-format folder
    source = make_model("bert")
    fxadapt.load_adapter(source, folder / "v1")
    fxadapt.save_adapter(source, folder / "ah", "sst", format="adapterhub")
    _prefill(cache, pfeiffer, folder / "ah", "c" * 40)
    for identifier in ("sentiment/sst-2@ukp", "@ukp/bert-base-uncased_sentiment_sst-2_pfeiffer"):
        model = make_model("bert")
        model.config._name_or_path = "bert-base-uncased"
        fxadapt.load_adapter(model, identifier, cache_dir=cache)
        with torch.no_grad():
            assert torch.equal(main_output(model(**make_inputs("bert"))), outputs["v1"])


# -- AdapterHub folders -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["double_seq_bn", "lora"])
def test_adapterhub_vit_from_transformers_4_into_5(preset, tmp_path):
    """ViT's modules were renamed in transformers 5; keys go through transformers' own conversion mapping."""
    model = tf.ViTModel.from_pretrained(FIXTURE / "base").eval()
    inputs = make_inputs("vit", batch=1)
    fxadapt.load_adapter(model, FIXTURE / preset)
    with torch.no_grad():
        got = main_output(model(**inputs))[:, 0]
    assert (got - load_file(FIXTURE / "expected.safetensors")[preset]).abs().max().item() <= 1e-5
    fxadapt.save_adapter(model, tmp_path, preset, format="adapterhub", use_safetensors=True)
    theirs, ours = (
        load_file(FIXTURE / preset / "adapter.safetensors"),
        load_file(tmp_path / "adapter.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)  # written back under transformers 4's names
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("arch", ["bert", "llama", "t5"])
def test_adapterhub_writer_round_trip(arch, tmp_path):
    base = make_model(arch)
    inputs = make_inputs(arch)
    model = copy.deepcopy(base)
    fxadapt.inject(model, {"b": "double_seq_bn", "l": "ia3"})
    for name in ("b", "l"):
        _randomise(model, name)
        fxadapt.save_adapter(model, tmp_path / name, name, format="adapterhub")
    fresh = copy.deepcopy(base)
    for name in ("b", "l"):
        fxadapt.load_adapter(fresh, tmp_path / name)
    fxadapt.activate(model, ["b", "l"])
    fxadapt.activate(fresh, ["b", "l"])
    assert _max_diff(fresh, model, inputs) == 0.0
    assert fxadapt.list_adapters(fresh)["b"] == fxadapt.list_adapters(model)["b"]


@pytest.fixture
def ah_folder(tmp_path):
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    _randomise(model, "a")
    return fxadapt.save_adapter(model, tmp_path / "a", "a", format="adapterhub")


def _edit(folder, **changes):
    meta = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if key == "config" and isinstance(value, dict):
            meta["config"].update(value)
        else:
            meta[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "changes, match",
    [
        # supported options whose weights the checkpoint lacks or that do not fit the model
        ({"config": {"phm_layer": True}}, r"Compacter adapter with shared PHM weights.*lacks them"),
        ({"config": {"use_gating": True, "stochastic_depth": 0.1}}, r"missing \['layer 0 ffn.out gate.bias'"),
        ({"config": {"inv_adapter": "glow", "inv_adapter_reduction_factor": 2}}, r"inv_adapter='glow'.*GLOW"),
        (
            {"config": {"architecture": "prefix_tuning", "use_gating": True}},
            r"gated prefix tuning \(use_gating=True",
        ),
        ({"config": {"architecture": "union", "configs": []}}, r"ConfigUnion"),
        (
            {"config": {"architecture": "lora", "use_dora": True}},
            r"keys that map to no site",
        ),  # bottleneck keys
        ({"config": "seq_bm"}, r"unknown AdapterHub config name 'seq_bm'.*did you mean 'seq_bn'"),
        ({"model_type": "roberta"}, r"saved for a 'bert' model|saved for a 'roberta' model"),
        ({"hidden_size": 64}, r"hidden_size=64, but BertModel has hidden_size=32"),
    ],
)
def test_adapterhub_refusals(ah_folder, changes, match):
    _edit(ah_folder, **changes)
    model = make_model("bert")
    snap = Snapshot(model)
    with pytest.raises(fxadapt.CheckpointError, match=match):
        fxadapt.load_adapter(model, ah_folder)
    snap.assert_unchanged()


def test_adapterhub_invertible_adapter_and_unmapped_keys(ah_folder):
    tensors = torch.load(ah_folder / "pytorch_adapter.bin", weights_only=True)
    model = make_model("bert")
    snap = Snapshot(model)
    for extra, match in [
        ("invertible_adapters.a.F.0.weight", r"missing \['layer 0 embed.inv F.0.bias'"),
        (
            "encoder.layer.0.attention.self.adapters.a.adapter_up.weight",
            r"map to no site.*attention\.self\.adapters",
        ),
        ("pooler.adapters.a.adapter_up.weight", r"map to no site.*pooler\.adapters"),
    ]:
        torch.save({**tensors, extra: torch.zeros(1)}, ah_folder / "pytorch_adapter.bin")
        _edit(ah_folder, config={"inv_adapter": "nice", "inv_adapter_reduction_factor": 2})
        with pytest.raises(fxadapt.CheckpointError, match=match):
            fxadapt.load_adapter(model, ah_folder)
        snap.assert_unchanged()


def test_adapterhub_missing_and_unsafe_weights(ah_folder, capsys):
    from test_formats_peft import Payload

    model = make_model("bert")
    snap = Snapshot(model)
    tensors = torch.load(ah_folder / "pytorch_adapter.bin", weights_only=True)
    key = next(iter(tensors))
    with open(ah_folder / "pytorch_adapter.bin", "wb") as f:
        pickle.dump({**tensors, key: Payload()}, f)
    with pytest.raises(fxadapt.CheckpointError, match=r"refusing to load .*pytorch_adapter\.bin"):
        fxadapt.load_adapter(model, ah_folder)
    assert "arbitrary code ran" not in capsys.readouterr().out
    (ah_folder / "pytorch_adapter.bin").unlink()
    with pytest.raises(fxadapt.CheckpointError, match=r"adapter\.safetensors or pytorch_adapter\.bin"):
        fxadapt.load_adapter(model, ah_folder)
    snap.assert_unchanged()


def test_adapterhub_heads(tmp_path):
    """A static HF head round-trips; AdapterHub's own 2-layer classification head has no equal in
    BertForSequenceClassification (its dense layer is the base model's pooler): refused, precisely."""
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    model = copy.deepcopy(base)
    fxadapt.inject(model, {"a": "seq_bn"})
    _randomise(model, "a")
    with torch.no_grad():
        model.classifier.weight.normal_()
    fxadapt.save_adapter(model, tmp_path / "a", "a", format="adapterhub", with_head=True)
    fresh = copy.deepcopy(base)
    fxadapt.load_adapter(fresh, tmp_path / "a")
    assert _max_diff(fresh, model, make_inputs("bert")) == 0.0

    head = {"heads.a.1.weight": torch.zeros(32, 32), "heads.a.4.weight": torch.zeros(3, 32)}
    torch.save(head, tmp_path / "a" / "pytorch_model_head.bin")
    flex = {"head_type": "classification", "layers": 2, "activation_function": "tanh", "use_pooler": False}
    meta = json.loads((tmp_path / "a" / "head_config.json").read_text())
    (tmp_path / "a" / "head_config.json").write_text(json.dumps({**meta, "config": flex, "name": "a"}))
    other = copy.deepcopy(base)
    snap = Snapshot(other)
    with pytest.raises(
        fxadapt.CheckpointError, match=r"layers=2.*no equivalent in BertForSequenceClassification"
    ):
        fxadapt.load_adapter(other, tmp_path / "a")
    snap.assert_unchanged()
    fxadapt.load_adapter(other, tmp_path / "a", load_head=False)
    assert torch.equal(other.classifier.weight, base.classifier.weight)


def test_fusion_needs_its_adapters(tmp_path):
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn", "b": "seq_bn"})
    fxadapt.add_fusion(model, ["a", "b"])
    fxadapt.save_adapter_fusion(model, tmp_path / "ab", ["a", "b"])
    other = make_model("bert")
    fxadapt.inject(other, {"a": "seq_bn"})
    snap = Snapshot(other)
    with pytest.raises(fxadapt.CheckpointError, match=r"\['b'\] are not in the model; load them first"):
        fxadapt.load_adapter_fusion(other, tmp_path / "ab")
    with pytest.raises(fxadapt.CheckpointError, match=r"holds AdapterFusion layers.*load_adapter_fusion"):
        fxadapt.load_adapter(other, tmp_path / "ab")
    snap.assert_unchanged()

"""LoReFT, NoReFT, DiReFT side by side with AdapterHub ``adapters`` 1.3.0 (.venv-peer): trained there a few steps,
saved, loaded with fxadapt (equal outputs), perturbed, written back with ``format="adapterhub"`` and loaded by
``adapters`` (equal outputs). BERT and LLaMA; prefix and suffix positions, tied weights; padded rows."""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from peer_helpers import max_abs, train_adapterhub  # noqa: E402
from tiny_models import main_output, make_inputs, make_model  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer

CONFIGS = {
    "loreft": lambda: "loreft",
    "noreft": lambda: "noreft",
    "direft": lambda: "direft",
    "loreft_suffix_tied": lambda: adapters.LoReftConfig(
        prefix_positions=2, suffix_positions=2, tied_weights=True, r=2
    ),
    "noreft_suffix": lambda: adapters.NoReftConfig(
        prefix_positions=1, suffix_positions=3, non_linearity="tanh"
    ),
}


def _out(model, inputs):
    with torch.no_grad():
        return main_output(model(**inputs))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_reft_both_ways(arch, name, tmp_path):
    base = make_model(arch)
    inputs = make_inputs(arch, seq=8)
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("a", config=CONFIGS[name]())
    train_adapterhub(theirs, inputs, "a", out=main_output)
    theirs.save_adapter(str(tmp_path / "theirs"), "a")
    # adapters 1.3.0 reloads a DiReFT checkpoint as NoReFT (subtract_projection is not saved): compare with what
    # adapters itself loads from the folder
    reloaded = copy.deepcopy(base)
    adapters.init(reloaded)
    reloaded.load_adapter(str(tmp_path / "theirs"))
    reloaded.set_active_adapters("a")
    reloaded.eval()

    ours = copy.deepcopy(base)
    assert fxadapt.load_adapter(ours, tmp_path / "theirs") == "a"
    ours.eval()
    assert max_abs(_out(ours, inputs), _out(base, inputs)) > 1e-4
    assert max_abs(_out(ours, inputs), _out(reloaded, inputs)) <= 1e-5
    if name != "direft":
        assert max_abs(_out(ours, inputs), _out(theirs, inputs)) <= 1e-5

    with torch.no_grad():
        for key, p in fxadapt.adapter_parameters(ours, "a").items():
            if "parametrizations" not in key:  # see peer_helpers.train_adapterhub
                p.add_(torch.randn(p.shape) * 0.05)
    fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub")
    back = copy.deepcopy(base)
    adapters.init(back)
    assert back.load_adapter(str(tmp_path / "ours")) == "a"
    back.set_active_adapters("a")
    assert max_abs(_out(ours, inputs), _out(back.eval(), inputs)) <= 1e-5


def test_direft_is_not_written_for_adapterhub(tmp_path):
    """adapters 1.3.0 would load a DiReFT as NoReFT (it rebuilds ReFT configs from fields, and subtract_projection
    is none): fxadapt refuses to write one, naming the feature, and writes nothing."""
    ours = make_model("bert")
    fxadapt.inject(ours, {"a": "direft"})
    theirs_like = copy.deepcopy(make_model("bert"))
    adapters.init(theirs_like)
    theirs_like.add_adapter("a", config="direft")
    assert theirs_like.encoder.layer[0].reft_layer.refts["a"].units[0].subtract_projection is False
    with pytest.raises(fxadapt.CheckpointError, match=r"DiReFT .*subtract_projection=False.*NoReFT"):
        fxadapt.save_adapter(ours, tmp_path / "ours", "a", format="adapterhub")
    assert not (tmp_path / "ours").exists()

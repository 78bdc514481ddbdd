"""``fxadapt.compat.AdapterModel`` and AdapterHub's ``BertAdapterModel`` side by side (adapters 1.3.0, .venv-peer).

AdapterHub saves adapters of a ``BertAdapterModel`` under ``bert.encoder...`` and its flex heads as
``heads.<name>.<i>.*``: ``AdapterModel.load_adapter`` loads both (with and without the head), the head into a named
head of the same architecture; predictions equal AdapterHub's. ``save_adapter(format="adapterhub")`` writes them
back for ``BertAdapterModel.load_adapter``.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from peer_helpers import max_abs, train_adapterhub, two_classifiers  # noqa: E402
from tiny_models import make_config, make_inputs  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.compat import AdapterModel  # noqa: E402

pytestmark = pytest.mark.peer

HEADS = {
    "classification": lambda m: m.add_classification_head("a", num_labels=3),
    "classification_pooler": lambda m: m.add_classification_head(
        "a", num_labels=3, layers=1, use_pooler=True
    ),
    "tagging": lambda m: m.add_tagging_head("a", num_labels=4),
    "multiple_choice": lambda m: m.add_multiple_choice_head("a", num_choices=3),
    "question_answering": lambda m: m.add_qa_head("a"),
}


def _outputs(out):
    return torch.cat([t.flatten() for t in (getattr(out, "start_logits", None), getattr(out, "end_logits", None),
                                            getattr(out, "logits", None)) if t is not None])  # fmt: skip


def _inputs(head):
    inputs = make_inputs("bert", seq=7)
    if head == "multiple_choice":  # [batch, choices, tokens]
        inputs = {k: torch.stack([v, v.flip(0), v]).transpose(0, 1).contiguous() for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("head", sorted(HEADS))
def test_flex_head_both_ways(head, tmp_path):
    torch.manual_seed(0)
    config = make_config("bert")
    theirs = adapters.BertAdapterModel(config)
    theirs.add_adapter("a", config="seq_bn")
    HEADS[head](theirs)
    inputs = _inputs(head)
    train_adapterhub(theirs, inputs, "a", extra=lambda n: n.startswith("heads."), out=_outputs)
    theirs.save_adapter(str(tmp_path / "theirs"), "a")

    ours = AdapterModel(tf.BertModel(config)).eval()
    ours.model.load_state_dict(theirs.bert.state_dict(), strict=False)  # the same base weights
    assert ours.load_adapter(tmp_path / "theirs", set_active=True) == "a"
    with torch.no_grad():
        expected, got = _outputs(theirs(**inputs)), _outputs(ours(**inputs))
        theirs.set_active_adapters(None)
        plain = _outputs(theirs(**inputs))
        theirs.set_active_adapters("a")
    assert max_abs(expected, plain) > 1e-4  # the adapter does something
    assert max_abs(got, expected) <= 1e-5

    with torch.no_grad():  # fxadapt -> AdapterHub: change the head and the adapter, write, load back
        for p in ours.heads["a"].parameters():
            p.add_(0.05)
    ours.save_adapter(tmp_path / "ours", "a", format="adapterhub")
    back = adapters.BertAdapterModel(config)
    back.bert.load_state_dict(theirs.bert.state_dict(), strict=False)
    assert back.load_adapter(str(tmp_path / "ours")) == "a"
    back.set_active_adapters("a")
    with torch.no_grad():
        assert max_abs(_outputs(back.eval()(**inputs)), _outputs(ours(**inputs))) <= 1e-5


def test_adapter_without_head(tmp_path):
    """The seed's story on the compat class: an AdapterHub adapter saved without a head (``bert.`` keys)."""
    torch.manual_seed(0)
    config = make_config("bert")
    theirs = adapters.BertAdapterModel(config)
    theirs.add_adapter("movie", config="seq_bn")
    inputs = make_inputs("bert")
    train_adapterhub(theirs, inputs, "movie", out=lambda o: o[0])
    theirs.save_adapter(str(tmp_path / "movie"), "movie", with_head=False)

    ours = AdapterModel(tf.BertModel(config)).eval()
    ours.model.load_state_dict(theirs.bert.state_dict(), strict=False)
    assert ours.load_adapter(tmp_path / "movie", set_active=True) == "movie"
    with torch.no_grad():
        assert max_abs(ours(**inputs).last_hidden_state, theirs(**inputs)[0]) <= 1e-5


def test_static_head_into_flex_head(tmp_path):
    """A static head (``adapters.init(BertForSequenceClassification)``) becomes the flex head AdapterHub converts it
    to (one Linear on the pooled output)."""
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(make_config("bert", num_labels=3)).eval()
    theirs = copy.deepcopy(base)
    adapters.init(theirs)
    theirs.add_adapter("a", config="seq_bn")
    inputs = make_inputs("bert")
    train_adapterhub(theirs, inputs, "a", extra=lambda n: n.startswith("classifier"), out=lambda o: o.logits)
    theirs.save_adapter(str(tmp_path / "a"), "a", with_head=True)

    ours = AdapterModel(copy.deepcopy(base.bert)).eval()
    ours.load_adapter(tmp_path / "a", set_active=True)
    with torch.no_grad():
        assert max_abs(ours(**inputs).logits, theirs(**inputs).logits) <= 1e-5


@pytest.mark.parametrize("block", ["Parallel", "BatchSplit"])
def test_one_head_per_channel_or_slice(block, tmp_path):
    """AdapterHub's multi-head output: Parallel runs each child's head on its channel, BatchSplit each head on its
    slice of the batch; the loss is their sum."""
    torch.manual_seed(0)
    config = make_config("bert")
    theirs = adapters.BertAdapterModel(config)
    two_classifiers(theirs, ".adapters.")
    ours = AdapterModel(tf.BertModel(config)).eval()
    ours.model.load_state_dict(theirs.bert.state_dict(), strict=False)
    for name in ("a", "b"):
        theirs.save_adapter(str(tmp_path / name), name)
        ours.load_adapter(tmp_path / name)
    make = {"Parallel": lambda m: m.Parallel("a", "b"),
            "BatchSplit": lambda m: m.BatchSplit("a", "b", batch_sizes=[1, 1])}[block]  # fmt: skip
    from adapters import composition

    theirs.eval().set_active_adapters(make(composition))
    ours.set_active_adapters(make(fxadapt))
    inputs = {**make_inputs("bert", seq=7), "labels": torch.tensor([1, 0])}
    with torch.no_grad():
        expected, got = theirs(**inputs), ours(**inputs)
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected):
        assert g.logits.shape == e.logits.shape
        assert max_abs(g.logits, e.logits) <= 1e-5
    assert abs(got.loss.item() - expected.loss.item()) <= 1e-5
    with torch.no_grad():  # a call's adapter_names picks the heads the same way
        ours.set_active_adapters("a")
        again = ours(**inputs, adapter_names=make(fxadapt))
    assert [max_abs(a.logits, g.logits) for a, g in zip(again, got)] == [0.0, 0.0]

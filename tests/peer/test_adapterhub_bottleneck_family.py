"""Side by side with AdapterHub ``adapters`` 1.3.0: Compacter(++), invertible adapters, gated adapters, AdapterPlus
(drop path), on BERT and GPT-2. Adapters are trained a few steps in ``adapters`` (high learning rate, so every
weight is non-trivial), saved with its own ``save_adapter``, loaded by fxadapt, and must give the same outputs; then
trained a few steps in fxadapt, written in AdapterHub's format and loaded by ``adapters``: the same outputs again.
"""

from __future__ import annotations

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

import transformers as tf  # noqa: E402
from adapterhub_shims import torchvision_stochastic_depth  # noqa: E402
from tiny_models import make_config, make_inputs  # noqa: E402

import fxadapt  # noqa: E402

pytestmark = pytest.mark.peer

TOL = 1e-5


def _configs():
    return {
        "compacter": adapters.CompacterConfig(reduction_factor=8),
        "compacter++": adapters.CompacterPlusPlusConfig(reduction_factor=8),
        "compacter_shared_w": adapters.CompacterPlusPlusConfig(
            reduction_factor=8, shared_W_phm=True, factorized_phm_rule=True, phm_rank=2
        ),
        "compacter_own": adapters.CompacterConfig(
            reduction_factor=8, shared_phm_rule=False, factorized_phm_W=False, phm_c_init="uniform"
        ),
        "seq_bn_inv": "seq_bn_inv",
        "double_seq_bn_inv": "double_seq_bn_inv",
        "gated": adapters.SeqBnConfig(use_gating=True),
        "gated_par": adapters.ParBnConfig(use_gating=True, reduction_factor=4),
        "adapterplus": adapters.AdapterPlusConfig(reduction_factor=8, stochastic_depth=0.3),
    }


BERT_ONLY = {"compacter_own", "gated_par"}


def _models(arch):
    """(fxadapt's model, AdapterHub's model) with the same base weights. GPT-2 runs as AdapterHub's flex model
    with a causal-LM head tied to the embeddings: its head applies the invertible adapters' inverse."""
    torch.manual_seed(0)
    if arch == "bert":
        base = tf.BertForSequenceClassification(make_config("bert", num_labels=3))
        theirs = copy.deepcopy(base)
        adapters.init(theirs)
        return base, theirs
    base = tf.GPT2LMHeadModel(make_config("gpt2"))
    theirs = adapters.GPT2AdapterModel(base.config)
    theirs.transformer.load_state_dict(base.transformer.state_dict())
    from adapters.heads import CausalLMHead

    theirs.add_prediction_head(CausalLMHead(theirs, "lm", layers=1, bias=False))
    theirs.tie_weights()
    assert theirs.heads["lm"][0].weight is theirs.transformer.wte.weight
    return base, theirs


def _out(model, inputs):
    out = model(**inputs, output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def _train_theirs(model, inputs, name, steps=3, lr=0.5):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in f".{n}":
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    model.train_adapter(name)
    for n, p in model.named_parameters():  # the adapter only (also its shared PHM weights; not the head)
        p.requires_grad_(f".{name}." in f".{n}")
    _steps(model, inputs, steps, lr, gen)
    model.set_active_adapters(name)
    return model.eval()


def _steps(model, inputs, steps, lr, gen):
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr)
    for _ in range(steps):
        result = model(**inputs).logits
        loss = (result - torch.randn(result.shape, generator=gen)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
@pytest.mark.parametrize("method", list(_configs()))
def test_both_directions(arch, method, tmp_path):
    if arch != "bert" and method in BERT_ONLY:
        pytest.skip("a variant checked on BERT only")
    inputs = make_inputs(arch)
    with torchvision_stochastic_depth():
        ours, theirs = _models(arch)
        fresh = copy.deepcopy(theirs)
        theirs.add_adapter("a", config=_configs()[method])
        _train_theirs(theirs, inputs, "a")
        theirs.save_adapter(str(tmp_path / "ah"), "a", with_head=False)

        # AdapterHub -> fxadapt
        fxadapt.load_adapter(ours, tmp_path / "ah")
        ours.eval()
        with torch.no_grad():
            expected, got = _out(theirs, inputs), _out(ours, inputs)
            fxadapt.activate(ours, None)
            plain = _out(ours, inputs)
            fxadapt.activate(ours, "a")
        assert (expected - plain).abs().max().item() > 1e-3  # the adapter does something
        assert (got - expected).abs().max().item() <= TOL
        if method == "adapterplus":  # drop path: train mode, same RNG => same output
            theirs.train(), ours.train()
            with torch.no_grad():
                torch.manual_seed(11)
                expected = _out(theirs, inputs)
                torch.manual_seed(11)
                got = _out(ours, inputs)
                torch.manual_seed(12)
                other = _out(ours, inputs)
            theirs.eval(), ours.eval()
            assert (got - expected).abs().max().item() <= TOL
            assert (other - expected).abs().max().item() > 1e-4  # the draws matter

        # fxadapt -> AdapterHub
        fxadapt.train_adapter(ours, "a", train_head=False)
        _steps(ours, inputs, 2, 0.5, torch.Generator().manual_seed(3))
        ours.eval()
        fxadapt.save_adapter(ours, tmp_path / "fx", "a", format="adapterhub")
        fresh.load_adapter(str(tmp_path / "fx"))
        fresh.set_active_adapters("a")
        fresh.eval()
        with torch.no_grad():
            expected, got = _out(ours, inputs), _out(fresh, inputs)
    assert (got - expected).abs().max().item() <= TOL

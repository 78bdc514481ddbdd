"""Tiny random-weight Hugging Face models, built from configs (no hub access), one per architecture family."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import transformers as tf

VOCAB = 99

_COMMON = dict(vocab_size=VOCAB)

# LLaMA-family decoders (GQA: 2 key/value heads for 4 query heads)
_LLAMA_LIKE = dict(
    attention_dropout=0.1,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    **_COMMON,
)

# name -> (config class, config kwargs, model class name, kind)
#   kind: "encoder" (bidirectional), "decoder" (causal LM), "seq2seq", "vision"
SPECS: dict[str, tuple[str, dict, str, str]] = {
    "bert": (
        "BertConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **_COMMON,
        ),
        "BertModel",
        "encoder",
    ),
    "roberta": (
        "RobertaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **_COMMON,
        ),
        "RobertaModel",
        "encoder",
    ),
    "xlm-roberta": (
        "XLMRobertaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **_COMMON,
        ),
        "XLMRobertaModel",
        "encoder",
    ),
    "distilbert": (
        "DistilBertConfig",
        dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=64, **_COMMON),
        "DistilBertModel",
        "encoder",
    ),
    "electra": (
        "ElectraConfig",
        dict(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **_COMMON,
        ),
        "ElectraModel",
        "encoder",
    ),
    "deberta-v2": (
        "DebertaV2Config",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
            **_COMMON,
        ),
        "DebertaV2Model",
        "encoder",
    ),
    "gpt2": (
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_COMMON),
        "GPT2LMHeadModel",
        "decoder",
    ),
    "llama": (
        "LlamaConfig",
        dict(_LLAMA_LIKE),
        "LlamaForCausalLM",
        "decoder",
    ),
    "mistral": (
        "MistralConfig",
        dict(_LLAMA_LIKE),
        "MistralForCausalLM",
        "decoder",
    ),
    "qwen2": (
        "Qwen2Config",
        dict(_LLAMA_LIKE),
        "Qwen2ForCausalLM",
        "decoder",
    ),
    "t5": (
        "T5Config",
        dict(
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **_COMMON,
        ),
        "T5ForConditionalGeneration",
        "seq2seq",
    ),
    "bart": (
        "BartConfig",
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            **_COMMON,
        ),
        "BartForConditionalGeneration",
        "seq2seq",
    ),
    "vit": (
        "ViTConfig",
        dict(
            hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            image_size=16,
            patch_size=4,
            num_channels=3,
        ),
        "ViTModel",
        "vision",
    ),
}

ARCHS = list(SPECS)
DECODERS = [a for a, s in SPECS.items() if s[3] in ("decoder", "seq2seq")]

# residual sites per layer list: list path -> sites each layer has
EXPECTED_SITES = {
    "seq2seq": {"encoder": {"attn.out", "ffn.out"}, "decoder": {"attn.out", "cross.out", "ffn.out"}},
}


def make_config(arch: str, **overrides) -> tf.PretrainedConfig:
    cfg_name, kwargs, _, _ = SPECS[arch]
    cfg = getattr(tf, cfg_name)(**{**kwargs, **overrides})
    return cfg


def make_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    _, _, model_name, _ = SPECS[arch]
    model = getattr(tf, model_name)(make_config(arch, **overrides))
    return model.eval()


def make_inputs(arch: str, batch: int = 2, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kind = SPECS[arch][3]
    if kind == "vision":
        size = SPECS[arch][1]["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # some padding, so masks are exercised
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    return inputs


@contextlib.contextmanager
def fp64(*models: torch.nn.Module) -> Iterator[None]:
    """``models`` (fp32) in fp64 for the duration, then back in fp32 exactly (every fp32 value is an fp64 value).
    For comparisons with a reference computed another way: in fp64 the two orders of the same arithmetic agree far
    below fp32's rounding, which depends on the CPU's kernels and on the batch size."""
    for m in models:
        m.double()
    try:
        yield
    finally:
        for m in models:
            m.float()


def in_fp64(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with floating-point tensors in fp64 (for comparisons with a reference in fp64)."""
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def assert_fp64_equal(
    got: torch.Tensor, expected: torch.Tensor, what: object = "", rtol: float = 1e-12
) -> None:
    """``got`` equals ``expected``, both fp64, to ``rtol`` of the larger of 1 and ``expected``'s magnitude: two
    orders of the same arithmetic in fp64 (fp32 rounding would depend on the CPU's kernels and the batch size)."""
    assert got.dtype == expected.dtype == torch.float64, (what, got.dtype, expected.dtype)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    diff = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    assert diff <= rtol * scale, f"{what}: max abs diff {diff:.3g} (scale {scale:.3g})"


def randomise_adapters(model: torch.nn.Module, names, seed: int, std: float) -> None:
    """Every parameter of adapters ``names`` (in that order) drawn from N(0, std²) with one generator of ``seed``."""
    import fxadapt

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in fxadapt.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def main_output(out) -> torch.Tensor:
    """The output a test compares: logits, else the last hidden state, else CLIP's image logits, else ``out[0]``."""
    for name in ("logits", "last_hidden_state", "logits_per_image"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


def adapter_grads(model: torch.nn.Module, name: str, inputs: dict) -> dict[str, torch.Tensor]:
    """Backward of ``sum(main_output ** 2)`` with only adapter ``name``'s parameters trainable; asserts that
    gradients reached exactly those parameters and returns them (by parameter name)."""
    import fxadapt

    for p in model.parameters():
        p.requires_grad_(False)
    adapter = fxadapt.adapter_parameters(model, name)
    for p in adapter.values():
        p.requires_grad_(True)
    main_output(model(**inputs)).float().pow(2).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(adapter)
    return {n: p.grad for n, p in adapter.items()}

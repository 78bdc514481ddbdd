"""The architecture zoo: tiny random-weight transformers-5 models of many model types, built from configs.

Each entry is data: a model type, the Auto class to build, the kind of model, the structural categories it
exercises (see docs/architectures.md) and config overrides where the generic shrink below is not enough.
Used by ``tests/test_zoo.py`` and ``scripts/arch_matrix.py`` (which writes docs/architectures.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers as tf
from tiny_models import main_output  # noqa: F401 - the zoo's tests compare this output

from fxadapt.errors import SiteNotFoundError

VOCAB = 99


@dataclass(frozen=True)
class ZooEntry:
    model_type: str
    auto: str  # transformers Auto class name, or a model class name
    kind: str  # encoder | decoder | seq2seq | vision | speech | multimodal
    categories: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    # residual sites per block kind: block path fragment -> residual site kinds each block of it has
    sites: dict[str, frozenset[str]] | None = None
    lora_error: type | None = None  # the typed error default LoRA raises (no q/v projections to adapt)


_ENC_DEC_SITES = {
    "encoder": frozenset({"attn.out", "ffn.out"}),
    "decoder": frozenset({"attn.out", "cross.out", "ffn.out"}),
}

# Categories (issue 9): between = something between projection and residual add (post-norm, layer scale,
# multiplier, identity); parallel = parallel residual branches; moe = mixture-of-experts FFN; nested = the
# repeating unit wraps the real blocks; handwritten = attention without an HF attention function; fused_qkv = one
# projection for q/k/v; nonlinear_proj = projections that are not nn.Linear; capture = capture robustness items.
ZOO: list[ZooEntry] = [
    # ---- encoders
    ZooEntry("bert", "AutoModel", "encoder"),
    ZooEntry("roberta", "AutoModel", "encoder"),
    ZooEntry("xlm-roberta", "AutoModel", "encoder"),
    ZooEntry(
        "distilbert", "AutoModel", "encoder", overrides=dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48)
    ),
    ZooEntry("electra", "AutoModel", "encoder", overrides=dict(embedding_size=16)),
    ZooEntry("albert", "AutoModel", "encoder", ("nested",), dict(embedding_size=16, num_hidden_groups=1)),
    ZooEntry(
        "deberta",
        "AutoModel",
        "encoder",
        ("handwritten",),
        dict(relative_attention=True, max_relative_positions=16, pos_att_type=["c2p", "p2c"]),
    ),
    ZooEntry(
        "deberta-v2",
        "AutoModel",
        "encoder",
        ("handwritten",),
        dict(
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
        ),
    ),
    ZooEntry("mpnet", "AutoModel", "encoder", ("handwritten",)),
    ZooEntry("megatron-bert", "AutoModel", "encoder", ("handwritten",)),
    ZooEntry(
        "modernbert",
        "AutoModel",
        "encoder",
        ("between", "fused_qkv"),
        dict(
            global_attn_every_n_layers=2,
            local_attention=8,
            embedding_dropout=0.0,
            mlp_dropout=0.0,
            attention_dropout=0.0,
        ),
    ),
    ZooEntry("roberta-prelayernorm", "AutoModel", "encoder"),
    ZooEntry("xlm-roberta-xl", "AutoModel", "encoder"),
    ZooEntry("camembert", "AutoModel", "encoder"),
    ZooEntry("ernie", "AutoModel", "encoder"),
    ZooEntry("roformer", "AutoModel", "encoder", overrides=dict(embedding_size=32)),
    ZooEntry(
        "xlnet",
        "AutoModel",
        "encoder",
        ("nonlinear_proj", "handwritten"),
        lora_error=SiteNotFoundError,
        overrides=dict(d_model=32, n_layer=2, n_head=4, d_inner=48, d_head=8),
    ),
    ZooEntry("esm", "AutoModel", "encoder", overrides=dict(pad_token_id=1, mask_token_id=2)),
    ZooEntry("data2vec-text", "AutoModel", "encoder"),
    # ---- decoders
    ZooEntry("gpt2", "AutoModelForCausalLM", "decoder", ("nonlinear_proj", "fused_qkv")),
    ZooEntry(
        "gpt_neo",
        "AutoModelForCausalLM",
        "decoder",
        ("capture",),
        dict(attention_types=[[["global", "local"], 1]], window_size=4),
    ),
    ZooEntry(
        "gpt_neox",
        "AutoModelForCausalLM",
        "decoder",
        ("parallel", "fused_qkv"),
        dict(use_parallel_residual=True),
    ),
    ZooEntry("gptj", "AutoModelForCausalLM", "decoder", ("parallel",), dict(rotary_dim=4)),
    ZooEntry("codegen", "AutoModelForCausalLM", "decoder", ("parallel", "fused_qkv"), dict(rotary_dim=4)),
    ZooEntry("phi", "AutoModelForCausalLM", "decoder", ("parallel",)),
    ZooEntry(
        "falcon",
        "AutoModelForCausalLM",
        "decoder",
        ("parallel", "fused_qkv"),
        dict(new_decoder_architecture=False, parallel_attn=True, multi_query=True),
    ),
    ZooEntry(
        "bloom",
        "AutoModelForCausalLM",
        "decoder",
        ("handwritten", "fused_qkv"),
        dict(n_embed=32, n_layer=2, n_head=4),
    ),
    ZooEntry("gpt_bigcode", "AutoModelForCausalLM", "decoder", ("fused_qkv",), dict(multi_query=True)),
    ZooEntry("persimmon", "AutoModelForCausalLM", "decoder", ("fused_qkv",)),
    ZooEntry("phi3", "AutoModelForCausalLM", "decoder", ("fused_qkv",)),
    ZooEntry("llama", "AutoModelForCausalLM", "decoder"),
    ZooEntry("mistral", "AutoModelForCausalLM", "decoder"),
    ZooEntry("qwen2", "AutoModelForCausalLM", "decoder"),
    ZooEntry("qwen3", "AutoModelForCausalLM", "decoder"),
    ZooEntry("gemma", "AutoModelForCausalLM", "decoder"),
    ZooEntry("gemma2", "AutoModelForCausalLM", "decoder", ("between",)),
    ZooEntry("gemma3_text", "AutoModelForCausalLM", "decoder", ("between",), dict(sliding_window=4)),
    ZooEntry("olmo", "AutoModelForCausalLM", "decoder"),
    ZooEntry("olmo2", "AutoModelForCausalLM", "decoder", ("between",)),
    ZooEntry("granite", "AutoModelForCausalLM", "decoder", ("between",), dict(residual_multiplier=0.5)),
    ZooEntry("cohere", "AutoModelForCausalLM", "decoder", ("parallel",)),
    ZooEntry("stablelm", "AutoModelForCausalLM", "decoder"),
    ZooEntry("starcoder2", "AutoModelForCausalLM", "decoder"),
    ZooEntry("opt", "AutoModelForCausalLM", "decoder", overrides=dict(word_embed_proj_dim=32, ffn_dim=48)),
    ZooEntry("xglm", "AutoModelForCausalLM", "decoder", overrides=dict(d_model=32, ffn_dim=48, num_layers=2)),
    ZooEntry("biogpt", "AutoModelForCausalLM", "decoder"),
    ZooEntry("glm4", "AutoModelForCausalLM", "decoder", ("between", "fused_qkv")),
    ZooEntry("mixtral", "AutoModelForCausalLM", "decoder", ("moe",)),
    ZooEntry(
        "qwen2_moe", "AutoModelForCausalLM", "decoder", ("moe",), dict(shared_expert_intermediate_size=32)
    ),
    ZooEntry("qwen3_moe", "AutoModelForCausalLM", "decoder", ("moe",)),
    ZooEntry("olmoe", "AutoModelForCausalLM", "decoder", ("moe",)),
    ZooEntry("granitemoe", "AutoModelForCausalLM", "decoder", ("moe", "between")),
    ZooEntry(
        "mpt",
        "AutoModelForCausalLM",
        "decoder",
        ("fused_qkv", "handwritten"),
        dict(d_model=32, n_layers=2, n_heads=4, expansion_ratio=2),
    ),
    ZooEntry(
        "openai-gpt",
        "AutoModelForCausalLM",
        "decoder",
        ("nonlinear_proj", "handwritten"),
        dict(n_embd=32, n_layer=2, n_head=4),
    ),
    # ---- encoder-decoders
    ZooEntry("t5", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES, overrides=dict(d_kv=8)),
    ZooEntry("mt5", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES, overrides=dict(d_kv=8)),
    ZooEntry("bart", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES),
    ZooEntry("mbart", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES),
    ZooEntry("pegasus", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES),
    ZooEntry(
        "marian",
        "AutoModelForSeq2SeqLM",
        "seq2seq",
        sites=_ENC_DEC_SITES,
        overrides=dict(decoder_start_token_id=0, pad_token_id=0),
    ),
    ZooEntry("m2m_100", "AutoModelForSeq2SeqLM", "seq2seq", sites=_ENC_DEC_SITES),
    ZooEntry(
        "switch_transformers",
        "AutoModelForSeq2SeqLM",
        "seq2seq",
        ("moe",),
        dict(d_kv=8, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2),
        sites=_ENC_DEC_SITES,
    ),
    ZooEntry(
        "nllb-moe",
        "AutoModelForSeq2SeqLM",
        "seq2seq",
        ("moe",),
        dict(num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2),
        sites=_ENC_DEC_SITES,
    ),
    ZooEntry(
        "whisper",
        "AutoModelForSpeechSeq2Seq",
        "speech",
        ("capture",),
        dict(num_mel_bins=16, max_source_positions=16, max_target_positions=32, decoder_start_token_id=1),
        sites=_ENC_DEC_SITES,
    ),
    # ---- vision
    ZooEntry("vit", "AutoModel", "vision"),
    ZooEntry("deit", "AutoModel", "vision"),
    ZooEntry(
        "beit",
        "AutoModel",
        "vision",
        ("between",),
        dict(layer_scale_init_value=0.1, use_relative_position_bias=True),
    ),
    ZooEntry("data2vec-vision", "AutoModel", "vision", ("between",), dict(layer_scale_init_value=0.1)),
    ZooEntry("dinov2", "AutoModel", "vision", ("between",)),
    ZooEntry("vit_mae", "AutoModel", "vision", overrides=dict(mask_ratio=0.0)),
    ZooEntry(
        "swin",
        "AutoModel",
        "vision",
        ("nested",),
        dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2),
    ),
    ZooEntry("clip_vision_model", "AutoModel", "vision"),
    ZooEntry("siglip_vision_model", "AutoModel", "vision"),
    # ---- speech
    ZooEntry(
        "wav2vec2",
        "AutoModel",
        "speech",
        ("capture",),
        dict(
            conv_dim=[16, 16],
            conv_kernel=[5, 3],
            conv_stride=[4, 2],
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
            do_stable_layer_norm=True,
        ),
    ),
    ZooEntry(
        "hubert",
        "AutoModel",
        "speech",
        ("capture",),
        dict(
            conv_dim=[16, 16],
            conv_kernel=[5, 3],
            conv_stride=[4, 2],
            num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2,
        ),
    ),
    # ---- multimodal
    ZooEntry(
        "clip",
        "AutoModel",
        "multimodal",
        overrides=dict(
            text_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                vocab_size=VOCAB,
                max_position_embeddings=64,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=48,
                image_size=16,
                patch_size=4,
            ),
            projection_dim=16,
        ),
    ),
]

# Models fxadapt refuses with a typed error (tests/test_zoo.py): no repeating block holds a residual structure
# (flaubert: attention and feed-forward in separate lists), the stream is channels-first (squeezebert), or the
# feed-forward residuals run on a narrower inner stream than the layer's (mobilebert's bottlenecks).
REFUSED: list[ZooEntry] = [
    ZooEntry(
        "mobilebert",
        "AutoModel",
        "encoder",
        ("nested",),
        dict(embedding_size=32, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
    ),
    ZooEntry(
        "squeezebert",
        "AutoModel",
        "encoder",
        ("capture", "nonlinear_proj"),
        overrides=dict(
            embedding_size=32,
            q_groups=1,
            k_groups=1,
            v_groups=1,
            post_attention_groups=1,
            intermediate_groups=1,
            output_groups=1,
        ),
    ),
    ZooEntry("flaubert", "AutoModel", "encoder", ("handwritten",), dict(emb_dim=32, n_layers=2, n_heads=4)),
]

BY_TYPE = {e.model_type: e for e in ZOO + REFUSED}

# Generic shrink: every config attribute in this table that the config class knows is set to the tiny value.
_SHRINK: dict[str, Any] = dict(
    hidden_size=32,
    d_model=32,
    n_embd=32,
    num_hidden_layers=2,
    num_layers=2,
    n_layer=2,
    encoder_layers=2,
    decoder_layers=2,
    num_decoder_layers=2,
    num_attention_heads=4,
    n_head=4,
    num_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    d_ff=48,
    n_inner=48,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    head_dim=8,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    n_positions=64,
    image_size=16,
    patch_size=4,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=24,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=0,
)
_SHRINK_ALWAYS = {"pad_token_id", "bos_token_id", "eos_token_id"}


def make_config(entry: ZooEntry | str, **extra: Any) -> tf.PretrainedConfig:
    """A tiny config of ``entry``'s model type: the generic shrink, then the entry's overrides, then ``extra``."""
    entry = BY_TYPE[entry] if isinstance(entry, str) else entry
    default = tf.AutoConfig.for_model(entry.model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    kwargs = {k: v for k, v in _SHRINK.items() if k in known or k in _SHRINK_ALWAYS}
    if (
        "head_dim" in kwargs
        and getattr(default, "head_dim", None) is None
        and "head_dim" not in default.to_dict()
    ):
        kwargs.pop("head_dim")
    aliases = getattr(default, "attribute_map", {})
    kwargs = {k: v for k, v in kwargs.items() if aliases.get(k) not in entry.overrides}
    kwargs.update(entry.overrides)
    kwargs.update(extra)
    return tf.AutoConfig.for_model(entry.model_type, **kwargs)


def make_model(entry: ZooEntry | str, seed: int = 0, **extra: Any) -> torch.nn.Module:
    entry = BY_TYPE[entry] if isinstance(entry, str) else entry
    config = make_config(entry, **extra)
    torch.manual_seed(seed)
    cls = getattr(tf, entry.auto)
    model = cls.from_config(config) if entry.auto.startswith("Auto") else cls(config)
    return model.eval()


def make_inputs(
    model: torch.nn.Module, entry: ZooEntry | str, batch: int = 2, seq: int = 7, seed: int = 1
) -> dict[str, Any]:
    """A batch for ``model`` (padding in row 0 where the model takes an attention mask)."""
    entry = BY_TYPE[entry] if isinstance(entry, str) else entry
    g = torch.Generator().manual_seed(seed)
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    inputs: dict[str, Any] = {}
    if entry.kind == "multimodal":
        tc, vc = config.text_config, config.vision_config
        inputs["input_ids"] = torch.randint(3, tc.vocab_size, (batch, seq), generator=g)
        inputs["attention_mask"] = _mask(batch, seq)
        inputs["pixel_values"] = torch.randn(
            batch, vc.num_channels, vc.image_size, vc.image_size, generator=g
        )
        return inputs
    if name == "pixel_values":
        size = config.image_size
        inputs["pixel_values"] = torch.randn(
            batch, getattr(config, "num_channels", 3), size, size, generator=g
        )
        return inputs
    if name == "input_features":
        frames = 2 * config.max_source_positions
        inputs["input_features"] = torch.randn(batch, config.num_mel_bins, frames, generator=g)
        inputs["decoder_input_ids"] = torch.randint(3, config.vocab_size, (batch, 5), generator=g)
        return inputs
    if name == "input_values":
        inputs["input_values"] = torch.randn(batch, 400, generator=g)
        return inputs
    vocab = int(config.vocab_size)
    inputs["input_ids"] = torch.randint(3, vocab, (batch, seq), generator=g)
    inputs["attention_mask"] = _mask(batch, seq)
    if entry.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (batch, 5), generator=g)
    return inputs


def _mask(batch: int, seq: int) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return mask

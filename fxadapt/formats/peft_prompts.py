"""PEFT prompt learning checkpoints: ``PROMPT_TUNING`` and ``PREFIX_TUNING`` ↔ fxadapt's prompt / prefix tuning.

Both save one tensor, ``prompt_embeddings`` (peft 0.21, ``get_prompt_embedding_to_save``):

- prompt tuning: ``[num_virtual_tokens, token_dim]``, the soft tokens PEFT puts in front of ``inputs_embeds``
  (with ones in the attention mask, ``-100`` labels, zero token types): fxadapt's ``PromptTuningConfig`` with
  ``placement="input"`` (its default); the tensor is the soft prompt.
- prefix tuning: ``[num_virtual_tokens, num_layers · 2 · token_dim]`` (``token_dim`` = key/value heads × head
  dim), the prefixes themselves (also with ``prefix_projection=True``: PEFT saves the MLP's output). PEFT hands them
  to the model as a pre-filled KV cache, laid out per layer (key, value), head, dim — the layout of fxadapt's flat
  prefix pool — and the real tokens' positions start after them: ``PrefixTuningConfig(flat=True,
  shift_positions=True)``.

PEFT's encoder-decoder prompt learning (``num_transformer_submodules=2``: encoder and decoder prompts) is refused.
PEFT inserts prompts only in its task models (``task_type``); written folders name the task from the model's class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = ["KINDS", "read_prompt_learning", "write_prompt_learning"]

KINDS = ("PROMPT_TUNING", "PREFIX_TUNING")
# HF class-name ending -> PEFT task_type (PeftModel.from_pretrained picks the class that inserts the prompts)
TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
         ("Model", "FEATURE_EXTRACTION"))  # fmt: skip
_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
            "num_layers", "modules_to_save", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
            "tokenizer_kwargs", "prefix_projection", "encoder_hidden_size"}  # fmt: skip


def read_prompt_learning(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
) -> tuple[Any, dict]:
    """``(config, {(layer, kind, param): tensor})`` for a PEFT prompt-learning folder."""
    from ..methods.prefix import PrefixTuningConfig
    from ..methods.prompt import PromptTuningConfig

    kind = str(meta.get("peft_type")).upper()
    if (meta.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(
            f"{source}: PEFT {kind} with num_transformer_submodules={meta['num_transformer_submodules']} "
            "(encoder and decoder prompts of an encoder-decoder model) is not supported by fxadapt"
        )
    bad = {k: v for k, v in meta.items() if k not in _IGNORED and v not in (None, False, {}, [])}
    if bad:
        raise CheckpointError(f"{source}: unsupported PEFT {kind} setting(s) {bad}")
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{source}: expected the tensor 'prompt_embeddings', found {sorted(tensors)}")
    value = tensors["prompt_embeddings"]
    n = int(meta.get("num_virtual_tokens") or value.shape[0])
    if value.dim() != 2 or value.shape[0] != n:
        raise CheckpointError(
            f"{source}: prompt_embeddings has shape {tuple(value.shape)}, expected [{n}, ...]"
        )
    try:
        if kind == "PROMPT_TUNING":  # the saved tensor replaces any init (RANDOM, TEXT, ...)
            return PromptTuningConfig(prompt_length=n), {(0, "embed", "prompt"): value}
        config = PrefixTuningConfig(prefix_length=n, flat=True, shift_positions=True, cross_prefix=False)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    return config, {"prefix": value}


def prefix_weights(model: nn.Module, value: torch.Tensor, source: str, example_inputs: Any = None) -> dict:
    """Place PEFT's prefixes in fxadapt's flat pool (the first layer with an ``attn.kv`` site owns it)."""
    from . import site_reports

    owner = next(
        (
            i
            for i, r in enumerate(site_reports(model, example_inputs))
            if any(s.kind == "attn.kv" for s in r.attention)
        ),
        None,
    )
    if owner is None:
        raise CheckpointError(
            f"{source}: {type(model).__name__} has no attention call for prefixes (attn.kv)"
        )
    return {(owner, "attn.kv", "pool.control_trans"): value.reshape(-1)}


def _task(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in TASKS:
        if name.endswith(suffix):
            return task
    raise CheckpointError(f"PEFT format: no PEFT task_type for a {name} (its prompt learning needs one)")


def write_prompt_learning(model: nn.Module, record: Any, params: dict, name: str) -> tuple[dict, dict]:
    """``(adapter_config.json dict, tensors)`` of a prompt- or prefix-tuning adapter for PEFT."""
    from ..model import layers_of

    config = record.config
    cfg = getattr(model, "config", None)
    paths, _ = layers_of(model)
    heads = getattr(cfg, "num_attention_heads", None)
    common = {
        "task_type": _task(model),
        "num_transformer_submodules": 1,
        "num_layers": len(paths),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "inference_mode": True,
        "revision": None,
    }
    if config.method == "prompt_tuning":
        if config.placement != "input":
            raise CheckpointError(
                f"prompt-tuning adapter {name!r} has placement={config.placement!r} (AdapterHub's); PEFT puts prompts "
                "in front of the word embeddings (placement='input'): write it with format='adapterhub'"
            )
        prompt = params[(0, "embed", "prompt")]
        meta = {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": int(prompt.shape[0]),
                "token_dim": int(prompt.shape[1]), "num_attention_heads": heads, "prompt_tuning_init": "RANDOM"}  # fmt: skip
        return meta, {"prompt_embeddings": prompt}
    if not config.shift_positions:
        raise CheckpointError(
            f"prefix-tuning adapter {name!r} keeps the real tokens' positions (shift_positions=False, AdapterHub's); "
            "PEFT's prefixes shift them: train it with PrefixTuningConfig(shift_positions=True), or write "
            "format='adapterhub'"
        )
    pools = {id(m.get_pool()): m.get_pool() for (i, k), m in _prefix_sites(model, name)}
    if len(pools) != 1 or any(k == "cross.kv" for (_, k), _ in _prefix_sites(model, name)):
        raise CheckpointError(
            f"PEFT prefix tuning has one group of self-attention prefixes; {name!r} has {len(pools)}"
        )
    pool = next(iter(pools.values()))
    flat = pool if pool.flat else pool.ejected()
    prefixes = flat.control_trans.detach().view(config.prefix_length, -1)
    meta = {**common, "peft_type": "PREFIX_TUNING", "num_virtual_tokens": config.prefix_length,
            "token_dim": pool.heads * pool.head_dim, "num_attention_heads": pool.heads, "prefix_projection": False,
            "encoder_hidden_size": getattr(cfg, "hidden_size", None)}  # fmt: skip
    return meta, {"prompt_embeddings": prefixes}


def _prefix_sites(model: nn.Module, name: str) -> list:
    from ..parts import adapter_modules

    return [(key, m) for key, m in adapter_modules(model, name) if hasattr(m, "get_pool")]

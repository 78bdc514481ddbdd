"""Prompt tuning (Lester et al., 2021) at the ``embed`` site: learned soft tokens in front of the input embeddings.

Where the model takes ``inputs_embeds`` (text models), the prompt (``[prompt_length, hidden]``) goes in front of
the word embeddings (``combine="prefix"``; ``"prefix_after_bos"``: after the first token) and the model derives
positions, masks and caches from the prompted sequence; otherwise (ViT) it is inserted into the output of the
``embed`` site, the module whose output the first layer receives (found structurally in the priming forward). The
2-D ``attention_mask``, ``token_type_ids`` and ``labels`` (with -100) are extended to match. With a KV cache (``generate``), the prompt is inserted only while the cache
is empty; the mask keeps its extra columns on every step. As in AdapterHub, outputs include the prompt positions.

Prompt tuning acts on the model's input, outside the layers' generated code: the soft prompt is a *model part*
(:meth:`PromptTuningMethod.build_model_parts`, kept as ``embed`` in the first layer's container) and two hooks
(:meth:`PromptTuningMethod.model_hooks`: on the model and on the ``embed`` module) apply the active adapters'
prompts.
"""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import AdapterConfig, Method, register_method, register_preset

__all__ = ["PromptTuningConfig"]

_COMBINES = ("prefix", "prefix_after_bos")
_PLACEMENTS = ("input", "embeddings_output")
_INSERT: ContextVar[bool] = ContextVar("fxadapt_prompt_insert", default=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning. Defaults are AdapterHub's ``PromptTuningConfig``.

    Args:
        prompt_length: number of soft tokens.
        prompt_init: ``"random_uniform"`` (U(-scale, scale)) or ``"from_string"`` (the embeddings of
            ``prompt_init_ids``, token ids of a text, repeated/truncated to the prompt length).
        prompt_init_ids: token ids for ``"from_string"`` (tokenize your text with the model's tokenizer).
        random_uniform_scale: the scale of the uniform init.
        combine: ``"prefix"`` or ``"prefix_after_bos"``.
        placement: ``"input"`` (default: in front of the word embeddings where the model takes ``inputs_embeds``,
            so the prompt gets positions, as PEFT does) or ``"embeddings_output"`` (AdapterHub's: into the output of
            the ``embed`` site, e.g. after BERT's position embeddings and LayerNorm; positions and token types are
            the real tokens' own). AdapterHub checkpoints load with the latter.
    """

    method = "prompt_tuning"

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_ids: tuple[int, ...] = ()
    random_uniform_scale: float = 0.5
    combine: str = "prefix"
    placement: str = "input"

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ConfigError(
                f"PromptTuningConfig.{field}={getattr(self, field)!r} is invalid; expected {expected}"
            )

        if (
            isinstance(self.prompt_length, bool)
            or not isinstance(self.prompt_length, int)
            or self.prompt_length <= 0
        ):
            fail("prompt_length", "an int > 0")
        if self.prompt_init not in ("random_uniform", "from_string"):
            fail("prompt_init", "'random_uniform' or 'from_string'")
        object.__setattr__(self, "prompt_init_ids", tuple(self.prompt_init_ids))
        if self.prompt_init == "from_string" and not self.prompt_init_ids:
            fail("prompt_init_ids", "token ids of the init text when prompt_init='from_string'")
        if self.combine not in _COMBINES:
            fail("combine", f"one of {list(_COMBINES)}")
        if not isinstance(self.random_uniform_scale, (int, float)) or self.random_uniform_scale <= 0:
            fail("random_uniform_scale", "a number > 0")
        if self.placement not in _PLACEMENTS:
            fail("placement", f"one of {list(_PLACEMENTS)}")


class SoftPrompt(nn.Module):
    def __init__(self, config: PromptTuningConfig, hidden_size: int, embedding: nn.Module | None):
        super().__init__()
        self.combine = config.combine
        self.placement = config.placement
        self.prompt = nn.Parameter(torch.empty(config.prompt_length, hidden_size))
        with torch.no_grad():
            if config.prompt_init == "from_string" and isinstance(embedding, nn.Embedding):
                ids = torch.tensor(config.prompt_init_ids).repeat(config.prompt_length)[
                    : config.prompt_length
                ]
                self.prompt.copy_(embedding(ids.to(embedding.weight.device)))
            else:
                self.prompt.uniform_(-config.random_uniform_scale, config.random_uniform_scale)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        if self.combine == "prefix":
            return torch.cat([prompt, hidden], dim=1)
        return torch.cat([hidden[:, :1], prompt, hidden[:, 1:]], dim=1)


def _active_prompts(model: nn.Module) -> list[SoftPrompt]:
    from ..parts import active_parts

    return [module for _, module in active_parts(model, "embed")]


def _extend(t: torch.Tensor, extra: int, value: int, combine: str) -> torch.Tensor:
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    if combine == "prefix":
        return torch.cat([pad, t], dim=1)
    return torch.cat([t[:, :1], pad, t[:, 1:]], dim=1)


def _model_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    prompts = _active_prompts(model)
    if not prompts:
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    insert = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
    n = sum(p.prompt.shape[0] for p in prompts)
    combine = prompts[0].combine
    placements = {p.placement for p in prompts}
    if len(placements) > 1:
        raise ConfigError(
            f"the active prompt-tuning adapters mix placements {sorted(placements)}; activate prompts of one placement"
        )
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = _extend(mask, n, 1, combine)
    labels = kwargs.get("labels")
    if insert and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        kwargs["labels"] = _extend(labels, n, -100, combine)
    if placements == {
        "embeddings_output"
    }:  # AdapterHub's: the embed hook inserts it; positions stay the tokens'
        model.__dict__["_fxadapt_prompt_token"] = _INSERT.set(insert)
        return args, kwargs
    types = kwargs.get("token_type_ids")
    if insert and isinstance(types, torch.Tensor) and types.dim() == 2:
        kwargs["token_type_ids"] = _extend(types, n, 0, combine)
    for key in ("position_ids", "cache_position"):  # positions count the prompt tokens in front
        pos = kwargs.get(key)
        if isinstance(pos, torch.Tensor) and pos.is_floating_point() is False and pos.dim() in (1, 2):
            shifted = pos + n
            if insert:
                front = torch.arange(n, device=pos.device, dtype=pos.dtype)
                front = front if pos.dim() == 1 else front.expand(pos.shape[0], -1)
                shifted = torch.cat([front, shifted], dim=-1)
            kwargs[key] = shifted
    embed = model.__dict__.get("_fxadapt_prompt_embed")
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if insert and embed is not None and ids is not None and kwargs.get("inputs_embeds") is None:
        # the embedding module is the input embedding: insert the prompt into inputs_embeds, so that the model
        # derives every length (positions, masks, caches) from the prompted sequence
        token = _INSERT.set(False)  # our own embedding call must not trigger the embedding hook
        try:
            hidden = embed(ids)
        finally:
            _INSERT.reset(token)
        for prompt in prompts:
            hidden = prompt(hidden)
        kwargs.pop("input_ids", None)
        args = tuple(a for a in args if a is not ids)
        kwargs["inputs_embeds"] = hidden
        insert = False  # done here, not in the embedding hook
    model.__dict__["_fxadapt_prompt_token"] = _INSERT.set(insert)
    return args, kwargs


def _model_post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    token = model.__dict__.pop("_fxadapt_prompt_token", None)
    if token is not None:
        _INSERT.reset(token)


def _embed_hook(root: nn.Module, module: nn.Module, args: tuple, output: Any) -> Any:
    if not _INSERT.get() or not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    for prompt in _active_prompts(root):
        output = prompt(output)
    return output


def _pad_mask(mask: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """A layer's 4-D attention mask built for ``length - n`` tokens, for ``length`` (the prompt in front): key
    columns and query rows that attend everything (``True`` / additive ``0``), as AdapterHub pads the mask of its
    SDPA attention (``prefix_attention_mask(mask, [2, 3])``: the prompt's queries see padding keys too)."""
    short = length - n
    attend = True if mask.dtype == torch.bool else 0.0
    if mask.shape[-1] == short:
        mask = torch.nn.functional.pad(mask, (n, 0), value=attend)
    if mask.shape[-2] == short and short > 0:
        mask = torch.nn.functional.pad(mask, (0, 0, n, 0), value=attend)
    return mask


def _layer_mask_hook(root: nn.Module, layer: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``placement="embeddings_output"``: where the model built the layers' mask for the unprompted length
    (transformers 4.x BERT builds it from ``input_ids``), extend it to the prompted hidden states (AdapterHub
    extends the mask in each layer too)."""
    prompts = [p for p in _active_prompts(root) if p.placement == "embeddings_output"]
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not prompts or not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return None
    n, length = sum(p.prompt.shape[0] for p in prompts), hidden.shape[1]

    def fix(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() == 4 and length - n in value.shape[-2:]:
            return _pad_mask(value, n, length)
        return value

    return tuple(fix(a) for a in args), {k: fix(v) for k, v in kwargs.items()}


class _PromptHooks:
    """The model's and the embedding module's hooks, removed together."""

    def __init__(self, model: nn.Module, embed: nn.Module, layers: list[nn.Module]):
        import functools
        import inspect

        self.model = model
        get_emb = getattr(model, "get_input_embeddings", None)
        word_embeddings = get_emb() if callable(get_emb) else None
        try:
            takes_embeds = "inputs_embeds" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            takes_embeds = False
        if isinstance(word_embeddings, nn.Module) and takes_embeds:
            # the prompt goes in front of the word embeddings (Lester et al.); the model then derives positions,
            # masks and caches from the prompted sequence
            model.__dict__["_fxadapt_prompt_embed"] = word_embeddings
        self.handles = (
            model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True),
            model.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True),
            embed.register_forward_hook(functools.partial(_embed_hook, model)),
            *(
                layer.register_forward_pre_hook(functools.partial(_layer_mask_hook, model), with_kwargs=True)
                for layer in layers
            ),
        )

    def remove(self) -> None:
        self.model.__dict__.pop("_fxadapt_prompt_embed", None)
        for h in self.handles:
            h.remove()


@register_method
class PromptTuningMethod(Method):
    name = "prompt_tuning"
    config_class = PromptTuningConfig

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        return ()  # no layer site: the prompt is a model part

    def build_model_parts(self, config, context):  # type: ignore[override]
        context.embed()  # raises SiteNotFoundError where no module feeds the first layer
        return {(0, "embed"): SoftPrompt(config, context.hidden_size, context.input_embeddings())}

    def model_hooks(self, config, context):  # type: ignore[override]
        _, embed = context.embed()
        return {"prompt": lambda model: _PromptHooks(model, embed, context.layers)}


register_preset("prompt_tuning", lambda: PromptTuningConfig())

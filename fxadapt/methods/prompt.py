"""Prompt tuning (Lester et al., 2021) at the ``embed`` site: learned soft tokens in front of the input embeddings.

Where the model takes ``inputs_embeds`` (text models), the prompt (``[prompt_length, hidden]``) goes in front of
the word embeddings (``combine="prefix"``; ``"prefix_after_bos"``: after the first token) and the model derives
positions, masks and caches from the prompted sequence; otherwise (ViT) it is inserted into the output of the
``embed`` site, the module whose output the first layer receives (found structurally in the priming forward). The
2-D ``attention_mask``, ``token_type_ids`` and ``labels`` (with -100) are extended to match. With a KV cache (``generate``), the prompt is inserted only while the cache
is empty; the mask keeps its extra columns on every step. As in AdapterHub, outputs include the prompt positions.

Prompt tuning acts on the model's input, outside the layers' generated code: two hooks (model and embedding
module) apply it while the adapter is in the active setup.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..calls import HookScope, effective_setup
from ..errors import ConfigError, SiteNotFoundError
from .base import AdapterConfig, Method, register_method, register_preset

__all__ = ["PromptTuningConfig"]

_COMBINES = ("prefix", "prefix_after_bos")
_INSERT_CALL = HookScope("fxadapt_prompt_insert", default=True)  # pre-hook -> post-hook, per thread/task


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
    """

    method = "prompt_tuning"

    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_ids: tuple[int, ...] = ()
    random_uniform_scale: float = 0.5
    combine: str = "prefix"

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


class SoftPrompt(nn.Module):
    def __init__(self, config: PromptTuningConfig, hidden_size: int, embedding: nn.Module | None):
        super().__init__()
        self.combine = config.combine
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
    from ..model import CONTAINER, get_state, layers_of

    state = get_state(model)
    setup = effective_setup(model, state)  # serve: a per-call setup (fxadapt.using) or the active one
    if setup is None:
        return []
    first = layers_of(model)[1][0]
    container = first._modules.get(CONTAINER)
    out = []
    for name in setup.names():
        if container is not None and name in container and "embed" in container[name]:
            out.append(container[name]["embed"])
    return out


def _extend(t: torch.Tensor, extra: int, value: int, combine: str) -> torch.Tensor:
    pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
    if combine == "prefix":
        return torch.cat([pad, t], dim=1)
    return torch.cat([t[:, :1], pad, t[:, 1:]], dim=1)


def _model_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    prompts = _active_prompts(model)
    if not prompts:
        _INSERT_CALL.enter(False)  # serve: entered on every call, so the post-hook's exit always matches
        return None
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    insert = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
    n = sum(p.prompt.shape[0] for p in prompts)
    combine = prompts[0].combine
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        kwargs["attention_mask"] = _extend(mask, n, 1, combine)
    labels = kwargs.get("labels")
    if insert and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        kwargs["labels"] = _extend(labels, n, -100, combine)
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
        token = _INSERT_CALL.var.set(False)  # our own embedding call must not trigger the embedding hook
        try:
            hidden = embed(ids)
        finally:
            _INSERT_CALL.var.reset(token)
        for prompt in prompts:
            hidden = prompt(hidden)
        kwargs.pop("input_ids", None)
        args = tuple(a for a in args if a is not ids)
        kwargs["inputs_embeds"] = hidden
        insert = False  # done here, not in the embedding hook
    _INSERT_CALL.enter(insert)  # serve: per thread/task, not a token kept on the (shared) model
    return args, kwargs


def _model_post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    _INSERT_CALL.exit()


def _embed_hook(root: nn.Module, module: nn.Module, args: tuple, output: Any) -> Any:
    if not _INSERT_CALL.get() or not isinstance(output, torch.Tensor) or output.dim() != 3:
        return None
    for prompt in _active_prompts(root):
        output = prompt(output)
    return output


def install_prompt_hooks(model: nn.Module, embed: nn.Module) -> None:
    if "_fxadapt_prompt_hooks" in model.__dict__:
        return
    import functools
    import inspect

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
    handles = (
        model.register_forward_pre_hook(_model_pre_hook, with_kwargs=True),
        model.register_forward_hook(_model_post_hook, with_kwargs=True, always_call=True),
        embed.register_forward_hook(functools.partial(_embed_hook, model)),
    )
    model.__dict__["_fxadapt_prompt_hooks"] = handles


def remove_prompt_hooks(model: nn.Module) -> None:
    model.__dict__.pop("_fxadapt_prompt_embed", None)
    for h in model.__dict__.pop("_fxadapt_prompt_hooks", ()):
        h.remove()


def find_embed_module(model: nn.Module, first_layer: nn.Module, example_inputs: Any) -> tuple[str, nn.Module]:
    """The module whose output tensor is the first layer's hidden-state input (found with one forward)."""
    from ..model import _call, default_example_inputs

    outputs: list[tuple[str, nn.Module, torch.Tensor]] = []  # the tensors are kept alive: ids are not reused
    handles = []
    for name, module in model.named_modules():
        if module is model or module is first_layer:
            continue

        def hook(m, a, out, name=name):
            if isinstance(out, torch.Tensor):
                outputs.append((name, m, out))

        handles.append(module.register_forward_hook(hook))
    seen: list[Any] = []
    handles.append(
        first_layer.register_forward_pre_hook(
            lambda m, a, kw: seen.append(a[0] if a else kw.get("hidden_states")), with_kwargs=True
        )
    )
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            was = model.training
            model.eval()
            _call(model, example_inputs if example_inputs is not None else default_example_inputs(model))
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    # the outermost module returning the very tensor the first layer receives (its hook fires last)
    match = [(name, m) for name, m, out in outputs if seen and out is seen[0]]
    if not match:
        raise SiteNotFoundError(
            f"no 'embed' site in {type(model).__name__}: no module's output is the first layer's input "
            "(prompt tuning needs an embedding module feeding the layers)"
        )
    return match[-1]


@register_method
class PromptTuningMethod(Method):
    name = "prompt_tuning"
    config_class = PromptTuningConfig
    model_level = True

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        return ("embed",)


register_preset("prompt_tuning", lambda: PromptTuningConfig())

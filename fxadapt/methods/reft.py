"""ReFT (Wu et al., 2024): interventions on a layer's output at a few sequence positions; LoReFT, NoReFT, DiReFT.

AdapterHub's definitions (``adapters/methods/reft.py``): after every selected layer, the hidden states at the first
``prefix_positions`` and the last ``suffix_positions`` real (non-padding) tokens of each row are replaced by

    h' = dropout(h + (act(W h + b) - R h) Rᵀ)       W, b: [r, hidden] (``learned_source``), R: [r, hidden]

``R`` (``projection``, no bias) has orthonormal rows under ``orthogonality=True`` (LoReFT: torch's
``nn.utils.parametrizations.orthogonal``, as AdapterHub), is a plain matrix otherwise (NoReFT); DiReFT drops the
``- R h`` term (``subtract_projection=False``). Prefix and suffix positions get their own unit, or one shared unit
with ``tied_weights=True``. Note that the dropout acts on ``h'`` as a whole, as in AdapterHub.

The positions come from the model-level ``attention_mask`` (first real token: ``argmax`` of the mask; count of real
tokens: its sum), as AdapterHub reads them in its forward context; without a mask, or where the mask's length is not
the layer's sequence plus the cached tokens (T5's decoder layers see the encoder's mask), the rows are taken as
unpadded. With a KV cache the positions are
absolute in the whole sequence (the mask covers the cached tokens too): a prefix position acts on the prompt's
first tokens only, never again on generated ones. A position beyond a row's length is skipped.

ReFT acts on the layer's output, outside the layer's generated code: a *model part* per layer (``methods/base.py``)
applied by a forward hook on the layer; a model pre-hook keeps the mask for the forward in a context variable (per
thread). There is no no-op initialisation (AdapterHub's neither): ``learned_source`` and ``R`` start random.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CompositionError, ConfigError
from .base import AdapterConfig, Method, register_method, register_preset
from .bottleneck import activation, activation_names

__all__ = ["ReftConfig", "ReftModule", "ReftUnit", "reft_positions"]

PART = "reft"
# the attention masks of the model forwards running in this thread/context (nested forwards stack)
_MASKS: ContextVar[tuple[Any, ...]] = ContextVar("fxadapt_reft_masks", default=())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReftConfig(AdapterConfig):
    """ReFT. Defaults are AdapterHub's ``LoReftConfig`` (``"loreft"``); ``"noreft"`` sets ``orthogonality=False``,
    ``"direft"`` also ``subtract_projection=False``.

    Args:
        layers: ``"all"`` or the layer indices (over all layer lists) to intervene after.
        prefix_positions: how many first real tokens of each row are intervened on.
        suffix_positions: how many last real tokens.
        r: rank of the intervention.
        orthogonality: ``R`` with orthonormal rows (LoReFT).
        tied_weights: one unit for prefix and suffix positions (default: one each).
        subtract_projection: the ``- R h`` term (False: DiReFT).
        dropout: dropout on the intervened states.
        non_linearity: activation after ``learned_source`` (None: identity).
    """

    method: ClassVar[str] = "reft"

    layers: str | tuple[int, ...] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None

    def __post_init__(self) -> None:
        def fail(field: str, expected: str) -> None:
            raise ConfigError(f"ReftConfig.{field}={getattr(self, field)!r} is invalid; expected {expected}")

        layers = self.layers
        if layers != "all":
            layers = tuple(layers) if isinstance(layers, (list, tuple)) else None
            if layers is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                fail("layers", "'all' or a list of layer indices (ints >= 0)")
            object.__setattr__(self, "layers", layers)
        for field in ("prefix_positions", "suffix_positions"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                fail(field, "an int >= 0")
        if self.prefix_positions + self.suffix_positions == 0:
            fail("prefix_positions", "prefix_positions + suffix_positions > 0 (positions to intervene on)")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            fail("r", "an int > 0")
        for field in ("orthogonality", "tied_weights", "subtract_projection"):
            if not isinstance(getattr(self, field), bool):
                fail(field, "True or False")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            fail("dropout", "a probability in [0, 1)")
        if self.non_linearity is not None and (
            not isinstance(self.non_linearity, str) or self.non_linearity.lower() not in activation_names()
        ):
            fail("non_linearity", f"None or one of {activation_names()}")

    @classmethod
    def from_adapterhub(cls, data: Mapping[str, Any]) -> ReftConfig:
        """The config equal to AdapterHub's ``ReftConfig`` dict. ``subtract_projection`` is a class attribute there,
        not a field, so ``adapters`` 1.3.0 saves none and reloads every ReFT adapter with ``True`` (a DiReFT adapter
        comes back as NoReFT); a missing one is read as ``adapters`` reads it."""
        data = dict(data)
        for key, ok in (("output_reft", True), ("dtype", None)):
            if data.get(key, ok) != ok:
                raise ConfigError(
                    f"from_adapterhub: ReFT {key}={data[key]!r} is not supported by fxadapt; expected {ok!r}"
                )
        layers = data.get("layers", "all")
        return cls(
            layers=layers if layers == "all" else tuple(layers),
            prefix_positions=data.get("prefix_positions", 3),
            suffix_positions=data.get("suffix_positions", 0),
            r=data.get("r", 1),
            orthogonality=bool(data.get("orthogonality", True)),
            tied_weights=bool(data.get("tied_weights", False)),
            subtract_projection=bool(data.get("subtract_projection", True)),
            dropout=data.get("dropout", 0.05),
            non_linearity=data.get("non_linearity"),
        )

    def to_adapterhub(self) -> dict[str, Any]:
        return {
            "architecture": "reft",
            "layers": self.layers if self.layers == "all" else list(self.layers),
            "prefix_positions": self.prefix_positions,
            "suffix_positions": self.suffix_positions,
            "r": self.r,
            "orthogonality": self.orthogonality,
            "tied_weights": self.tied_weights,
            "subtract_projection": self.subtract_projection,  # not a field there: adapters ignores it
            "dropout": self.dropout,
            "non_linearity": self.non_linearity,
            "dtype": None,
            "output_reft": True,
            "init_weights_seed": None,
        }


class ReftUnit(nn.Module):
    """``h → dropout(h + (act(W h + b) - R h) Rᵀ)`` (without ``- R h`` for DiReFT)."""

    def __init__(self, hidden: int, config: ReftConfig):
        super().__init__()
        self.orthogonal = config.orthogonality
        self.subtract_projection = config.subtract_projection
        self.learned_source = nn.Linear(hidden, config.r, bias=True)
        projection = nn.Linear(hidden, config.r, bias=False)
        self.projection = (
            nn.utils.parametrizations.orthogonal(projection) if config.orthogonality else projection
        )
        self.non_linearity = (
            nn.Identity() if config.non_linearity is None else activation(config.non_linearity)
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        source = self.non_linearity(self.learned_source(h))
        weight = self.projection.weight  # the orthogonalised R under the parametrization
        if self.subtract_projection:
            source = source - torch.nn.functional.linear(h, weight)
        return self.dropout(h + source @ weight)


def reft_positions(
    mask: torch.Tensor | None, batch: int, seq: int, prefix: int, suffix: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-relative indices ``[batch, prefix]`` and ``[batch, suffix]`` of the intervened positions, ``seq``
    (one past the end) where a position is not in this chunk of ``seq`` tokens."""
    if mask is not None and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= seq:
        offsets = mask.argmax(1).to(device)
        lengths = (mask == 1).sum(-1).to(device)
        past = mask.shape[1] - seq  # tokens before this chunk (a KV cache)
    else:
        offsets = torch.zeros(batch, dtype=torch.long, device=device)
        lengths = torch.full((batch,), seq, dtype=torch.long, device=device)
        past = 0
    # as AdapterHub: prefix positions count from the first real token (into the padding of a shorter row), suffix
    # positions back from one past the last real token; a position outside the sequence is skipped
    pre = offsets[:, None] + torch.arange(prefix, device=device)[None]
    suf = offsets[:, None] + lengths[:, None] + torch.arange(-suffix, 0, device=device)[None]

    def relative(idx: torch.Tensor) -> torch.Tensor:
        rel = idx - past
        return torch.where((idx >= 0) & (rel >= 0) & (rel < seq), rel, seq)

    return relative(pre), relative(suf)


class ReftModule(nn.Module):
    """One layer's ReFT: the units and where they act (AdapterHub's ``ReftModule``, same parameter names)."""

    def __init__(self, hidden: int, config: ReftConfig):
        super().__init__()
        self.prefix_positions = config.prefix_positions
        self.suffix_positions = config.suffix_positions
        self.tied_weights = config.tied_weights
        self.units = nn.ModuleList(ReftUnit(hidden, config) for _ in range(1 if config.tied_weights else 2))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = hidden.shape
        pre, suf = reft_positions(mask, b, t, self.prefix_positions, self.suffix_positions, hidden.device)
        padded = torch.cat([hidden, hidden.new_zeros(b, 1, d)], dim=1)  # slot t: positions not in this chunk

        def gather(idx: torch.Tensor) -> torch.Tensor:
            return padded.gather(1, idx[..., None].expand(-1, -1, d))

        prefix, suffix = gather(pre), gather(suf)
        if self.tied_weights:
            both = self.units[0](torch.cat([prefix, suffix], dim=1))
            prefix, suffix = both[:, : self.prefix_positions], both[:, self.prefix_positions :]
        else:
            prefix, suffix = self.units[0](prefix), self.units[1](suffix)
        out = padded
        if self.prefix_positions:
            out = out.scatter(1, pre[..., None].expand(-1, -1, d), prefix.to(out.dtype))
        if self.suffix_positions:  # after the prefix: a position in both takes the suffix unit's value
            out = out.scatter(1, suf[..., None].expand(-1, -1, d), suffix.to(out.dtype))
        return out[:, :t]


class _ReftHooks:
    """A model pre-hook keeping the attention mask of the forward, and a forward hook on every layer applying the
    active ReFT adapters' parts to its output."""

    def __init__(self, model: nn.Module):
        from ..model import layers_of

        self.model = model
        _, layers = layers_of(model)
        self.handles = [
            model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
            model.register_forward_hook(self._model_post, with_kwargs=True, always_call=True),
            *(layer.register_forward_hook(self._layer_post) for layer in layers),
        ]

    def _model_pre(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        _MASKS.set((*_MASKS.get(), (mask, int(past))))

    def _model_post(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        _MASKS.set(_MASKS.get()[:-1])

    def _parts(self, layer: nn.Module) -> list[nn.Module]:
        from ..compose import Stack
        from ..model import CONTAINER, get_state

        state = get_state(self.model)
        container = layer._modules.get(CONTAINER)
        if state is None or state.active is None or container is None:
            return []
        parts = [container[n][PART] for n in state.active.names() if n in container and PART in container[n]]
        if parts and not (
            isinstance(state.active, Stack) and all(isinstance(c, str) for c in state.active.children)
        ):
            raise CompositionError(
                f"ReFT adapters act on the layer output and run under a Stack of adapter names only, not under "
                f"{state.active!r}"
            )
        return parts

    def _layer_post(self, layer: nn.Module, args: tuple, output: Any) -> Any:
        parts = self._parts(layer)
        if not parts:
            return None
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        mask, past = _MASKS.get()[-1] if _MASKS.get() else (None, 0)
        if mask is not None and mask.shape[1] != past + hidden.shape[1]:
            mask = None  # the mask of another sequence (T5's decoder layers see the encoder's): rows unpadded
        for part in parts:
            hidden = part(hidden, mask)
        if isinstance(output, torch.Tensor):
            return hidden
        return (
            type(output)((hidden, *output[1:]))
            if isinstance(output, tuple)
            else _replace_first(output, hidden)
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _replace_first(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, list):
        return [hidden, *output[1:]]
    if isinstance(output, dict):  # a ModelOutput
        key = next(iter(output))
        output[key] = hidden
        return output
    raise CompositionError(
        f"ReFT cannot find the hidden states in a layer output of type {type(output).__name__}"
    )


@register_method
class ReftMethod(Method):
    name = "reft"
    config_class = ReftConfig

    def site_kinds(self, config: AdapterConfig) -> tuple[str, ...]:
        return ()  # no layer site: the layer output is changed by a hook

    def applies_to_layer(self, config: AdapterConfig, layer_index: int) -> bool:
        assert isinstance(config, ReftConfig)
        return config.layers == "all" or layer_index in config.layers

    def build_model_parts(self, config, context):  # type: ignore[override]
        hidden = context.hidden_size
        if hidden is None:
            raise ConfigError(
                f"ReFT needs the layers' hidden size; {type(context.model).__name__} has no residual site"
            )
        return {
            (i, PART): ReftModule(hidden, config)
            for i in range(len(context.layers))
            if self.applies_to_layer(config, i)
        }

    def model_hooks(self, config, context):  # type: ignore[override]
        return {"reft": _ReftHooks}

    def why_not_mergeable(self, config: AdapterConfig) -> str | None:
        return "ReFT changes hidden states at chosen positions, not the weights"


register_preset("loreft", lambda: ReftConfig())
register_preset("noreft", lambda: ReftConfig(orthogonality=False))
register_preset("direft", lambda: ReftConfig(orthogonality=False, subtract_projection=False))

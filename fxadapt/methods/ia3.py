"""(IA)^3 (Liu et al., 2022): learned elementwise scales on projection outputs.

AdapterHub defines ``IA3Config`` as a ``LoRAConfig`` with ``composition_mode="scale"``, ``r=1``, ``alpha=1``, init
``"ia3"`` (ones), on the self-attention keys and values and the FFN intermediate projection; its ``IA3`` module holds
one vector ``B`` ([out, 1]) per projection and computes

    y' = (W x + b) ⊙ (alpha · B)

so the scale multiplies the bias too, and an all-ones B is exactly the base model. fxadapt uses the same config
fields and the same math (:class:`~fxadapt.methods.lora.IA3Vector`); merging scales the weight rows and the bias
(``Conv1D``: columns) and unmerging divides them again.

Sites: ``attn.k``, ``attn.v`` and ``ffn.up`` (AdapterHub's ``intermediate_lora``) by default. On LLaMA-style
models AdapterHub's mixin adapts ``mlp.down_proj`` under the name "intermediate"; fxadapt places ``ffn.up`` by
graph structure on every architecture (``sites=("attn.k", "attn.v", "ffn.down")`` reproduces AdapterHub there).

PEFT's (IA)^3 scales the *input* of its ``feedforward_modules`` instead (its default on BERT: ``output.dense``,
which also matches ``attention.output.dense``; on LLaMA ``down_proj``):

    y' = W (x ⊙ (alpha · l)) + b                 l: [in, 1]

``IA3Config(feedforward_modules=[...])`` names those sites (kinds like ``"ffn.down"``, or module names as in
``target_modules``); :class:`IA3InputVector` holds the vector. Merging scales the weight's input columns (``Conv1D``:
rows); the bias is untouched. The input of a fused projection is shared by its q/k/v slices, so slice sites cannot
be input-scaled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .base import register_method, register_preset, widened
from .lora import LoRAMethod
from .lora_config import LoRAConfig, _as_tuple

__all__ = ["IA3Config", "IA3InputVector", "IA3Method"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(LoRAConfig):
    """(IA)^3: a :class:`LoRAConfig` in ``"scale"`` mode. Defaults are AdapterHub's ``IA3Config`` (``"ia3"``).

    Args:
        sites / target_modules: as in :class:`LoRAConfig`; default ``("attn.k", "attn.v", "ffn.up")``.
        r: must be 1 (one scale per output feature).
        alpha: the scale is ``alpha · B`` (default 1).
        init_weights: ``"ia3"`` (ones: a no-op at init), ``"lora"`` (zeros) or ``"bert"`` (N(0, 0.02)).
        composition_mode: must be ``"scale"`` (use :class:`LoRAConfig` for ``"add"``).
        leave_out: layer indices that get no adapter.
        feedforward_modules: sites whose *input* is scaled (PEFT's ``feedforward_modules``): site kinds
            (``"ffn.down"``) or module names matched like ``target_modules`` (``"output.dense"``). Default none.
    """

    method: ClassVar[str] = "ia3"
    default_sites: ClassVar[tuple[str, ...]] = ("attn.k", "attn.v", "ffn.up")

    r: int = 1
    alpha: float = 1
    init_weights: str = "ia3"
    composition_mode: str = "scale"
    feedforward_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.composition_mode != "scale":
            self._fail(
                "composition_mode",
                self.composition_mode,
                "'scale' ((IA)^3 scales outputs; LoRAConfig(composition_mode='add') is LoRA)",
            )
        ff = _as_tuple(self.feedforward_modules) or ()
        if not all(isinstance(n, str) and n.strip(". ") for n in ff):
            self._fail(
                "feedforward_modules", self.feedforward_modules, "a list of site kinds or module names"
            )
        object.__setattr__(self, "feedforward_modules", ff)
        super().__post_init__()

    @classmethod
    def from_peft(cls, config: Any, model: Any = None) -> IA3Config:  # type: ignore[override]
        """The config equal to a PEFT ``IA3Config`` (or its dict): ``target_modules`` and ``feedforward_modules``
        (the feed-forward ones scale their input). Unset ones (PEFT's default ``IA3Config()``) are PEFT's own
        defaults for ``model``'s type (``peft.utils.constants``, read when PEFT is installed)."""
        data = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(data, Mapping):
            raise ConfigError(f"from_peft expects a peft IA3Config or a dict, got {type(config).__name__}")
        peft_type = str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "IA3"))
        if peft_type.upper() != "IA3":
            raise ConfigError(f"from_peft: peft_type={peft_type!r} is not an (IA)^3 config; expected 'IA3'")
        targets, feedforward = data.get("target_modules"), data.get("feedforward_modules")
        if targets is None:
            targets, default_ff = _peft_ia3_defaults(model)
            feedforward = default_ff if feedforward is None else feedforward
        for field, value in (("target_modules", targets), ("feedforward_modules", feedforward or [])):
            if isinstance(value, str):
                raise ConfigError(
                    f"from_peft: {field}={value!r} is a regex over full module paths; expected a list of module "
                    "names (loading a PEFT checkpoint needs none: its keys say where the vectors are)"
                )
        ignored = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                   "inference_mode", "fan_in_fan_out", "init_ia3_weights", "modules_to_save", "target_modules",
                   "feedforward_modules"}  # fmt: skip
        for key, value in data.items():
            if key not in ignored and value not in (None, False, {}, [], ()):
                raise ConfigError(f"from_peft: (IA)^3 {key}={value!r} is not supported by fxadapt")
        return cls(target_modules=tuple(targets), feedforward_modules=tuple(feedforward or ()))


def _peft_ia3_defaults(model: Any) -> tuple[list[str], list[str]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
        )
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS
    except ImportError as exc:
        raise ConfigError(
            "from_peft: target_modules=None means PEFT's per-model defaults; install peft or pass target_modules"
        ) from exc
    if model_type not in TARGETS:
        raise ConfigError(
            f"from_peft: target_modules=None and PEFT has no (IA)^3 defaults for model type {model_type!r}"
            f"{' (pass model=...)' if model is None else ''}; pass target_modules and feedforward_modules"
        )
    return list(TARGETS[model_type]), list(FEEDFORWARD.get(model_type, []))


class IA3InputVector(nn.Module):
    """One (IA)^3 vector scaling a projection's input: ``forward() = alpha · l`` ([in]); PEFT's feed-forward
    ``ia3_l`` ([1, in] there)."""

    scales_input = True

    def __init__(self, in_features: int, config: LoRAConfig, site: Any, transposed: bool):
        super().__init__()
        if site.out_slice is not None:
            raise ConfigError(
                f"(IA)^3 on the input of {site.kind!r} is impossible: it is a slice of the fused projection "
                f"{site.module!r}, whose input the other slices share; scale the whole projection (attn.qkv)"
            )
        self.lora_B = nn.Parameter(torch.zeros(in_features, 1))
        self.scaling = config.scaling
        self.transposed = transposed
        with torch.no_grad():
            if config.init_weights == "ia3":
                nn.init.ones_(self.lora_B)
            elif config.init_weights == "bert":
                nn.init.normal_(self.lora_B, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.lora_B.view(-1) * self.scaling

    @torch.no_grad()
    def merge_into(self, projection: nn.Module, sign: int) -> None:
        """Scale (``sign=+1``) or unscale the weight's input columns (``Conv1D`` stores ``[in, out]``: rows)."""
        v = widened(self.forward())
        factor = v.view(-1, 1) if self.transposed else v.view(1, -1)
        w = projection.weight
        w.copy_((widened(w) * factor if sign > 0 else widened(w) / factor).to(w.dtype))

    def extra_repr(self) -> str:
        return f"input scale, in={self.lora_B.shape[0]}"


@register_method
class IA3Method(LoRAMethod):
    name = "ia3"
    config_class = IA3Config


register_preset("ia3", lambda: IA3Config())

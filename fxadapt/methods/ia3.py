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
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .base import register_method, register_preset
from .lora import LoRAConfig, LoRAMethod

__all__ = ["IA3Config", "IA3Method"]


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
    """

    method: ClassVar[str] = "ia3"
    default_sites: ClassVar[tuple[str, ...]] = ("attn.k", "attn.v", "ffn.up")

    r: int = 1
    alpha: float = 1
    init_weights: str = "ia3"
    composition_mode: str = "scale"

    def __post_init__(self) -> None:
        if self.composition_mode != "scale":
            self._fail(
                "composition_mode",
                self.composition_mode,
                "'scale' ((IA)^3 scales outputs; LoRAConfig(composition_mode='add') is LoRA)",
            )
        super().__post_init__()


@register_method
class IA3Method(LoRAMethod):
    name = "ia3"
    config_class = IA3Config


register_preset("ia3", lambda: IA3Config())

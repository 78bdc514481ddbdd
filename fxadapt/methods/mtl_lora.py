"""MTL-LoRA (Yang et al., 2024): LoRA with a task-specific diagonal and several up-projections mixed by learned
weights, AdapterHub's ``MTLLoRAConfig`` (``"mtl_lora"``; ``adapters/methods/lora.py`` ``MTLLoRA``).

With ``x' = dropout(x)``, ``A`` [r, in], the task-specific singular values ``v`` [r], ``n`` up-projections ``B_k``
[out, r] and their weights ``w`` [n]:

    Δx = s · Σ_k ŵ_k B_k (v ⊙ (A x')),      ŵ_k = exp(w_k / τ) / Σ_j exp(w_j / τ),   τ = weights_sharpness

(AdapterHub computes ``exp(w / τ)`` unnormalised and divides by its sum: the same softmax.) ``B`` starts at zero, so
the adapter is a no-op at init; it is linear in ``x`` and merges like LoRA (``W ± s Σ_k ŵ_k B_k diag(v) A``).

Each MTL-LoRA adapter is one task's; several tasks' adapters route per batch row with fxadapt's ``PerRow`` or
``BatchSplit`` (AdapterHub's ``MultiTask`` block with ``task_ids``). AdapterHub's parameter sharing between the
tasks' adapters (``share_parameters``) has no fxadapt equivalent: each adapter keeps its own A and B.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import register_method, register_preset, widened
from .lora import LoRAConfig, LoRAMethod, _SiteSlice, projection_features

__all__ = ["MTLLoRA", "MTLLoRAConfig", "MTLLoRAMethod"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MTLLoRAConfig(LoRAConfig):
    """MTL-LoRA. Defaults are AdapterHub's ``MTLLoRAConfig``: the :class:`LoRAConfig` fields, plus

    Args:
        n_up_projection: number of up-projections ``B_k`` (>= 1).
        task_specific_matrix_type: ``"singular_values"`` (a learned diagonal; AdapterHub's ``"linear"`` matrix
            cannot be built in adapters 1.3.0 and is not supported).
        weights_sharpness: the temperature ``τ`` of the up-projections' weights (> 0).
    """

    method: ClassVar[str] = "mtl_lora"

    n_up_projection: int = 1
    task_specific_matrix_type: str = "singular_values"
    weights_sharpness: float = 0.05

    def __post_init__(self) -> None:
        n = self.n_up_projection
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            self._fail("n_up_projection", n, "an int >= 1")
        if self.task_specific_matrix_type != "singular_values":
            self._fail(
                "task_specific_matrix_type",
                self.task_specific_matrix_type,
                "'singular_values' (AdapterHub 1.3.0's 'linear' TaskSpecificLinear skips nn.Module.__init__ and "
                "cannot be built)",
            )
        t = self.weights_sharpness
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            self._fail("weights_sharpness", t, "a number > 0")
        super().__post_init__()
        if self.composition_mode != "add" or self.use_dora or self.is_vera:
            self._fail("composition_mode", self.composition_mode, "'add' without DoRA or VeRA for MTL-LoRA")

    @classmethod
    def from_adapterhub(cls, config: Any) -> MTLLoRAConfig:  # type: ignore[override]
        data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"from_adapterhub expects an MTLLoRAConfig or a dict, got {type(config).__name__}"
            )
        base = LoRAConfig.from_adapterhub(data)
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LoRAConfig)}
        return cls(
            **fields,
            n_up_projection=data.get("n_up_projection", 1),
            task_specific_matrix_type=data.get("task_specific_matrix_type", "singular_values"),
            weights_sharpness=data.get("weights_sharpness", 0.05),
        )


class MTLLoRA(_SiteSlice):
    """One projection's MTL-LoRA update ``forward(x) = s Σ_k ŵ_k B_k (v ⊙ A x')`` (zero-padded to the full width)."""

    def __init__(
        self, in_features: int, out_features: int, config: MTLLoRAConfig, out_slice=None, width=None
    ):
        super().__init__(out_slice, width if width is not None else out_features)
        self.in_features, self.out_features = in_features, out_features
        self.scaling = config.scaling
        self.sharpness = float(config.weights_sharpness)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(config.n_up_projection, out_features, config.r))
        self.task_specific = nn.Parameter(torch.ones(config.r))
        self.weights = nn.Parameter(torch.ones(config.n_up_projection))
        with torch.no_grad():  # AdapterHub: LoRA's init of A; B zeros ("lora") or N(0, 0.02) ("bert")
            if config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif config.init_weights == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / config.r)
            elif config.init_weights in ("vera", "ia3"):
                init = nn.init.kaiming_uniform_ if config.init_weights == "vera" else nn.init.ones_
                init(self.lora_A)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def mix(self) -> torch.Tensor:
        return torch.softmax(self.weights / self.sharpness, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), self.lora_A) * self.task_specific  # [..., r]
        ups = torch.einsum("...r,kor->k...o", h, self.lora_B)
        delta = torch.einsum("k,k...o->...o", self.mix(), ups) * self.scaling
        return self.pad(delta, 0.0)

    def delta_weight(self) -> torch.Tensor:
        """``s Σ_k ŵ_k B_k diag(v) A`` ([out, in], fp32)."""
        b = torch.einsum("k,kor->or", widened(self.mix()), widened(self.lora_B))
        return (b * widened(self.task_specific)) @ widened(self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"mtl-lora, n_up_projection={self.lora_B.shape[0]}; " + super().extra_repr()


@register_method
class MTLLoRAMethod(LoRAMethod):
    name = "mtl_lora"
    config_class = MTLLoRAConfig
    formats = ("fxadapt", "adapterhub")  # docs/methods.md (bn)

    def build(self, config, site, layer, layer_index):  # type: ignore[override]
        in_f, width, _ = projection_features(layer.get_submodule(site.module))
        start, stop = site.out_slice if site.out_slice is not None else (0, width)
        return MTLLoRA(in_f, stop - start, config, site.out_slice, width).train(layer.training)

    def build_model_parts(self, config, context):  # type: ignore[override]
        from .lora_outside import outside_paths

        paths = outside_paths(config, context.model, context.paths)
        if paths:
            raise ConfigError(f"MTL-LoRA on modules outside the layers ({paths}) is not supported")
        return {}

    def model_hooks(self, config, context):  # type: ignore[override]
        return {}


register_preset("mtl_lora", lambda: MTLLoRAConfig())

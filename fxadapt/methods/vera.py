"""VeRA (Kopiczko et al., 2024): LoRA with frozen random ``A``, ``B`` shared by all projections of an adapter and
small trained factors per projection, ``LoRAConfig(vera_d=..., vera_b=...)`` (AdapterHub's ``"vera"``).

With ``x' = dropout(x)`` and ``s`` the scaling (``alpha / r``):

    "adapterhub"  Δx = s · V_B B V_D A x'       V_D [r, r] = diag(vera_d), V_B [out, out] = diag(vera_b) at init,
                                                 both trained as full matrices; A [r, in], B [out, r] shared, so
                                                 every adapted projection must have the same shape
                                                 (adapters/methods/lora.py ``Vera``)
    "peft"        Δx = s · λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x')))
                                                 λ_d [r] = vera_d, λ_b [out] = vera_b (PEFT: d_initial, 0) at init;
                                                 A [r, max in], B [max out, r] shared, sliced per projection
                                                 (peft/tuners/vera/layer.py; PEFT has no s: from_peft sets alpha = r)

``A`` and ``B`` are drawn once per adapter (``init_weights="vera"``: Kaiming-uniform, as both peers) and never
trained: the forward reads them detached, so no gradient reaches them even when ``train_adapter`` marks every
adapter parameter trainable. They are parameters (saved with the adapter, as AdapterHub's ``shared_parameters``
and PEFT's ``save_projection=True`` do) owned by the first adapted projection; the others hold a reference.

With ``vera_b = 0`` the update is zero at init. VeRA is linear: it merges like LoRA (``W ± s Δ``); with
``use_dora=True`` (AdapterHub's ``"dvora"``) DoRA's magnitude rescales it (``dora.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import widened
from .dora import DoRAMixin
from .lora import LoRAConfig, _SiteSlice

__all__ = ["VeRA", "VeRAProjections", "build_vera"]


class VeRAProjections(nn.Module):
    """The frozen random ``lora_A`` [r, in] and ``lora_B`` [out, r] one VeRA adapter shares."""

    def __init__(self, r: int, in_features: int, out_features: int, init: str):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r), requires_grad=False)
        with torch.no_grad():
            if init == "vera":
                nn.init.kaiming_uniform_(self.lora_A)
                nn.init.kaiming_uniform_(self.lora_B)
            elif init == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif init == "ia3":
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)
            else:
                nn.init.normal_(self.lora_A, std=1 / r)


class VeRA(_SiteSlice):
    """One projection's VeRA factors; ``forward(x)`` is the update ``s Δ x'`` (zero-padded to the full width)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        shared: VeRAProjections,
        owner: bool,
        out_slice=None,
        width: int | None = None,
    ):
        super().__init__(out_slice, width if width is not None else out_features)
        self.in_features, self.out_features = in_features, out_features
        self.variant = config.variant
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        r = config.r
        if self.variant == "adapterhub":
            self.vera_D = nn.Parameter(torch.diag(torch.full((r,), float(config.vera_d))))
            self.vera_B = nn.Parameter(torch.diag(torch.full((out_features,), float(config.vera_b))))
        else:
            self.lambda_d = nn.Parameter(torch.full((r,), float(config.vera_d)))
            self.lambda_b = nn.Parameter(torch.full((out_features,), float(config.vera_b)))
        if owner:
            self.shared = shared
        else:
            self.__dict__["_shared_ref"] = shared  # saved once, with its owner

    def get_shared(self) -> VeRAProjections:
        return self._modules["shared"] if "shared" in self._modules else self.__dict__["_shared_ref"]

    def set_shared(self, shared: VeRAProjections) -> None:
        if "shared" in self._modules:
            self.shared = shared
        else:
            self.__dict__["_shared_ref"] = shared

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This projection's (detached) ``A`` [r, in] and ``B`` [out, r]."""
        shared = self.get_shared()
        a, b = shared.lora_A.detach(), shared.lora_B.detach()
        return a[:, : self.in_features], b[: self.out_features]

    def delta_of(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.projections()
        if self.variant == "adapterhub":
            h = F.linear(F.linear(F.linear(F.linear(x, a), self.vera_D), b), self.vera_B)
        else:
            h = self.lambda_b * F.linear(self.lambda_d * F.linear(x, a), b)
        return h * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(self.delta_of(self.dropout(x)), 0.0)

    def unscaled_delta_weight(self) -> torch.Tensor:
        a, b = self.projections()
        if self.variant == "adapterhub":
            return self.vera_B @ b @ self.vera_D @ a
        return (self.lambda_b.unsqueeze(-1) * b) @ (self.lambda_d.unsqueeze(-1) * a)

    def delta_weight(self) -> torch.Tensor:
        """``s Δ`` ([out, in], fp32), what merging adds to the weight rows."""
        return widened(self.unscaled_delta_weight()) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"vera ({self.variant}), in={self.in_features}, out={self.out_features}; " + super().extra_repr()
        )


class DoRAVeRA(DoRAMixin, VeRA):
    """VeRA with DoRA's magnitude (AdapterHub's ``"dvora"``)."""

    def __init__(self, *args, weight_rows: torch.Tensor, transposed: bool, **kwargs):
        VeRA.__init__(self, *args, **kwargs)
        self.transposed = transposed
        self.init_magnitude(weight_rows)


def build_vera(
    config: LoRAConfig, shapes: dict[tuple[int, str], tuple[int, int]], first: tuple[int, str]
) -> VeRAProjections:
    """The shared projections of one VeRA adapter whose sites have ``(in, out)`` ``shapes``."""
    if config.variant == "adapterhub":
        distinct = sorted(set(shapes.values()))
        if len(distinct) > 1:
            detail = ", ".join(f"layer {i} {k}: {s[0]}->{s[1]}" for (i, k), s in sorted(shapes.items())[:6])
            raise ConfigError(
                f"VeRA (variant='adapterhub') shares one A [r, in] and B [out, r] across all adapted projections, "
                f"but they differ in shape ({detail}); adapt projections of one shape, or use variant='peft' "
                "(shared matrices sliced per projection)"
            )
        in_f, out_f = shapes[first]
    else:
        in_f = max(s[0] for s in shapes.values())
        out_f = max(s[1] for s in shapes.values())
    return VeRAProjections(config.r, in_f, out_f, config.init_weights)

"""DoRA (Liu et al., 2024): weight-decomposed LoRA, ``LoRAConfig(use_dora=True)`` (AdapterHub's ``"dora"``).

A learned magnitude ``m`` (one per output feature) rescales the adapted projection row by row. AdapterHub and PEFT
compute it differently; ``LoRAConfig.variant`` says whose formula an adapter follows. With ``Δ`` the unscaled
low-rank update (``B A``; VeRA: ``Λ_b B Λ_d A``), ``s`` the scaling and ``‖·‖`` the norm of each weight row:

    "adapterhub"  y = g ⊙ (W x + b + s Δ dropout(x)),     g = m / ‖W + Δ‖          (adapters/methods/lora.py)
    "peft"        y = W x + b + (g - 1) ⊙ (W x') + g ⊙ s Δ x',  x' = dropout(x),
                  g = m / ‖W + s Δ‖, detached from the gradient (the paper's §4.3)   (peft/tuners/lora/dora.py)

AdapterHub scales the bias with ``g`` and leaves ``s`` out of the norm; PEFT keeps the bias unscaled. ``m`` starts
as ``‖W‖`` (PEFT: ``‖W + s Δ‖``), so with ``B = 0`` both are the base projection at init.

Both are linear in ``x`` for fixed weights, so they merge: ``W ← g ⊙ (W + s Δ)`` (AdapterHub also ``b ← g ⊙ b``).
``g`` depends on the unmerged ``W``; it is kept (not saved) while merged so that unmerging inverts it.

The rewrite passes the projection's input, its output and its weight/bias to the adapter module, which returns
the new output (the other LoRA forms return an update that is added).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import widened
from .lora import LoRA, LoRAConfig

__all__ = ["DoRALoRA", "DoRAMixin", "dora_output"]


def dora_output(
    x: torch.Tensor,
    y0: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    magnitude: torch.Tensor,
    delta_weight: torch.Tensor,
    update: torch.Tensor,
    scaling: float,
    variant: str,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference DoRA output rows (see the module docstring). ``weight`` [out, in] and ``bias`` [out] are the
    adapted rows, ``y0 = W x + b`` on them, ``delta_weight`` the unscaled ``Δ`` [out, in], ``update`` = ``s Δ x'``;
    ``x_dropped`` = ``x'`` when dropout is active (PEFT then recomputes ``W x'``)."""
    if variant == "adapterhub":
        norm = torch.linalg.norm(weight + delta_weight, dim=1)
        return (magnitude / norm) * (y0 + update)
    norm = torch.linalg.norm(weight + scaling * delta_weight, dim=1).detach()
    g = magnitude / norm
    if x_dropped is None:
        base = y0 - bias if bias is not None else y0
    else:
        base = F.linear(x_dropped, weight)
    return y0 + (g - 1) * base + g * update


class DoRAMixin:
    """DoRA on top of a low-rank module that provides ``delta(x)`` (``s Δ x'`` on its rows, unpadded),
    ``unscaled_delta_weight()`` and ``dropout``; adds the ``magnitude`` parameter."""

    rewrites_output = True  # forward(x, y0, weight, bias) -> new y0

    start: int
    stop: int
    width: int
    scaling: float
    variant: str
    transposed: bool

    def init_magnitude(self, weight_rows: torch.Tensor) -> None:
        with torch.no_grad():
            w = widened(weight_rows.detach())
            if self.variant == "peft":  # PEFT: ‖W + s Δ‖ of the initial weights
                w = w + self.scaling * widened(self.unscaled_delta_weight())
            self.magnitude = nn.Parameter(torch.linalg.norm(w, dim=1).to(weight_rows.dtype))

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.t() if self.transposed else weight
        return w[self.start : self.stop]

    def forward(
        self, x: torch.Tensor, y0: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        w = self.rows(weight).to(x.dtype)
        b = bias[self.start : self.stop] if bias is not None else None
        sliced = (self.start, self.stop) != (0, self.width)
        y_rows = y0[..., self.start : self.stop] if sliced else y0
        dropping = self.training and not isinstance(self.dropout, nn.Identity)
        x_dropped = self.dropout(x) if dropping else x
        update = self.delta_of(x_dropped)
        out = dora_output(
            x,
            y_rows,
            w,
            b,
            self.magnitude.to(x.dtype),
            self.unscaled_delta_weight().to(x.dtype),
            update,
            self.scaling,
            self.variant,
            x_dropped if dropping and self.variant == "peft" else None,
        )
        if not sliced:
            return out
        return torch.cat([y0[..., : self.start], out, y0[..., self.stop :]], dim=-1)

    @torch.no_grad()
    def merge_into(self, projection: nn.Module, sign: int) -> None:
        """Fold into (``sign=+1``) or take out of (``-1``) the projection's weight rows (and AdapterHub's bias)."""
        weight, bias = projection.weight, getattr(projection, "bias", None)
        w = weight[:, self.start : self.stop] if self.transposed else weight[self.start : self.stop]
        rows = w.t() if self.transposed else w  # [out, in] view
        delta = widened(self.unscaled_delta_weight())
        if sign > 0:
            base = widened(rows)
            shift = delta if self.variant == "adapterhub" else self.scaling * delta
            g = widened(self.magnitude) / torch.linalg.norm(base + shift, dim=1)
            self.__dict__["_merged_g"] = g  # depends on the unmerged W: kept for unmerge (not saved)
            rows.copy_((g.view(-1, 1) * (base + self.scaling * delta)).to(rows.dtype))
            if bias is not None and self.variant == "adapterhub":
                b = bias[self.start : self.stop]
                b.copy_((widened(b) * g).to(b.dtype))
        else:
            g = self.__dict__.pop("_merged_g")
            rows.copy_((widened(rows) / g.view(-1, 1) - self.scaling * delta).to(rows.dtype))
            if bias is not None and self.variant == "adapterhub":
                b = bias[self.start : self.stop]
                b.copy_((widened(b) / g).to(b.dtype))


class DoRALoRA(DoRAMixin, LoRA):
    """LoRA with DoRA's magnitude: ``forward(x, y0, W, b)`` returns the new projection output."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoRAConfig,
        weight_rows: torch.Tensor,
        transposed: bool,
        out_slice=None,
        width: int | None = None,
    ):
        LoRA.__init__(self, in_features, out_features, config, out_slice, width)
        self.variant = config.variant
        self.transposed = transposed
        self.init_magnitude(weight_rows)

    def delta_of(self, x_dropped: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x_dropped, self.lora_A), self.lora_B) * self.scaling

    def unscaled_delta_weight(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - DoRA merges through merge_into
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dora ({self.variant}); " + super().extra_repr()

"""AdapterFusion (Pfeiffer et al., 2021): attention over several adapters' outputs at a site.

Query = the sublayer output (after the last fused adapter's pre-processing), keys and values = the fused adapters'
scaled up-projections; AdapterHub's ``BertFusion`` definitions and defaults ("dynamic": query, key and value
matrices, the value matrix initialised to ~identity; "static": no value matrix).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, nearest

__all__ = ["AdapterFusion", "FusionConfig", "fusion_config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FusionConfig:
    """AdapterHub's AdapterFusionConfig fields; defaults are its ``"dynamic"`` preset."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True
    dropout_prob: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dropout_prob":
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1
                ):
                    raise ConfigError(
                        f"FusionConfig.dropout_prob={value!r} is invalid; expected None or [0, 1)"
                    )
            elif not isinstance(value, bool):
                raise ConfigError(f"FusionConfig.{f.name}={value!r} is invalid; expected True or False")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_PRESETS = {
    "dynamic": FusionConfig(),
    "static": FusionConfig(value=False, regularization=False, value_initialized=False),
}


def fusion_config(config: str | FusionConfig | dict | None) -> FusionConfig:
    if config is None:
        return _PRESETS["dynamic"]
    if isinstance(config, FusionConfig):
        return config
    if isinstance(config, dict):
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(FusionConfig)})
        if unknown:
            raise ConfigError(
                f"unknown FusionConfig key(s) {unknown}{nearest(unknown[0], FusionConfig.__annotations__)}"
            )
        return FusionConfig(**config)
    if config in _PRESETS:
        return _PRESETS[config]
    raise ConfigError(
        f"unknown fusion config {config!r}; expected one of {sorted(_PRESETS)}{nearest(str(config), _PRESETS)}"
    )


def _bert_init(linear: nn.Linear) -> None:
    with torch.no_grad():
        linear.weight.normal_(mean=0.0, std=0.02)
        if linear.bias is not None:
            linear.bias.zero_()


class AdapterFusion(nn.Module):
    """The fusion layer at one site. ``forward(query, values, residual)`` with ``values`` ``[..., n, d]``."""

    def __init__(self, hidden_size: int, config: FusionConfig, dropout_prob: float = 0.0):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout_prob if config.dropout_prob is not None else dropout_prob)
        self.query = nn.Linear(hidden_size, hidden_size) if config.query else None
        self.key = nn.Linear(hidden_size, hidden_size) if config.key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False) if config.value else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                _bert_init(lin)
        if self.value is not None and config.value_initialized:
            with torch.no_grad():
                self.value.weight.copy_(torch.full((hidden_size, hidden_size), 1e-6).fill_diagonal_(1.0))
        # temperature annealing: starts at 50 and decays by T/1000 per forward down to 1 (AdapterHub)
        start = 50.0 if config.temperature else 1.0
        self.register_buffer("T", torch.tensor(start), persistent=False)
        self.reduction = start / 1000.0

    def forward(self, query: torch.Tensor, values: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        keys = values
        if cfg.residual_before:  # AdapterHub adds in place to the tensor it passes as both key and value
            values = keys = values + residual.unsqueeze(-2)
        q = self.query(query) if self.query is not None else query
        k = self.key(keys) if self.key is not None else keys
        v = self.value(values) if self.value is not None and cfg.value_before_softmax else values
        scores = torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2)
        scores = self.dropout(scores)
        probs = torch.softmax(scores / self.T, dim=-1)
        if cfg.temperature:
            with torch.no_grad():
                self.T.copy_(torch.clamp(self.T - self.reduction, min=1.0))
        context = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
        if self.value is not None and not cfg.value_before_softmax:
            context = self.value(context)
        if not cfg.residual_before:
            context = context + residual
        return context

    def regularization_loss(self) -> torch.Tensor:
        """AdapterHub's fusion regularisation: squared distance of the value matrix from the identity."""
        if self.value is None:
            return torch.zeros(())
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device)
        return (eye - self.value.weight).pow(2).sum()

"""Compacter's parameterised hypercomplex multiplication (PHM) layers (Mahabadi et al., 2021), as AdapterHub's
``PHMLayer`` defines them (``adapters/methods/modeling.py``): the bottleneck's down and up projections of a
``BottleneckConfig(phm_layer=True)`` (presets ``compacter``, ``compacter++``).

With ``n = phm_dim``, a PHM layer from ``in`` to ``out`` features computes

    H = Σᵢ kron(Cᵢ, Wᵢ)         Cᵢ: [n, n] (the "phm rule"),  Wᵢ: [in/n, out/n]        H: [in, out]
    y = x H + b

where ``C = C_left @ C_right`` (``[n, n, 1] @ [n, 1, n]``) with ``factorized_phm_rule`` and
``W = W_left @ W_right`` (``[n, in/n, rank] @ [n, rank, out/n]``) with ``factorized_phm_W`` (the default).
``shared_phm_rule`` (the default) uses one ``C`` for every PHM layer of the adapter, down and up, in all layers;
``shared_W_phm`` one ``W`` for all down and one for all up projections. Shared weights are a :class:`PHMShared`
module kept by the adapter's first site module; the others hold a reference (saved once, like AdapterHub's
``shared_parameters.<name>``).

Initialisation follows AdapterHub, including two of its quirks: every ``hypercomplex_nonlinearity`` value draws ``W``
from a Glorot *normal* distribution (its test is truthiness), and per-layer phm rules use a std/range of 0.01
while shared ones use ``phm_init_range`` / ``U(-1, 1)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PHMLinear", "PHMShared", "kronecker_sum"]


def kronecker_sum(rule: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σᵢ kron(rule[i], weight[i])`` for ``rule`` [n, a, b] and ``weight`` [n, c, d] → [a·c, b·d]."""
    _, a, b = rule.shape
    _, c, d = weight.shape
    return (rule[:, :, None, :, None] * weight[:, None, :, None, :]).sum(0).reshape(a * c, b * d)


def _glorot_normal_(w: torch.Tensor) -> None:
    for i in range(w.shape[0]):
        nn.init.xavier_normal_(w.data[i])


def _rule(n: int, factorized: bool, learn: bool) -> dict[str, nn.Parameter]:
    if factorized:
        return {
            "phm_rule_left": nn.Parameter(torch.empty(n, n, 1), requires_grad=learn),
            "phm_rule_right": nn.Parameter(torch.empty(n, 1, n), requires_grad=learn),
        }
    return {"phm_rule": nn.Parameter(torch.empty(n, n, n), requires_grad=learn)}


def _weights(n: int, in_f: int, out_f: int, config: Any, suffix: str = "") -> dict[str, nn.Parameter]:
    if config.factorized_phm_W:
        return {
            f"W{suffix}_left": nn.Parameter(torch.empty(n, in_f // n, config.phm_rank)),
            f"W{suffix}_right": nn.Parameter(torch.empty(n, config.phm_rank, out_f // n)),
        }
    return {f"W{suffix}": nn.Parameter(torch.empty(n, in_f // n, out_f // n))}


class PHMShared(nn.Module):
    """The weights every PHM layer of one adapter shares (``shared_phm_rule`` / ``shared_W_phm``)."""

    def __init__(self, hidden: int, width: int, config: Any):
        super().__init__()
        n = config.phm_dim
        self.factorized_rule = config.factorized_phm_rule
        self.factorized_W = config.factorized_phm_W
        params: dict[str, nn.Parameter] = {}
        if config.shared_W_phm:
            params.update(_weights(n, hidden, width, config, "_down"))
            params.update(_weights(n, width, hidden, config, "_up"))
        if config.shared_phm_rule:
            params.update(_rule(n, config.factorized_phm_rule, config.learn_phm))
        for key, p in params.items():
            self.register_parameter(key, p)
        with torch.no_grad():
            for key, p in params.items():
                if key.startswith("W"):
                    _glorot_normal_(p)
                elif config.phm_c_init == "normal":
                    p.normal_(mean=0.0, std=config.phm_init_range)
                else:
                    p.uniform_(-1.0, 1.0)

    def rule(self) -> torch.Tensor:
        if self.factorized_rule:
            return torch.bmm(self.phm_rule_left, self.phm_rule_right)
        return self.phm_rule

    def weight(self, position: str) -> torch.Tensor:
        if self.factorized_W:
            return torch.bmm(getattr(self, f"W_{position}_left"), getattr(self, f"W_{position}_right"))
        return getattr(self, f"W_{position}")


class PHMLinear(nn.Module):
    """One PHM projection ``y = x H + b`` (``position`` "down" or "up" names its shared weights)."""

    def __init__(self, in_features: int, out_features: int, position: str, config: Any):
        super().__init__()
        n = config.phm_dim
        self.in_features, self.out_features, self.position = in_features, out_features, position
        self.shared_rule, self.shared_W = config.shared_phm_rule, config.shared_W_phm
        self.factorized_rule, self.factorized_W = config.factorized_phm_rule, config.factorized_phm_W
        self.__dict__["_shared"] = None
        own: dict[str, nn.Parameter] = {}
        if not config.shared_W_phm:
            own.update(_weights(n, in_features, out_features, config))
        if not config.shared_phm_rule:
            own.update(_rule(n, config.factorized_phm_rule, config.learn_phm))
        for key, p in own.items():
            self.register_parameter(key, p)
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None
        with torch.no_grad():
            for key, p in own.items():
                if key.startswith("W"):
                    _glorot_normal_(p)
                elif config.phm_c_init == "uniform":
                    p.uniform_(-0.01, 0.01)
                else:
                    p.normal_(mean=0.0, std=0.01)

    def share(self, shared: PHMShared) -> None:
        """Use ``shared``'s weights (held by another module: a reference, not a submodule)."""
        self.__dict__["_shared"] = shared

    def hypercomplex(self) -> torch.Tensor:
        """``H`` [in, out]."""
        shared = self.__dict__["_shared"]
        if self.shared_W:
            W = shared.weight(self.position)
        elif self.factorized_W:
            W = torch.bmm(self.W_left, self.W_right)
        else:
            W = self.W
        if self.shared_rule:
            rule = shared.rule()
        elif self.factorized_rule:
            rule = torch.bmm(self.phm_rule_left, self.phm_rule_right)
        else:
            rule = self.phm_rule
        return kronecker_sum(rule, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H = self.hypercomplex()
        y = torch.matmul(x, H.to(x.dtype))
        return y + self.b if self.b is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.position}"

"""LoRA-family adapters on projections outside the repeating layers (``pooler.dense``, a classifier, ``lm_head``).

PEFT targets every ``nn.Linear`` whose path matches a ``target_modules`` name, wherever it lies:
``LoraConfig(target_modules=["query", "value", "dense"])`` on BERT also adapts ``pooler.dense``. Such a projection is
in no captured layer graph, so it is a *model part* (``methods/base.py``): ``LoRAMethod.build_model_parts`` builds
the same modules as at a layer site (LoRA, DoRA, (IA)^3; kept in the first layer's container under
``model:<path>``), and one hook per adapted module applies the active adapters' parts:

    forward pre-hook   x → x ⊙ l                     (IA)^3 on the input (PEFT's feed-forward modules)
    forward hook       y → y + s B A x               LoRA (a Stack: the second update reads the first, AdapterHub's
                       y → DoRA(x, y, W, b)          Stack of LoRAs, as inside the layers), DoRA, (IA)^3 y ⊙ l

Which modules: ``LoRAConfig(sites=("model:pooler.dense", ...))`` by path, or ``target_modules`` names matched against
the full module paths (``path == name`` or ``path.endswith("." + name)``, PEFT's rule) of the Linear-like modules
outside the layers. A name that matches no Linear-like module inside or outside the layers is an error.

The active setup must be a ``Stack`` of adapter names while an outside part is active: other blocks (``Parallel``,
``BatchSplit``, ...) slice or replicate the batch inside the layers, which a hook after them cannot follow.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import CompositionError, ConfigError, SiteNotFoundError, nearest

__all__ = ["MODEL_PREFIX", "OutsideHooks", "build_outside_parts", "outside_paths"]

MODEL_PREFIX = "model:"


def _linear_like(module: nn.Module) -> bool:
    from ..graphs import is_linear_like

    return is_linear_like(module)


def outside_linears(model: nn.Module, layer_paths: list[str]) -> dict[str, nn.Module]:
    """Linear-like modules of ``model`` that lie in no repeating layer and in no fxadapt container."""
    out = {}
    for path, module in model.named_modules():
        if not path or "fxadapt" in path.split("."):
            continue
        if any(path == lp or path.startswith(lp + ".") for lp in layer_paths):
            continue
        if _linear_like(module):
            out[path] = module
    return out


def _matches(path: str, name: str) -> bool:
    name = name.strip(".")
    return path == name or path.endswith("." + name)


def outside_paths(config: Any, model: nn.Module, layer_paths: list[str]) -> list[str]:
    """The outside-layer module paths ``config`` adapts (``model:`` sites, or ``target_modules`` matches)."""
    linears = outside_linears(model, layer_paths)
    wanted = [s[len(MODEL_PREFIX) :] for s in config.sites if s.startswith(MODEL_PREFIX)]
    for path in wanted:
        if path not in linears:
            raise SiteNotFoundError(
                f"site {MODEL_PREFIX + path!r}: {type(model).__name__} has no Linear-like module {path!r} outside "
                f"its layers; it has {sorted(linears)}{nearest(path, linears)}"
            )
    if config.target_modules is not None:
        wanted += [p for p in linears if any(_matches(p, n) for n in config.target_modules)]
    return list(dict.fromkeys(wanted))


def build_outside_parts(config: Any, context: Any) -> dict[tuple[int, str], nn.Module]:
    """The modules of ``config`` at projections outside the layers, keyed ``(0, "model:<path>")``; also checks that
    every ``target_modules`` name matches some Linear-like module, inside or outside the layers."""
    from .lora import IA3Vector, LoRA, _feeds_forward, projection_features

    model = context.model
    paths = outside_paths(config, model, context.paths)
    if config.target_modules is not None:
        inside = {p for report in context.reports for p in report.linears}
        full_inside = {
            f"{lp}.{p}" for lp, report in zip(context.paths, context.reports) for p in report.linears
        }
        missing = [
            n
            for n in config.target_modules
            if not any(_matches(p, n) for p in inside)
            and not any(_matches(p, n) for p in full_inside)
            and not any(_matches(p, n) for p in paths)
        ]
        if missing:
            candidates = sorted(inside | set(outside_linears(model, context.paths)))
            kinds = sorted({s.kind for report in context.reports for s in report.modules})
            raise SiteNotFoundError(
                f"target_modules {missing} not found in {type(model).__name__}; it has the module sites {kinds} and "
                f"these Linear-like modules (inside or outside its layers): {candidates[:16]}"
                f"{nearest(missing[0], candidates)}"
            )
    if paths and config.is_vera:
        raise ConfigError(
            f"VeRA on modules outside the layers ({paths}) is not supported: its shared projections are sized from "
            "the layers' sites; adapt only projections inside the layers"
        )
    out: dict[tuple[int, str], nn.Module] = {}
    for path in paths:
        proj = model.get_submodule(path)
        in_f, out_f, transposed = projection_features(proj)
        site = _Outside(MODEL_PREFIX + path, path)
        if config.composition_mode == "scale" and _feeds_forward(config, site):
            from .ia3 import IA3InputVector

            module: nn.Module = IA3InputVector(in_f, config, site, transposed)
        elif config.composition_mode == "scale":
            module = IA3Vector(out_f, config)
        elif config.use_dora:
            from .dora import DoRALoRA

            rows = proj.weight.t() if transposed else proj.weight
            module = DoRALoRA(in_f, out_f, config, rows, transposed)
        else:
            module = LoRA(in_f, out_f, config)
        out[(0, MODEL_PREFIX + path)] = module
    return out


class _Outside:
    """Enough of a ModuleSite for the module constructors: kind, module path, no slice."""

    out_slice = None

    def __init__(self, kind: str, module: str):
        self.kind, self.module = kind, module


class OutsideHooks:
    """The pre/post forward hooks on one outside-layer projection; ``remove()`` takes both off."""

    def __init__(self, model: nn.Module, path: str):
        self.model, self.part = model, MODEL_PREFIX + path
        module = model.get_submodule(path)
        self.handles = (
            module.register_forward_pre_hook(self._pre),
            module.register_forward_hook(self._post),
        )

    def _parts(self) -> list[tuple[str, nn.Module]]:
        from ..compose import Stack
        from ..parts import active_parts

        parts = active_parts(self.model, self.part)
        if parts:
            from ..model import get_state

            active = get_state(self.model).active
            if not (isinstance(active, Stack) and all(isinstance(c, str) for c in active.children)):
                names = [n for n, _ in parts]
                raise CompositionError(
                    f"adapters {names} adapt {self.part[len(MODEL_PREFIX) :]!r}, outside the layers, which works "
                    f"under a Stack of adapter names only, not under {active!r}"
                )
        return parts

    def _pre(self, module: nn.Module, args: tuple) -> Any:
        scales = [m for _, m in self._parts() if getattr(m, "scales_input", False)]
        if not scales or not args:
            return None
        x = args[0]
        for m in scales:
            x = x * m().to(x.dtype)
        return (x, *args[1:])

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        parts = [m for _, m in self._parts() if not getattr(m, "scales_input", False)]
        if not parts or not args or not isinstance(output, torch.Tensor):
            return None
        x, y = args[0], output
        hidden = (
            None  # the composed low-rank update (AdapterHub's Stack: the next LoRA reads the previous update)
        )
        for m in parts:
            if getattr(m, "rewrites_output", False):  # DoRA
                y = m(x, y, module.weight, getattr(module, "bias", None))
            elif hasattr(m, "scale_vector"):  # (IA)^3 on the output
                y = y * m().to(y.dtype)
            else:
                hidden = m(x if hidden is None else hidden)
        return y if hidden is None else y + hidden

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

"""Deployment: ``torch.export`` of an adapted model, and an AOTInductor package of it.

An injected model is still an ordinary ``nn.Module`` whose layers run generated Python code, so
:func:`torch.export.export` traces straight through it: the active setup (one adapter, a ``Stack``, a ``Fuse``,
merged LoRA weights, ...) becomes part of one ATen graph, equal to the eager model. What :func:`export` adds:

- **dynamic batch and sequence dims** by default (``dynamic=True``): dims 0 and 1 of every token-like input
  (``input_ids``, masks, ``inputs_embeds``) and dim 0 of image-like inputs are exported as ``Dim.AUTO``, so one
  program serves any batch size and sequence length the model itself accepts;
- a **warm-up call** on the example inputs before exporting, so fxadapt's lazy per-call captures exist and the
  export traces the compiled code, not the tracer;
- **typed errors**: a model in training mode (export bakes dropout in and the exported module cannot train:
  docs/design.md §1.3), a ``PerRow`` setup (its ids arrive through a forward hook, not an input),
  or a failed export raise :class:`~fxadapt.ConfigError` / :class:`~fxadapt.CompositionError` /
  :class:`~fxadapt.CaptureError` and leave the model as it was.

:func:`aot_package` compiles an ``ExportedProgram`` with AOTInductor into one ``.pt2`` file (C++ code for the
CPU, or CUDA kernels); :func:`load_package` loads it into a callable with the model's signature. Merging LoRA
first (``fxadapt.merge``) exports the base model's graph with the merged weights: no adapter ops at all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compose import PerRow
from .errors import CaptureError, CompositionError, ConfigError
from .model import default_example_inputs, get_state

__all__ = ["aot_package", "dynamic_shapes_for", "export", "load_package"]


def dynamic_shapes_for(example_inputs: Any) -> Any:
    """The ``dynamic_shapes`` spec :func:`export` uses for ``example_inputs`` (a dict of model kwargs, or a
    tuple of positional args): batch and sequence dims ``Dim.AUTO``, every other dim static.

    Token-like tensors (integer or bool, or float of rank ≤ 3 such as ``inputs_embeds``) get dims 0 and 1;
    image-like float tensors of rank ≥ 4 (``pixel_values``) get dim 0; non-tensors get ``None``.
    """
    auto = torch.export.Dim.AUTO

    def spec(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        if value.is_floating_point() and value.dim() >= 4:
            return {0: auto}
        return {d: auto for d in range(min(value.dim(), 2))}

    if isinstance(example_inputs, Mapping):
        return {k: spec(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(spec(v) for v in example_inputs)
    return (spec(example_inputs),)


def _split(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def export(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with its active adapter setup: an ``ExportedProgram`` equal to the eager model.

    Args:
        model: an injected (or plain) model in eval mode.
        example_inputs: a small batch: a dict of model kwargs (``{"input_ids": ..., "attention_mask": ...}``) or
            a tuple of positional args. Built from the model's config (batch 2, sequence 8) when omitted.
        dynamic: export batch and sequence dims as dynamic (see :func:`dynamic_shapes_for`); ``False`` exports
            the example shapes only.
        dynamic_shapes: an explicit ``torch.export`` spec (overrides ``dynamic``).
        strict: ``torch.export``'s strict (TorchDynamo) mode; the default non-strict mode traces Python as it runs.

    Returns:
        The ``ExportedProgram``; ``program.module()(**inputs)`` runs it, :func:`aot_package` compiles it.

    Raises:
        ConfigError: the model is in training mode, or ``example_inputs`` is not a dict/tuple of inputs.
        CompositionError: the active setup is ``PerRow`` (per-row adapter ids are not a graph input).
        CaptureError: ``torch.export`` failed (the message carries its first line).
    """
    if model.training:
        raise ConfigError(
            f"export: {type(model).__name__} is in training mode; an exported program bakes dropout in and "
            "cannot train. Call model.eval() first"
        )
    state = get_state(model)
    if state is not None and isinstance(state.active, PerRow):
        raise CompositionError(
            f"export: the active setup {state.active!r} routes per-row adapter ids through a forward hook, which "
            "an exported program cannot take as an input; activate a fixed setup (a name, Stack, Fuse, ...)"
        )
    inputs = default_example_inputs(model) if example_inputs is None else example_inputs
    if not isinstance(inputs, (Mapping, tuple, list, torch.Tensor)):
        raise ConfigError(
            f"export: example_inputs must be a dict of model kwargs or a tuple of args, got {type(inputs).__name__}"
        )
    args, kwargs = _split(inputs)
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = dynamic_shapes_for(inputs)
    with torch.no_grad():
        model(*args, **kwargs)  # warm: fxadapt's captures for this call exist before export traces the code
    try:
        return torch.export.export(
            model, args, kwargs, dynamic_shapes=dynamic_shapes if dynamic_shapes else None, strict=strict
        )
    except Exception as exc:  # torch.export's errors are long; keep the first line and chain the rest
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise CaptureError(f"torch.export could not export {type(model).__name__}: {first}") from exc


def aot_package(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike,
    *,
    inductor_configs: Mapping[str, Any] | None = None,
) -> Path:
    """Compile ``program`` with AOTInductor into the package file ``path`` (``.pt2``) and return its path.

    On CPU this runs a C++ compiler (minutes for a large model, ~20 s for a tiny one); dynamic dims stay dynamic.
    """
    target = Path(path)
    if target.suffix != ".pt2":
        raise ConfigError(f"aot_package: the package path must end in .pt2, got {str(target)!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    out = torch._inductor.aoti_compile_and_package(
        program, package_path=str(target), inductor_configs=dict(inductor_configs or {})
    )
    return Path(out)


def load_package(path: str | os.PathLike) -> Any:
    """Load an AOTInductor package written by :func:`aot_package`: a callable taking the model's inputs."""
    if not Path(path).is_file():
        raise ConfigError(f"load_package: no package file {str(path)!r}")
    return torch._inductor.aoti_load_package(str(path))

"""What a failed (or internal) step must leave as it was: buffers, base weights, names.

A verb that fails leaves the model, its heads and files on disk exactly as they were (``errors.py``). The verbs
build on these helpers:

- :func:`preserved_buffers`: the priming forward and the verification runs of tracing are fxadapt's own work, not
  the user's: they must not advance BatchNorm statistics (or any other buffer a forward updates in place).
- :class:`WeightSnapshot`: ``merge``/``unmerge`` write into the base weights site by site; an exception (or an
  interrupt) half way restores every weight already written, bit for bit, and the merged flag stays as it was.
- :func:`check_adapter_name`: names that collide with ``nn.ModuleDict`` attributes (``keys``, ``forward``,
  ``training``, ...) cannot key the module dicts adapters and heads live in: refused before anything is built.
- :func:`rename_adapter`: lets ``add_adapter(overwrite_ok=True)`` build and validate the new adapter under a
  temporary name before the old one is deleted.
- :func:`check_materialized`: a model whose weights are still on the meta device cannot be primed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .errors import CaptureError, ConfigError

__all__ = [
    "WeightSnapshot",
    "check_adapter_name",
    "check_materialized",
    "preserved_buffers",
    "rename_adapter",
]


@contextlib.contextmanager
def preserved_buffers(*modules: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``modules`` on exit: the same tensor objects, with the values they had on entry."""
    saved: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]] = []
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, buf in module._buffers.items():
                copy = buf.detach().clone() if isinstance(buf, torch.Tensor) else None
                saved.append((module, name, buf, copy))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buf, copy in saved:
                module._buffers[name] = buf
                if buf is not None and copy is not None and not buf.is_meta:
                    buf.copy_(copy)


class WeightSnapshot:
    """Copies (on the CPU) of the parameters of modules about to be changed in place; :meth:`restore` puts them
    back bit for bit."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}

    def save(self, module: nn.Module) -> None:
        if id(module) not in self._saved:
            params = {n: _cpu_copy(p) for n, p in module.named_parameters(recurse=False)}
            self._saved[id(module)] = (module, params)

    @torch.no_grad()
    def restore(self) -> None:
        for module, params in self._saved.values():
            own = dict(module.named_parameters(recurse=False))
            for name, value in params.items():
                try:
                    own[name].copy_(value)
                except (RuntimeError, NotImplementedError):  # a quantized tensor subclass: swap the data back
                    own[name].data = value.to(own[name].device)


def _cpu_copy(p: torch.Tensor) -> torch.Tensor:
    """An independent CPU copy of ``p`` (``.to(copy=True)`` is not supported by quantized tensor subclasses)."""
    t = p.detach().clone()
    return t if t.device.type == "cpu" else t.to("cpu")


def _reserved_names() -> frozenset[str]:
    probe = nn.ModuleDict()
    return frozenset(n for n in set(dir(probe)) | set(vars(probe)) if not n.startswith("__"))


_RESERVED = _reserved_names()


def check_adapter_name(name: str, what: str = "adapter") -> None:
    """Refuse names that are attributes of ``nn.ModuleDict`` (the containers adapters and heads are kept in)."""
    if name in _RESERVED:
        raise ConfigError(
            f"invalid {what} name {name!r}: it is the name of a torch.nn.Module attribute or method, which cannot "
            f"name a submodule; choose another name, e.g. {name + '_' + what!r}"
        )


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers are on the meta device (nothing to prime the capture with)."""
    # one walk without building names (every inject pays it); the names only for the message
    if not any(
        t is not None and t.is_meta
        for m in model.modules()
        for tensors in (m._parameters, m._buffers)
        for t in tensors.values()
    ):
        return
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in named:
            if tensor.is_meta:
                raise CaptureError(
                    f"{type(model).__name__} has its weights on the meta device ({kind} {name!r}): fxadapt traces "
                    "each layer on a real forward, so load or materialise the weights first (for example "
                    "model.to_empty(device='cpu') then load_state_dict, or from_pretrained without a meta device_map)"
                )


def rename_adapter(model: nn.Module, old: str, new: str) -> None:
    """Give adapter ``old`` (not in the active setup) the name ``new`` (free): its record and its modules in every
    layer keep their order; plans are rebuilt."""
    from .api import _apply_plans
    from .model import CONTAINER, get_state, layers_of

    state = get_state(model)
    assert state is not None and old in state.adapters and new not in state.adapters
    assert state.active is None or old not in state.active.names()
    state.adapters = {(new if k == old else k): v for k, v in state.adapters.items()}
    _, layers = layers_of(model)
    for layer in layers:
        container = layer._modules.get(CONTAINER)
        if container is not None and old in container:
            items = list(container.items())
            for k, _ in items:
                del container[k]
            for k, m in items:
                container[new if k == old else k] = m
    _apply_plans(model, state)

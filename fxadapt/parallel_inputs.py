"""Parallel composition outside the layers: a decoder stack's encoder-side inputs, and ``generate``.

Under ``Parallel`` the encoder's output comes back with ``n`` copies of the batch (``[n·B, S, d]``), while the
decoder's own inputs keep the batch ``B``; the decoder's layers replicate those first thing
(:func:`fxadapt.compose.replicate_batch`). But a decoder *stack* (the module holding the decoder's layer list)
builds its cross-attention mask from ``encoder_attention_mask [B, S]`` against ``encoder_hidden_states [n·B, S, d]``
before any layer runs, and fails on the mismatch (AdapterHub patches each model's stack for this). A forward
pre-hook on every stack whose ``forward`` takes ``encoder_hidden_states`` brings the other ``encoder_*`` keyword
inputs (HF's naming: ``encoder_attention_mask``, ...) to the encoder states' batch when exactly the active
``Parallel``'s factor separates them. Nothing else is touched, and a call outside ``Parallel`` is left as is (a
genuine batch mismatch still fails where it would without fxadapt).

``generate`` under ``Parallel`` (AdapterHub's parallel generation): the decoding loop appends one token per row of
the model's input, but the model returns ``n·B`` rows. While a Parallel setup may run, a generating model's
``generate`` is wrapped: it repeats the batch-first tensor inputs ``n`` times first (channel ``i`` is rows
``[i·B, (i+1)·B)``) and runs the loop with the layers told that their inputs arrive replicated
(:func:`fxadapt.compose.pre_replicated`), so it returns ``n·B`` sequences, channel by channel.

The hooks are installed while a Parallel setup may run: the active setup has one, or a ``using`` block has run one
on this model (then they stay until the last adapter is removed), like the per-row routing hook (``routing.py``).
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import torch
from torch import nn

from .calls import effective_setup
from .compose import parallel_channels, pre_replicated, repeat_batch

__all__ = ["ParallelGenerate", "install_parallel_hooks", "remove_parallel_hooks", "sync_parallel_hooks"]

_HOOKS = "_fxadapt_parallel_hooks"
_STICKY = "_fxadapt_parallel_sticky"
_STATES = "encoder_hidden_states"
_LOCK = threading.Lock()


def _stacks(model: nn.Module, layer_paths: list[str]) -> list[nn.Module]:
    """The modules holding the layer lists (``decoder`` for ``decoder.block.3``) that take encoder states."""
    out: list[nn.Module] = []
    for path in dict.fromkeys(p.rsplit(".", 2)[0] if p.count(".") >= 2 else "" for p in layer_paths):
        stack = model.get_submodule(path)
        try:
            takes = _STATES in inspect.signature(stack.forward).parameters
        except (TypeError, ValueError):
            takes = False
        if takes and all(stack is not s for s in out):
            out.append(stack)
    return out


def _pre_hook(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> Any:
    states = kwargs.get(_STATES)
    if not isinstance(states, torch.Tensor) or states.dim() < 2:
        return None
    setup = effective_setup(model)
    n = parallel_channels(setup) if setup is not None else 1
    if n <= 1:
        return None
    full = states.shape[0]
    changed = {}
    for name, value in kwargs.items():
        if (
            name.startswith("encoder_")
            and name != _STATES
            and isinstance(value, torch.Tensor)
            and value.dim() >= 1
            and value.shape[0] * n == full
        ):
            changed[name] = repeat_batch(value, n)
    return (args, {**kwargs, **changed}) if changed else None


class ParallelGenerate:
    """``model.generate`` while a Parallel setup may run (see the module docstring); the class's own ``generate``
    otherwise. An instance attribute, so that copies and pickles of the model carry it."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(
        self,
    ) -> inspect.Signature:  # inspect.signature / help() as for the model's own generate
        return inspect.signature(type(self.model).generate.__get__(self.model))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        generate = type(model).generate.__get__(model)
        setup = effective_setup(model)
        n = parallel_channels(setup) if setup is not None else 1
        if n <= 1:
            return generate(*args, **kwargs)
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() >= 1]
        if not tensors:
            return generate(*args, **kwargs)
        batch = tensors[0].shape[0]

        def rep(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch:
                return repeat_batch(v, n)
            return v

        with pre_replicated():
            return generate(*map(rep, args), **{k: rep(v) for k, v in kwargs.items()})


def install_parallel_hooks(model: nn.Module, layer_paths: list[str], *, sticky: bool = False) -> None:
    """Hook the stacks of ``model`` that take encoder states and wrap its ``generate`` (see the module
    docstring); idempotent."""
    with _LOCK:  # serve: concurrent ``using`` blocks install once
        if sticky:
            model.__dict__[_STICKY] = True
        if _HOOKS in model.__dict__:
            return
        hook = functools.partial(_pre_hook, model)  # a deep copy of the model gets hooks for the copy
        model.__dict__[_HOOKS] = [
            stack.register_forward_pre_hook(hook, with_kwargs=True) for stack in _stacks(model, layer_paths)
        ]
        if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
            model.__dict__["generate"] = ParallelGenerate(model)


def remove_parallel_hooks(model: nn.Module) -> None:
    with _LOCK:
        for handle in model.__dict__.pop(_HOOKS, ()):
            handle.remove()
        if isinstance(model.__dict__.get("generate"), ParallelGenerate):
            del model.__dict__["generate"]


def sync_parallel_hooks(model: nn.Module, state: Any) -> None:
    """Hooks while a Parallel setup may run (the active one has ``Parallel``, or a ``using`` block ran one)."""
    if (
        state is not None
        and state.adapters
        and ((state.active is not None and parallel_channels(state.active) > 1) or _STICKY in model.__dict__)
    ):
        install_parallel_hooks(model, state.layer_paths)
    else:
        model.__dict__.pop(_STICKY, None)
        remove_parallel_hooks(model)

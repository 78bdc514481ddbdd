"""Per-row LoRA and (IA)^3: each batch row through its own adapter at a projection, in one batched op.

Design note
-----------
Under ``PerRow("a", "b", ...)`` a projection ``y = W x + b`` becomes, for row ``i`` with adapter ``k = ids[i]``::

    y_i' = (W x_i + b) ⊙ v_k + s_k · B_k A_k x_i          (v_k = 1 for LoRA and for id -1; B_k = 0 for (IA)^3)

so LoRA and (IA)^3 adapters may share a site (each row is one or the other). The adapters' weights are stacked
into *banks* (``A [n+1, r, in]``, ``B [n+1, width, r]``, ``s [n+1]``, ``v [n+1, width]``; entry ``n`` is the zero
adapter that id -1 selects; ranks are zero-padded to the largest, a fused-projection slice is padded to the full
width). Reference path (CPU, and anything the kernel cannot serve): one ``index_select`` of each bank by the rows'
ids and two ``bmm``s — no Python loop over adapters, and no work for adapters the batch does not use beyond the
gather. Banks are cached while the weights are unchanged (``Tensor._version``) and rebuilt each call when they
train (so gradients reach every adapter of the bank).

Lowered (CUDA, or the Triton backend forced): when every adapter of the site is a plain additive LoRA on an
``nn.Linear`` and no dropout is active, the projection and the updates run as one ``fxadapt.kernels.lora_multi``
call, which groups the rows by adapter on the device. :func:`not_fusable` is the rule, stated once; a single-LoRA
lowering rule can share it (it is the same condition for a bank of one).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CompositionError
from ..routing import current_ids

__all__ = ["compose_per_row", "not_fusable", "per_row_lora", "per_row_lora_fused"]


def _modules_of(root: nn.Module, targets: list[str]) -> list[nn.Module]:
    return [root.get_submodule(t) for t in targets]


def _kind(module: nn.Module) -> str:
    from .lora import IA3Vector, LoRA

    if type(module) is LoRA:
        return "add"
    if type(module) is IA3Vector:
        return "scale"
    return ""


def not_fusable(modules: list[nn.Module], projection: nn.Module, training: bool) -> str | None:
    """Why ``lora_multi`` cannot compute these adapters at this projection (None: it can)."""
    from ..kernels import MAX_RANK

    if any(_kind(m) != "add" for m in modules):
        return "(IA)^3 scales are not part of the fused LoRA kernel"
    if type(projection) is not nn.Linear:
        return f"the projection is a {type(projection).__name__}, the kernel takes nn.Linear"
    if training and any(isinstance(m.dropout, nn.Dropout) and m.dropout.p > 0 for m in modules):
        return "LoRA dropout is active (training); the kernel has no dropout"
    rank = max(m.lora_A.shape[0] for m in modules)
    if rank > MAX_RANK:
        return f"rank {rank} exceeds the kernel's limit of {MAX_RANK}"
    return None


def compose_per_row(emitter: Any, site: Any, setup: Any, plan: Any) -> None:
    """Emit the per-row op at a projection site for the PerRow ``setup``."""
    from .bottleneck_compose import route_ids
    from .lora import _call_input, _graph_node

    e = emitter
    refs = {ref.name: ref for ref in plan.adapters}
    modules = _modules_of(e.root, [refs[n].target for n in setup.children if n in refs])
    odd = [n for n, m in zip([n for n in setup.children if n in refs], modules) if not _kind(m)]
    if odd:
        raise CompositionError(
            f"PerRow{tuple(setup.names())}: adapter(s) {odd} at {site.kind!r} are LoRA variants "
            f"({type(modules[0]).__name__}); per-row routing covers plain LoRA and (IA)^3"
        )
    call = _graph_node(e, site.node)
    x = _call_input(call)
    current = e.node(site.node)
    projection = e.root.get_submodule(site.module)
    name = f"per_row_{e.name}"
    with e.after(site.node):
        present = tuple(n in refs for n in setup.children)
        ids = e.function(route_ids, (e.function(current_ids, (x,)), present))
        banks = [e.attr(refs[n].target) for n in setup.children if n in refs]
        why = not_fusable(modules, projection, e.root.training) if e.lower else "not lowered"
        if e.lower and why is None:
            y = e.function(per_row_lora_fused, (x, ids, e.attr(site.module), banks))
            e.notes.append(f"{name}: lowered to fxadapt.kernels.lora_multi")
        else:
            y = e.function(per_row_lora, (x, current, ids, banks))
            if e.lower:
                e.notes.append(f"{name}: not lowered: {why}")
        y.name = e.graph._graph_namespace.create_name(name, y)
    e.replace_node(site.node, y)
    if e.lower and why is None and not call.users:
        e.graph.erase_node(call)  # the fused op computes the projection itself


# ----------------------------------------------------------------------------------------------------------------
# banks

_BANKS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[str, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)
_BANKS_LOCK = threading.Lock()


def _weights(modules: list[nn.Module]) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters(recurse=False)]


def banks(modules: list[nn.Module], like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stacked banks of ``modules`` (see the module docstring), in ``like``'s dtype and device."""
    weights = _weights(modules)
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in weights)
    key = (like.device, like.dtype, tuple((id(p), p._version) for p in weights))
    if not trains:
        with _BANKS_LOCK:
            cached = _BANKS.get(modules[0])
        if cached is not None and cached[0] == key:
            return cached[1]
    out = _stack(modules, like)
    if not trains:
        with _BANKS_LOCK:
            _BANKS[modules[0]] = (key, out)
    return out


def _stack(modules: list[nn.Module], like: torch.Tensor) -> dict[str, torch.Tensor]:
    from ..kernels._common import compute_dtype

    n, width = len(modules), modules[0].width
    adds = [m for m in modules if _kind(m) == "add"]
    rank = max((m.lora_A.shape[0] for m in adds), default=0)
    in_f = adds[0].lora_A.shape[1] if adds else 0
    dev, dt = like.device, like.dtype
    out: dict[str, torch.Tensor] = {}
    if adds:
        a_rows, b_rows, scales = [], [], []
        for m in modules:
            if _kind(m) == "add":
                a = F.pad(m.lora_A, (0, 0, 0, rank - m.lora_A.shape[0]))
                b = F.pad(m.lora_B, (0, rank - m.lora_B.shape[1], m.start, width - m.stop))
                s = float(m.scaling)
            else:
                a, b, s = m.lora_B.new_zeros(rank, in_f), m.lora_B.new_zeros(width, rank), 0.0
            a_rows.append(a.to(dev, dt))
            b_rows.append(b.to(dev, dt))
            scales.append(s)
        a_rows.append(torch.zeros(rank, in_f, device=dev, dtype=dt))  # id -1
        b_rows.append(torch.zeros(width, rank, device=dev, dtype=dt))
        out["A"] = torch.stack(a_rows)
        out["B"] = torch.stack(b_rows)
        out["s"] = torch.tensor([*scales, 0.0], device=dev, dtype=compute_dtype(like))  # fp32; fp64 for fp64
    if len(adds) < n:
        ones = torch.ones(width, device=dev, dtype=dt)
        vs = [m.pad(m.scale_vector(), 1.0).to(dev, dt) if _kind(m) == "scale" else ones for m in modules]
        out["v"] = torch.stack([*vs, ones])
    return out


# ----------------------------------------------------------------------------------------------------------------
# run time


def _dropped(x: torch.Tensor, idx: torch.Tensor, modules: list[nn.Module]) -> torch.Tensor:
    """LoRA input dropout per row, with each row's adapter's probability (training only)."""
    probs = [m.dropout.p if _kind(m) == "add" and isinstance(m.dropout, nn.Dropout) else 0.0 for m in modules]
    if not modules[0].training or not any(probs):
        return x
    p = torch.tensor([*probs, 0.0], device=x.device, dtype=x.dtype)[idx].view(-1, *[1] * (x.dim() - 1))
    keep = torch.rand_like(x) >= p
    return x * keep / (1 - p)


def per_row_lora(
    x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, modules: list[nn.Module]
) -> torch.Tensor:
    """Reference: row ``i`` of the projection output ``y`` with adapter ``ids[i]`` applied (``-1``: unchanged)."""
    n = len(modules)
    bank = banks(modules, y)
    idx = torch.where(ids < 0, torch.full_like(ids, n), ids)
    rows = y.shape[0]
    y3 = y.reshape(rows, -1, y.shape[-1])
    if "v" in bank:
        y3 = y3 * bank["v"].index_select(0, idx).unsqueeze(1)
    if "A" in bank:
        x3 = _dropped(x, idx, modules).reshape(rows, -1, x.shape[-1]).to(y.dtype)
        t = torch.bmm(x3, bank["A"].index_select(0, idx).transpose(1, 2))  # [rows, T, r]
        delta = torch.bmm(t, bank["B"].index_select(0, idx).transpose(1, 2))  # [rows, T, width]
        y3 = y3 + delta * bank["s"].index_select(0, idx).to(y.dtype).view(-1, 1, 1)
    return y3.reshape(y.shape)


def per_row_lora_fused(
    x: torch.Tensor, ids: torch.Tensor, projection: nn.Linear, modules: list[nn.Module]
) -> torch.Tensor:
    """The projection and every row's LoRA update in one ``fxadapt.kernels.lora_multi`` call."""
    from ..kernels import lora_multi

    bank = banks(modules, x)
    n = len(modules)
    return lora_multi(
        x,
        ids,
        projection.weight,
        projection.bias,
        bank["A"][:n],
        bank["B"][:n],
        scale=bank["s"][:n],
    )

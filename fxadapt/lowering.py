"""Lowering: which adapter nodes run as fused kernel ops (``fxadapt.kernels``), and why the others do not.

Two decisions, each made in one place:

* **Does this layer call lower at all?** :func:`capture_allows` — the call's tensors are on CUDA (or the Triton
  backend is forced, the CPU test path under ``TRITON_INTERPRET=1``) and ``fxadapt.kernels.can_use_triton`` agrees.
  The rewrite asks once per compiled call and sets ``Emitter.lower``.
* **Can this adapter run fused?** :func:`why_not_fused` — one predicate for every adapter module and for banks of
  them (per-row routing), returning None or the reason ``explain()`` prints. The rewrite asks it when it emits a
  node; the emitted runtime functions (:func:`fused_bottleneck`, :func:`fused_lora`, :func:`per_row_bottleneck`,
  :func:`per_row_lora`) ask it again on the live tensors (a model cast to another dtype after the rewrite, dropout
  switched on by ``train()``) and run the module's own math when it says no — never a silently different result.

Activation names: the kernels' table (``fxadapt.kernels.ACTIVATIONS``) is the one table; a config's
``non_linearity`` (AdapterHub / transformers names, case-insensitive) is looked up there.

The rules, as (pattern → replacement, law):

* bottleneck ``A(z)`` (+ its residual) at a residual site → ``kernels.bottleneck(z, Wd, bd, Wu, bu, s, act, r)``:
  the module computes exactly ``r + s·up(act(down(z)))`` when it has no LayerNorm of its own and no dropout;
* LoRA at a projection ``proj(x) + s·B·A·x`` → ``kernels.lora_linear(x, W, b, A, B, s)``: one GEMM with the
  low-rank term in its epilogue, when the projection is ``nn.Linear`` or HF ``Conv1D`` (its weight read
  transposed), the site is the whole projection (not a slice of a fused QKV), and dropout is off or p = 0;
* per-row routing (``PerRow``) of bottlenecks → ``kernels.bottleneck_multi``; of LoRAs at one projection →
  ``kernels.lora_multi`` (:func:`per_row_lora`, for ``routing.py``): the bank stacks the adapters' weights, ids
  −1 mean "no adapter";
* (IA)^3 (``y ⊙ s·B``) stays one elementwise multiply after the projection: there is no fused kernel for an output
  scale (it would be a weight scaling, which ``merge`` does), and Inductor fuses the multiply into its neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "capture_allows",
    "fused_bottleneck",
    "fused_lora",
    "kernel_act",
    "per_row_bottleneck",
    "per_row_lora",
    "why_not_fused",
]


def capture_allows(capture: Any) -> tuple[bool, str]:
    """Whether adapter nodes of this captured call are lowered to fused kernel ops, and why (not)."""
    from .kernels import backend_mode, can_use_triton

    if capture.device is None or capture.dtype is None:
        return False, "no tensor inputs"
    if backend_mode() != "triton" and capture.device.type != "cuda":
        return (
            False,
            f"inputs on {capture.device.type}: the fused kernels serve CUDA tensors (reference math runs)",
        )
    probe = torch.empty(0, device=capture.device, dtype=capture.dtype)
    return can_use_triton(probe)


def kernel_act(name: str) -> str | None:
    """The kernels' canonical name of an activation (config names, case-insensitive), None if there is none."""
    from .kernels import ACTIVATIONS
    from .kernels._common import canonical_act

    key = name.strip().lower() if isinstance(name, str) else name
    return canonical_act(key) if key in ACTIVATIONS else None


# ----------------------------------------------------------------------------------------------------------------
# The predicate.
def _is_bottleneck(m: Any) -> bool:
    return hasattr(m, "down") and hasattr(m, "up") and hasattr(m, "act_name")


def _is_lora(m: Any) -> bool:
    return hasattr(m, "lora_B") and hasattr(m, "start") and hasattr(m, "width")


def _dropout_p(m: nn.Module) -> float:
    drop = getattr(m, "dropout", None)
    return float(getattr(drop, "p", 0.0) or 0.0)


def _projection(proj: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as [out, in] — a view for HF Conv1D —, bias) of a plain projection; None for anything else
    (quantized or custom layers compute something the fused GEMM does not)."""
    weight = getattr(proj, "weight", None)
    if type(proj) is nn.Linear:
        return proj.weight, proj.bias
    if type(proj).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.t(), getattr(proj, "bias", None)
    return None


def _dtype_reason(x_dtype: torch.dtype | None, tensors: list[torch.Tensor | None]) -> str | None:
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor)}
    if x_dtype is not None:
        dtypes.add(x_dtype)
    if len(dtypes) > 1:
        return f"mixed dtypes {sorted(str(d)[6:] for d in dtypes)}: the fused kernels take one dtype"
    return None


def why_not_fused(
    module: Any, *, proj: nn.Module | None = None, x_dtype: torch.dtype | None = None
) -> str | None:
    """Why this adapter module (or list of modules: a per-row bank) cannot run as a fused kernel op; None if it
    can. ``proj``: the projection a LoRA sits at; ``x_dtype``: the activations' dtype."""
    if isinstance(module, (list, tuple)):
        return _bank_reason(list(module), proj=proj, x_dtype=x_dtype)
    if _is_bottleneck(module):
        if not isinstance(module.down, nn.Linear) or not isinstance(module.up, nn.Linear):
            return "PHM (Compacter) projections are not part of the fused kernel"
        if getattr(module, "gate", None) is not None:
            return "the adapter gate (use_gating) is not part of the fused kernel"
        if getattr(module, "drop_path", 0.0) > 0:
            return f"drop path (stochastic_depth={module.drop_path}) is not part of the fused kernel"
        if module.norm_before is not None or module.norm_after is not None:
            return "ln_before/ln_after are not part of the fused kernel"
        if module.training and _dropout_p(module) > 0:
            return f"adapter dropout {_dropout_p(module)} (training) is not part of the fused kernel"
        if kernel_act(module.act_name) is None:
            return f"activation {module.act_name!r} has no fused kernel (kernels: {_act_names()})"
        scaling = module.scaling
        tensors = [module.down.weight, module.down.bias, module.up.weight, module.up.bias]
        if isinstance(scaling, torch.Tensor):
            tensors.append(scaling)
        return _dtype_reason(x_dtype, tensors)
    if _is_lora(module):
        if not hasattr(module, "lora_A"):
            return "(IA)^3 scales the projection output: no fused kernel (one elementwise multiply)"
        if getattr(module, "rewrites_output", False) or getattr(module, "scales_input", False):
            return f"{type(module).__name__} is not a plain low-rank update: no fused kernel"
        if type(module).__name__ != "LoRA":
            return f"{type(module).__name__} has no fused kernel (only the plain LoRA update has)"
        if module.start != 0 or module.stop != module.width:
            return (
                "the site is a slice of a fused projection (attn.q of c_attn); the fused GEMM writes it whole"
            )
        if proj is None or _projection(proj) is None:
            kind = type(proj).__name__ if proj is not None else "no module"
            return f"projection {kind} is not nn.Linear or Conv1D"
        if module.training and _dropout_p(module) > 0:
            return f"LoRA dropout {_dropout_p(module)} (training) is not part of the fused kernel"
        weight, bias = _projection(proj)
        return _dtype_reason(x_dtype, [weight, bias, module.lora_A, module.lora_B])
    return f"{type(module).__name__} has no fused kernel"


def _act_names() -> list[str]:
    from .kernels import ACTIVATIONS

    return sorted(ACTIVATIONS)


def _bank_reason(modules: list, *, proj: nn.Module | None, x_dtype: torch.dtype | None) -> str | None:
    if not modules:
        return "no adapters"
    for m in modules:
        why = why_not_fused(m, proj=proj, x_dtype=x_dtype)
        if why is not None:
            return why
    first = modules[0]
    if _is_bottleneck(first):
        if len({m.down.out_features for m in modules}) > 1:
            return "the adapters have different widths (one bank holds one rank)"
        if len({kernel_act(m.act_name) for m in modules}) > 1:
            return "the adapters use different activations (one bank has one)"
        if any(isinstance(m.scaling, torch.Tensor) and m.scaling.numel() != 1 for m in modules):
            return "per-channel scaling is not supported in a bank (one scale per adapter)"
        return None
    if len({m.lora_A.shape[0] for m in modules}) > 1:
        return "the LoRAs have different ranks (one bank holds one rank)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# What the lowered nodes call.
def fused_bottleneck(module: nn.Module, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The adapter's output ``residual + A(z)`` through ``fxadapt.kernels.bottleneck`` (same math as the
    module); the module itself when :func:`why_not_fused` says no for these tensors."""
    from .kernels import bottleneck

    if why_not_fused(module, x_dtype=z.dtype) is not None:
        return module(z, residual)
    res = residual if not module.parallel else torch.zeros_like(z)
    return bottleneck(
        z,
        module.down.weight,
        module.down.bias,
        module.up.weight,
        module.up.bias,
        scale=module.scaling,
        act=kernel_act(module.act_name),
        residual=res,
    )


def fused_lora(proj: nn.Module, lora: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``proj(x) + lora(x)`` as one ``fxadapt.kernels.lora_linear`` call (the projection's GEMM with the low-rank
    update in its epilogue); the two modules when :func:`why_not_fused` says no for these tensors."""
    from .kernels import lora_linear

    if why_not_fused(lora, proj=proj, x_dtype=x.dtype) is not None:
        return proj(x) + lora(x)
    weight, bias = _projection(proj)
    return lora_linear(x, weight, bias, lora.lora_A, lora.lora_B, lora.scaling)


def _scale_bank(modules: list, like: torch.Tensor) -> torch.Tensor:
    """The adapters' scales as one ``[A]`` bank on ``like``'s device, in the kernels' compute dtype (fp32; fp64
    for fp64 activations, where the reference path computes in fp64)."""
    from .kernels._common import compute_dtype

    dtype = compute_dtype(like)
    return torch.stack(
        [
            m.scaling.reshape(())
            if isinstance(m.scaling, torch.Tensor)
            else torch.tensor(float(m.scaling), dtype=dtype)
            for m in modules
        ]
    ).to(like.device, dtype)


def per_row_bottleneck(
    z: torch.Tensor, residual: torch.Tensor | None, ids: torch.Tensor, modules: list
) -> torch.Tensor:
    """Row ``i`` of the output is adapter ``modules[ids[i]]``'s output (``residual``, or 0, for ``-1``): one
    ``fxadapt.kernels.bottleneck_multi`` call, or a loop over the adapters when the bank cannot run fused."""
    from .kernels import bottleneck_multi

    if why_not_fused(modules, x_dtype=z.dtype) is not None:
        return _per_row_loop(z, residual, ids, [lambda zz, rr, m=m: m(zz, rr) for m in modules], residual)
    first = modules[0]
    scale = _scale_bank(modules, z)
    return bottleneck_multi(
        z,
        ids,
        torch.stack([m.down.weight for m in modules]),
        torch.stack([m.down.bias for m in modules]),
        torch.stack([m.up.weight for m in modules]),
        torch.stack([m.up.bias for m in modules]),
        scale=scale,
        act=kernel_act(first.act_name),
        residual=residual if residual is not None else torch.zeros_like(z),
    )


def per_row_lora(proj: nn.Module, x: torch.Tensor, ids: torch.Tensor, modules: list) -> torch.Tensor:
    """The projection's output with row ``i``'s LoRA ``modules[ids[i]]`` added (``-1``: none), for per-row LoRA
    routing: one ``fxadapt.kernels.lora_multi`` call (the base GEMM once, each row's low-rank term in its
    epilogue), or the projection plus a loop over the adapters when :func:`why_not_fused` says no.

    ``ids`` has the shape of a prefix of ``x.shape[:-1]`` (per row, or per sequence of a ``[B, T, d]`` batch)."""
    from .kernels import lora_multi
    from .kernels._common import expand_ids

    if why_not_fused(modules, proj=proj, x_dtype=x.dtype) is not None:
        base = proj(x)
        flat = expand_ids(ids, x.shape[:-1]).to(x.device)
        x2, y2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
        for i, m in enumerate(modules):
            rows = (flat == i).nonzero(as_tuple=True)[0]
            if rows.numel():
                y2 = y2.index_add(0, rows, m(x2.index_select(0, rows)))
        return y2.reshape(base.shape)
    weight, bias = _projection(proj)
    scale = _scale_bank(modules, x)
    return lora_multi(
        x,
        ids,
        weight,
        bias,
        torch.stack([m.lora_A for m in modules]),
        torch.stack([m.lora_B for m in modules]),
        scale=scale,
    )


def _per_row_loop(z, residual, ids, fns, init) -> torch.Tensor:
    out = init.clone() if init is not None else torch.zeros_like(z)
    for i, fn in enumerate(fns):
        rows = (ids == i).nonzero(as_tuple=True)[0]
        if rows.numel():
            res = residual.index_select(0, rows) if residual is not None else None
            out = out.index_copy(0, rows, fn(z.index_select(0, rows), res))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The rewrite side: emit the fused call at a projection.
def lower_projection(emitter: Any, site: Any, target: str) -> bool:
    """At a module site: replace ``proj(x)`` (and the LoRA update that would follow it) by one
    ``fused_lora(proj, lora, x)`` node when :func:`why_not_fused` allows; record why (not) in ``emitter.notes``.
    Returns whether it lowered. ``emitter.name`` is the adapter's node name."""
    lora = emitter.root.get_submodule(target)
    call = next(n for n in emitter.graph.nodes if n.name == site.node)
    why = None
    if emitter.node(site.node) is not call:
        why = "an earlier adapter at this projection already changed its output"
    if why is None and (call.op != "call_module" or len(call.args) != 1 or call.kwargs):
        why = f"the projection is called as {call.op} {call.target} with {len(call.args)} args, not proj(x)"
    if why is None:
        why = why_not_fused(lora, proj=emitter.root.get_submodule(str(call.target)), x_dtype=emitter.dtype)
    if why is not None:
        emitter.notes.append(f"{emitter.name}: not lowered: {why}")
        return False
    with emitter.after(site.node):
        proj_node, lora_node = emitter.attr(str(call.target)), emitter.attr(target)
        out = emitter.function(fused_lora, (proj_node, lora_node, call.args[0]))
        out.name = emitter.graph._graph_namespace.create_name(f"{emitter.name}_fused", out)
    emitter.replace_node(site.node, out)
    if not call.users:
        emitter.graph.erase_node(call)
    emitter.notes.append(f"{emitter.name}: lowered to fxadapt.kernels.lora_linear")
    return True

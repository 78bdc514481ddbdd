"""Batched multi-adapter ops: each row (or each sequence) uses its own adapter from a stacked weight bank.

Public entry points :func:`bottleneck_multi` and :func:`lora_multi`; ops ``torch.ops.fxadapt.bottleneck_multi``,
``bottleneck_multi_bwd``, ``lora_multi``, ``lora_multi_bwd``. Adapter id −1 means "no adapter": the bottleneck
passes the row through (y = r), LoRA returns the base output. Gradients flow to every adapter of the bank at once
(training several adapters in one batch). On the Triton path the rows are grouped by adapter inside the launcher
(argsort + per-adapter row blocks, all on the device); the reference path loops over adapters.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    act_code,
    canonical_act,
    check_ids,
    compute_dtype,
    expand_ids,
    kernel_module,
    lead_rows,
    on_device_of,
    saved_dtype,
    split_scale,
    upcast,
    use_triton,
)
from .bottleneck import _bwd_fake, _bwd_outputs
from .lora import lora_bwd_fake, lora_bwd_outputs

Tensor = torch.Tensor


def _bank_scale(scale: float | Tensor | None, adapters: int) -> tuple[float, Tensor | None]:
    """Public scale → (float, per-adapter tensor [A] or None). A scalar tensor is expanded (a view: its gradient is
    the sum over adapters)."""
    scale_f, scale_t = split_scale(scale)
    if scale_t is not None:
        if scale_t.numel() not in (1, adapters):
            raise ValueError(
                f"scale must be a float, a scalar or per-adapter [{adapters}], got {tuple(scale_t.shape)}"
            )
        scale_t = scale_t.reshape(-1).expand(adapters)
    return scale_f, scale_t


def bottleneck_multi(
    x: Tensor,
    adapter_ids: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor | None = None,
    act: str = "relu",
    residual: Tensor | None = None,
) -> Tensor:
    """:func:`~fxadapt.kernels.bottleneck` with one adapter per row, from a bank of ``A`` adapters.

    Args:
        x: ``[..., d]``.
        adapter_ids: integer tensor whose shape is a prefix of ``x.shape[:-1]`` — ``[N]`` per row, ``[B]`` per
            sequence of a ``[B, T, d]`` batch, … — values in ``[-1, A)``; −1 = no adapter (y = r).
        w_down ``[A, r, d]``, b_down ``[A, r]``, w_up ``[A, d, r]``, b_up ``[A, d]`` (biases may be None).
        scale: None (1), a float, a scalar tensor or a per-adapter tensor ``[A]``.
        act, residual: as for :func:`~fxadapt.kernels.bottleneck` (one activation for the whole bank).
    """
    if w_down.dim() != 3 or w_down.shape[2] != x.shape[-1]:
        raise ValueError(f"w_down must be [A, r, d] with d = {x.shape[-1]}, got {tuple(w_down.shape)}")
    adapters, r, d = w_down.shape
    expect = {
        "w_up": (w_up, (adapters, d, r)),
        "b_down": (b_down, (adapters, r)),
        "b_up": (b_up, (adapters, d)),
    }
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    ids = expand_ids(adapter_ids, x.shape[:-1])
    scale_f, scale_t = _bank_scale(scale, adapters)
    y, _ = torch.ops.fxadapt.bottleneck_multi(
        x, ids, w_down, b_down, w_up, b_up, scale_f, scale_t, canonical_act(act), residual
    )
    return y


def lora_multi(
    x: Tensor,
    adapter_ids: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor | None = None,
) -> Tensor:
    """:func:`~fxadapt.kernels.lora_linear` with one LoRA per row from a bank: ``lora_a [A, r, d_in]``,
    ``lora_b [A, d_out, r]``, ``scale`` None / float / scalar / ``[A]``; id −1 = base output only."""
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"weight must be [d_out, {d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if lora_a.dim() != 3 or lora_a.shape[2] != d_in:
        raise ValueError(f"lora_a must be [A, r, {d_in}], got {tuple(lora_a.shape)}")
    adapters, r = lora_a.shape[0], lora_a.shape[1]
    if tuple(lora_b.shape) != (adapters, d_out, r):
        raise ValueError(f"lora_b must be [{adapters}, {d_out}, {r}], got {tuple(lora_b.shape)}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must be [{d_out}], got {tuple(bias.shape)}")
    ids = expand_ids(adapter_ids, x.shape[:-1])
    scale_f, scale_t = _bank_scale(scale, adapters)
    y, _ = torch.ops.fxadapt.lora_multi(x, ids, weight, bias, lora_a, lora_b, scale_f, scale_t)
    return y


def _bank_scale_c(scale: float, scale_t: Tensor | None, c: torch.dtype) -> float | Tensor:
    """Effective per-adapter scale for the reference fallback: the float, or float × ``scale_t [A]``."""
    return scale if scale_t is None else scale * scale_t.to(c)


# ----------------------------------------------------------------------------------------------------------------
# Bottleneck ops.
@torch.library.custom_op("fxadapt::bottleneck_multi", mutates_args=())
def bottleneck_multi_op(
    x: Tensor,
    ids: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float,
    scale_t: Tensor | None,
    act: str,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``ids`` has one entry per flattened row. Returns (y, h [N, r] fp32, 0 on passthrough rows)."""
    adapters, r, d = w_down.shape
    check_ids(ids, adapters)
    ids = on_device_of(ids, x) or ids
    scale_t = on_device_of(scale_t, x) or scale_t
    x2 = x.reshape(-1, d)
    r2 = None if residual is None else residual.reshape(-1, d)
    if use_triton(x, w_down, b_down, w_up, b_up, residual, rank=r):
        y, h = kernel_module("bottleneck").forward(
            x2, w_down, b_down, w_up, b_up, scale, scale_t, act_code(act), r2, ids
        )
        return y.view(x.shape), h
    c = compute_dtype(x)  # reference.bottleneck_multi_parts in fp32 (fp64 for fp64 inputs)
    xc, wd, bd, wu, bu, rc = upcast(c, x2, w_down, b_down, w_up, b_up, r2)
    y, h = reference.bottleneck_multi_parts(
        xc, ids, wd, bd, wu, bu, _bank_scale_c(scale, scale_t, c), act, rc
    )
    return y.to(x.dtype).view(x.shape), h.to(saved_dtype(x))


@bottleneck_multi_op.register_fake
def _(x, ids, w_down, b_down, w_up, b_up, scale, scale_t, act, residual):
    return x.new_empty(x.shape), x.new_empty((lead_rows(x), w_down.shape[1]), dtype=saved_dtype(x))


@torch.library.custom_op("fxadapt::bottleneck_multi_bwd", mutates_args=())
def bottleneck_multi_bwd_op(
    dy: Tensor,
    x: Tensor,
    ids: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    h: Tensor,
    scale: float,
    scale_t: Tensor | None,
    act: str,
    residual_is_x: bool,
    need_dx: bool,
    need_dw: bool,
    need_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dWd, dbd, dWu, dbu, d scale_t) in bank shapes; entries not requested are empty tensors."""
    d, r = x.shape[-1], w_down.shape[1]
    dy2, x2 = dy.reshape(-1, d).to(x.dtype), x.reshape(-1, d)
    home = None if scale_t is None else scale_t.device  # d scale_t goes back there
    ids = on_device_of(ids, x) or ids
    scale_t = on_device_of(scale_t, x) or scale_t
    if use_triton(x, w_down, b_down, w_up, b_up, rank=r):
        out = kernel_module("bottleneck").backward(
            dy2, x2, w_down, b_down, w_up, b_up, h, scale, scale_t, act_code(act),
            residual_is_x, need_dx, need_dw, need_dscale, ids,
        )  # fmt: skip
    else:
        out = reference.bottleneck_multi_bwd_ref(
            dy2, x2, ids, w_down, b_down, w_up, b_up, h, scale, scale_t, act, residual_is_x
        )
    out = (*out[:5], None if out[5] is None else out[5].to(home))
    return _bwd_outputs(x, *out, need_dx, need_dw, need_dscale)


@bottleneck_multi_bwd_op.register_fake
def _(
    dy,
    x,
    ids,
    w_down,
    b_down,
    w_up,
    b_up,
    h,
    scale,
    scale_t,
    act,
    residual_is_x,
    need_dx,
    need_dw,
    need_dscale,
):
    return _bwd_fake(x, w_down, b_down, w_up, b_up, scale_t, need_dx, need_dw, need_dscale)


def _bn_setup(ctx, inputs, output):
    x, ids, w_down, b_down, w_up, b_up, scale, scale_t, act, residual = inputs
    ctx.save_for_backward(x, ids, w_down, b_down, w_up, b_up, scale_t, output[1])
    ctx.scale, ctx.act, ctx.has_residual = scale, act, residual is not None


def _bn_backward(ctx, dy, _dh):
    x, ids, w_down, b_down, w_up, b_up, scale_t, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = any(need[2:6])
    need_ds = scale_t is not None and need[7]
    dx, dwd, dbd, dwu, dbu, ds = torch.ops.fxadapt.bottleneck_multi_bwd(
        dy, x, ids, w_down, b_down, w_up, b_up, h, ctx.scale, scale_t, ctx.act,
        not ctx.has_residual, need[0], need_dw, need_ds,
    )  # fmt: skip
    return (
        dx if need[0] else None,
        None,
        dwd if need[2] else None,
        dbd if need[3] else None,
        dwu if need[4] else None,
        dbu if need[5] else None,
        None,
        ds if need_ds else None,
        None,
        dy if ctx.has_residual and need[9] else None,
    )


bottleneck_multi_op.register_autograd(_bn_backward, setup_context=_bn_setup)


# ----------------------------------------------------------------------------------------------------------------
# LoRA ops.
@torch.library.custom_op("fxadapt::lora_multi", mutates_args=())
def lora_multi_op(
    x: Tensor,
    ids: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    scale_t: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``ids`` has one entry per flattened row. Returns (y, t = x·A[id]ᵀ [N, r] fp32, 0 on passthrough rows)."""
    adapters, r, d_in = lora_a.shape
    d_out = weight.shape[0]
    check_ids(ids, adapters)
    ids = on_device_of(ids, x) or ids
    scale_t = on_device_of(scale_t, x) or scale_t
    x2 = x.reshape(-1, d_in)
    if use_triton(x, weight, bias, lora_a, lora_b, rank=r):
        y, t = kernel_module("lora").forward(x2, weight, bias, lora_a, lora_b, scale, scale_t, ids)
        return y.view(*x.shape[:-1], d_out), t
    c = compute_dtype(x)  # reference.lora_multi_parts in fp32 (fp64 for fp64 inputs)
    y, t = reference.lora_multi_parts(
        *upcast(c, x2), ids, *upcast(c, weight, bias, lora_a, lora_b), _bank_scale_c(scale, scale_t, c)
    )
    return y.to(x.dtype).view(*x.shape[:-1], d_out), t.to(saved_dtype(x))


@lora_multi_op.register_fake
def _(x, ids, weight, bias, lora_a, lora_b, scale, scale_t):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((lead_rows(x), lora_a.shape[1]), dtype=saved_dtype(x))


@torch.library.custom_op("fxadapt::lora_multi_bwd", mutates_args=())
def lora_multi_bwd_op(
    dy: Tensor,
    x: Tensor,
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    t: Tensor,
    scale: float,
    scale_t: Tensor | None,
    need_dx: bool,
    need_dw: bool,
    need_lora: bool,
    need_dscale: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dW, db, dA bank, dB bank, d scale_t); entries not requested are empty tensors."""
    d_in, d_out, r = x.shape[-1], weight.shape[0], lora_a.shape[1]
    dy2, x2 = dy.reshape(-1, d_out).to(x.dtype), x.reshape(-1, d_in)
    home = None if scale_t is None else scale_t.device  # d scale_t goes back there
    ids = on_device_of(ids, x) or ids
    scale_t = on_device_of(scale_t, x) or scale_t
    if use_triton(x, weight, lora_a, lora_b, rank=r):
        out = kernel_module("lora").backward(
            dy2, x2, weight, lora_a, lora_b, t, scale, scale_t, need_dx, need_dw, need_lora, need_dscale, ids
        )
    else:
        out = reference.lora_multi_bwd_ref(dy2, x2, ids, weight, lora_a, lora_b, t, scale, scale_t)
    out = (*out[:5], None if out[5] is None else out[5].to(home))
    return lora_bwd_outputs(x, *out, need_dx, need_dw, need_lora, need_dscale)


@lora_multi_bwd_op.register_fake
def _(dy, x, ids, weight, lora_a, lora_b, t, scale, scale_t, need_dx, need_dw, need_lora, need_dscale):
    return lora_bwd_fake(x, weight, lora_a, lora_b, scale_t, need_dx, need_dw, need_lora, need_dscale)


def _lora_setup(ctx, inputs, output):
    x, ids, weight, bias, lora_a, lora_b, scale, scale_t = inputs
    ctx.save_for_backward(x, ids, weight, lora_a, lora_b, scale_t, output[1])
    ctx.scale, ctx.has_bias = scale, bias is not None


def _lora_backward(ctx, dy, _dt):
    x, ids, weight, lora_a, lora_b, scale_t, t = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_ds = scale_t is not None and need[7]
    dx, dw, db, da, dbb, ds = torch.ops.fxadapt.lora_multi_bwd(
        dy, x, ids, weight, lora_a, lora_b, t, ctx.scale, scale_t,
        need[0], need[2] or need[3], need[4] or need[5], need_ds,
    )  # fmt: skip
    return (
        dx if need[0] else None,
        None,
        dw if need[2] else None,
        db if need[3] and ctx.has_bias else None,
        da if need[4] else None,
        dbb if need[5] else None,
        None,
        ds if need_ds else None,
    )


lora_multi_op.register_autograd(_lora_backward, setup_context=_lora_setup)

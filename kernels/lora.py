"""Fused LoRA linear: ``y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``.

Public entry point :func:`lora_linear`; ops ``torch.ops.fxadapt.lora_linear`` (returns ``(y, t)`` with
``t = x·Aᵀ [N, r]`` saved for backward) and ``torch.ops.fxadapt.lora_bwd``. Dispatch inside the op: Triton kernels
(``_triton_lora``) when :func:`~fxadapt.kernels.can_use_triton` says yes, the PyTorch reference otherwise.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    bank1,
    compute_dtype,
    kernel_module,
    lead_rows,
    on_device_of,
    or_empty,
    saved_dtype,
    split_scale,
    unbank1,
    upcast,
    use_triton,
)

Tensor = torch.Tensor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """A linear layer with its LoRA update, fused.

    Args:
        x: ``[..., d_in]``.
        weight, bias: the base ``nn.Linear``: ``[d_out, d_in]`` / ``[d_out]`` (bias may be None). Usually frozen;
            gradients are produced when they require grad.
        lora_a: ``[r, d_in]`` (PEFT's ``lora_A.weight``); lora_b: ``[d_out, r]`` (``lora_B.weight``). Any strides.
        scale: ``alpha / r`` (or ``alpha / √r`` for rsLoRA) as a float, or a scalar tensor (differentiable).

    Returns ``[..., d_out]`` in x's dtype. LoRA dropout is not part of the op: with dropout p > 0 in training the
    LoRA input differs from the base input, so callers must use the reference there.
    """
    _check(x, weight, bias, lora_a, lora_b, scale)
    scale_f, scale_t = split_scale(scale)
    y, _ = torch.ops.fxadapt.lora_linear(x, weight, bias, lora_a, lora_b, scale_f, scale_t)
    return y


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    d_in = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != d_in:
        raise ValueError(f"weight must be [d_out, d_in] = [d_out, {d_in}], got {tuple(weight.shape)}")
    d_out = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise ValueError(f"bias must be [d_out] = [{d_out}], got {tuple(bias.shape)}")
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        raise ValueError(f"lora_a must be [r, d_in] = [r, {d_in}], got {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    if tuple(lora_b.shape) != (d_out, r):
        raise ValueError(f"lora_b must be [d_out, r] = [{d_out}, {r}], got {tuple(lora_b.shape)}")
    if isinstance(scale, Tensor) and scale.numel() != 1:
        raise ValueError(f"a tensor scale must hold one value, got shape {tuple(scale.shape)}")


@torch.library.custom_op("fxadapt::lora_linear", mutates_args=())
def lora_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    scale_t: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Returns (y [..., d_out], t = x·Aᵀ [N, r] fp32). The effective scale is ``scale * scale_t``."""
    d_in, d_out, r = x.shape[-1], weight.shape[0], lora_a.shape[0]
    x2 = x.reshape(-1, d_in)
    scale_t = on_device_of(scale_t, x) or scale_t
    if use_triton(x, weight, bias, lora_a, lora_b, rank=r):
        y, t = kernel_module("lora").forward(
            x2, weight, bias, bank1(lora_a), bank1(lora_b), scale, scale_t, None
        )
    else:  # reference.lora_parts in fp32 (fp64 for fp64 inputs)
        c = compute_dtype(x)
        s = scale if scale_t is None else scale * scale_t.to(c).reshape(())
        y, t = reference.lora_parts(*upcast(c, x2, weight, bias, lora_a, lora_b), s)
        y, t = y.to(x.dtype), t.to(saved_dtype(x))
    return y.view(*x.shape[:-1], d_out), t


@lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, scale_t):
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return y, x.new_empty((lead_rows(x), lora_a.shape[0]), dtype=saved_dtype(x))


@torch.library.custom_op("fxadapt::lora_bwd", mutates_args=())
def lora_bwd_op(
    dy: Tensor,
    x: Tensor,
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
    """(dx, dW, db, dA, dB, d scale_t); entries not requested are empty tensors. ``need_dw`` covers W and b."""
    d_in, d_out, r = x.shape[-1], weight.shape[0], lora_a.shape[0]
    dy2, x2 = dy.reshape(-1, d_out).to(x.dtype), x.reshape(-1, d_in)
    home = None if scale_t is None else scale_t.device  # d scale_t goes back there
    scale_t = on_device_of(scale_t, x) or scale_t
    if use_triton(x, weight, lora_a, lora_b, rank=r):
        dx, dw, db, da, dbb, ds = kernel_module("lora").backward(
            dy2, x2, weight, bank1(lora_a), bank1(lora_b), t, scale, scale_t,
            need_dx, need_dw, need_lora, need_dscale, None,
        )  # fmt: skip
        da, dbb = unbank1(da), unbank1(dbb)
    else:
        dx, dw, db, da, dbb, ds = reference.lora_bwd_ref(dy2, x2, weight, lora_a, lora_b, t, scale, scale_t)
    ds = None if ds is None else ds.to(home)
    return lora_bwd_outputs(x, dx, dw, db, da, dbb, ds, need_dx, need_dw, need_lora, need_dscale)


def lora_bwd_outputs(x, dx, dw, db, da, dbb, ds, need_dx, need_dw, need_lora, need_dscale):
    """Shape the backward results for the op schema (also used by the multi-adapter op)."""
    return (
        dx.reshape(x.shape).contiguous() if need_dx else x.new_empty((0,)),
        or_empty(dw if need_dw else None, x),
        or_empty(db if need_dw else None, x),
        or_empty(da if need_lora else None, x),
        or_empty(dbb if need_lora else None, x),
        or_empty(ds if need_dscale else None, x),
    )


def lora_bwd_fake(x, weight, lora_a, lora_b, scale_t, need_dx, need_dw, need_lora, need_dscale):
    def like(t: Tensor | None, wanted: bool, shape=None) -> Tensor:
        if not wanted or t is None:
            return x.new_empty((0,))
        return t.new_empty(t.shape if shape is None else shape)

    return (
        like(x, need_dx),
        like(weight, need_dw),
        like(weight, need_dw, (weight.shape[0],)),
        like(lora_a, need_lora),
        like(lora_b, need_lora),
        like(scale_t, need_dscale),
    )


@lora_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, t, scale, scale_t, need_dx, need_dw, need_lora, need_dscale):
    return lora_bwd_fake(x, weight, lora_a, lora_b, scale_t, need_dx, need_dw, need_lora, need_dscale)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, scale_t = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, scale_t, output[1])
    ctx.scale, ctx.has_bias = scale, bias is not None


def _backward(ctx, dy, _dt):
    x, weight, lora_a, lora_b, scale_t, t = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = need[1] or need[2]
    need_ds = scale_t is not None and need[6]
    dx, dw, db, da, dbb, ds = torch.ops.fxadapt.lora_bwd(
        dy, x, weight, lora_a, lora_b, t, ctx.scale, scale_t, need[0], need_dw, need[3] or need[4], need_ds
    )
    return (
        dx if need[0] else None,
        dw if need[1] else None,
        db if need[2] and ctx.has_bias else None,
        da if need[3] else None,
        dbb if need[4] else None,
        None,
        ds if need_ds else None,
    )


lora_linear_op.register_autograd(_backward, setup_context=_setup_context)

"""Fused bottleneck adapter: ``y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu)``.

Public entry point :func:`bottleneck`; ops ``torch.ops.fxadapt.bottleneck`` (forward, returns ``(y, h)``) and
``torch.ops.fxadapt.bottleneck_bwd`` (all gradients from the saved pre-activation ``h``). Both dispatch inside the
op: Triton kernels (``_triton_bottleneck``) when :func:`~fxadapt.kernels.can_use_triton` says yes, otherwise the
PyTorch reference (``reference.py``), so callers never branch and ``torch.compile`` sees one opaque node.

Forward saves only ``h [N, r]`` (fp32) besides the inputs; backward recomputes act(h) from it.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import (
    act_code,
    bank1,
    canonical_act,
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


def bottleneck(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor = 1.0,
    act: str = "relu",
    residual: Tensor | None = None,
) -> Tensor:
    """Bottleneck adapter with its residual add, fused.

    Args:
        x: ``[..., d]`` adapter input (leading dims are flattened into rows).
        w_down, b_down: down projection, ``nn.Linear(d, r)`` layout ``[r, d]`` / ``[r]`` (bias may be None).
        w_up, b_up: up projection, ``[d, r]`` / ``[d]``. Weights may be non-contiguous views (e.g. ``.t()``).
        scale: Python float, scalar tensor (``[]`` or ``[1]``, e.g. learned) or per-channel tensor ``[d]``.
        act: ``relu``, ``gelu`` (erf), ``gelu_tanh`` (alias ``gelu_new``), ``silu`` (alias ``swish``), ``tanh``,
            ``identity`` (alias ``linear``).
        residual: tensor added instead of x (same shape as x): the ``par_bn`` form reads x but adds the
            sublayer's residual stream. None: ``y = x + s·A(x)`` (``seq_bn``).

    Returns ``y`` with x's shape and dtype. Differentiable in every tensor argument.
    """
    _check(x, w_down, b_down, w_up, b_up, scale, residual)
    scale_f, scale_t = split_scale(scale)
    y, _ = torch.ops.fxadapt.bottleneck(
        x, w_down, b_down, w_up, b_up, scale_f, scale_t, canonical_act(act), residual
    )
    return y


def _check(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor,
    residual: Tensor | None,
) -> None:
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    d = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != d:
        raise ValueError(f"w_down must be [r, d] = [r, {d}] (nn.Linear layout), got {tuple(w_down.shape)}")
    r = w_down.shape[0]
    if tuple(w_up.shape) != (d, r):
        raise ValueError(f"w_up must be [d, r] = [{d}, {r}], got {tuple(w_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (r,):
        raise ValueError(f"b_down must be [r] = [{r}], got {tuple(b_down.shape)}")
    if b_up is not None and tuple(b_up.shape) != (d,):
        raise ValueError(f"b_up must be [d] = [{d}], got {tuple(b_up.shape)}")
    if isinstance(scale, Tensor) and scale.numel() not in (1, d):
        raise ValueError(
            f"a tensor scale must be a scalar or per-channel [{d}], got shape {tuple(scale.shape)}"
        )
    if isinstance(scale, Tensor) and scale.numel() == d and scale.dim() != 1 and d != 1:
        raise ValueError(f"a per-channel scale must be 1-D [{d}], got shape {tuple(scale.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Ops.
@torch.library.custom_op("fxadapt::bottleneck", mutates_args=())
def bottleneck_op(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float,
    scale_t: Tensor | None,
    act: str,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Returns (y with x's shape, h [N, r] fp32). The effective scale is ``scale * scale_t``."""
    d, r = x.shape[-1], w_down.shape[0]
    x2 = x.reshape(-1, d)
    r2 = None if residual is None else residual.reshape(-1, d)
    scale_t = scale_t if scale_t is None or scale_t.device == x.device else scale_t.to(x.device)
    if use_triton(x, w_down, b_down, w_up, b_up, residual, rank=r):
        y, h = kernel_module("bottleneck").forward(
            x2,
            bank1(w_down),
            bank1(b_down),
            bank1(w_up),
            bank1(b_up),
            scale,
            scale_t,
            act_code(act),
            r2,
            None,
        )
    else:
        y, h = _forward_fallback(x2, w_down, b_down, w_up, b_up, scale, scale_t, act, r2)
    return y.view(x.shape), h


def _forward_fallback(
    x2: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float,
    scale_t: Tensor | None,
    act: str,
    r2: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """``reference.bottleneck_parts`` in fp32 (fp64 for fp64 inputs), returning the same (y, h) as the kernels."""
    c = compute_dtype(x2)
    s = scale if scale_t is None else scale * scale_t.to(c).reshape(-1)
    xc, wd, bd, wu, bu, rc = upcast(c, x2, w_down, b_down, w_up, b_up, r2)
    y, h = reference.bottleneck_parts(xc, wd, bd, wu, bu, s, act, rc)
    return y.to(x2.dtype), h.to(saved_dtype(x2))


@bottleneck_op.register_fake
def _(x, w_down, b_down, w_up, b_up, scale, scale_t, act, residual):
    return x.new_empty(x.shape), x.new_empty((lead_rows(x), w_down.shape[0]), dtype=saved_dtype(x))


@torch.library.custom_op("fxadapt::bottleneck_bwd", mutates_args=())
def bottleneck_bwd_op(
    dy: Tensor,
    x: Tensor,
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
    """(dx, dWd, dbd, dWu, dbu, d scale_t); entries not requested (or whose input is None) are empty tensors.
    ``dx`` includes dy when ``residual_is_x``; the separate residual's gradient is dy itself (no op needed)."""
    d, r = x.shape[-1], w_down.shape[0]
    dy2, x2 = dy.reshape(-1, d).to(x.dtype), x.reshape(-1, d)
    home = None if scale_t is None else scale_t.device  # d scale_t goes back there
    scale_t = on_device_of(scale_t, x) or scale_t
    if use_triton(x, w_down, b_down, w_up, b_up, rank=r):
        dx, dwd, dbd, dwu, dbu, ds = kernel_module("bottleneck").backward(
            dy2, x2, bank1(w_down), bank1(b_down), bank1(w_up), bank1(b_up), h, scale, scale_t, act_code(act),
            residual_is_x, need_dx, need_dw, need_dscale, None,
        )  # fmt: skip
        dwd, dbd, dwu, dbu = unbank1(dwd), unbank1(dbd), unbank1(dwu), unbank1(dbu)
    else:
        dx, dwd, dbd, dwu, dbu, ds = reference.bottleneck_bwd_ref(
            dy2, x2, w_down, b_down, w_up, b_up, h, scale, scale_t, act, residual_is_x
        )
    ds = None if ds is None else ds.to(home)
    return _bwd_outputs(x, dx, dwd, dbd, dwu, dbu, ds, need_dx, need_dw, need_dscale)


def _bwd_outputs(x, dx, dwd, dbd, dwu, dbu, ds, need_dx, need_dw, need_dscale):
    """Shape the backward results for the op schema (also used by the multi-adapter op)."""
    out_dx = dx.reshape(x.shape).contiguous() if need_dx else x.new_empty((0,))
    if not need_dw:
        dwd = dbd = dwu = dbu = None
    return (
        out_dx,
        or_empty(dwd, x),
        or_empty(dbd, x),
        or_empty(dwu, x),
        or_empty(dbu, x),
        or_empty(ds if need_dscale else None, x),
    )


@bottleneck_bwd_op.register_fake
def _(
    dy, x, w_down, b_down, w_up, b_up, h, scale, scale_t, act, residual_is_x, need_dx, need_dw, need_dscale
):
    return _bwd_fake(x, w_down, b_down, w_up, b_up, scale_t, need_dx, need_dw, need_dscale)


def _bwd_fake(x, w_down, b_down, w_up, b_up, scale_t, need_dx, need_dw, need_dscale):
    def like(t: Tensor | None, wanted: bool) -> Tensor:
        return t.new_empty(t.shape) if wanted and t is not None else x.new_empty((0,))

    return (
        like(x, need_dx),
        like(w_down, need_dw),
        like(b_down, need_dw),
        like(w_up, need_dw),
        like(b_up, need_dw),
        like(scale_t, need_dscale),
    )


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, scale, scale_t, act, residual = inputs
    ctx.save_for_backward(x, w_down, b_down, w_up, b_up, scale_t, output[1])
    ctx.scale, ctx.act, ctx.has_residual = scale, act, residual is not None


def _backward(ctx, dy, _dh):
    x, w_down, b_down, w_up, b_up, scale_t, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dw = any(need[1:5])
    need_ds = scale_t is not None and need[6]
    dx, dwd, dbd, dwu, dbu, ds = torch.ops.fxadapt.bottleneck_bwd(
        dy, x, w_down, b_down, w_up, b_up, h, ctx.scale, scale_t, ctx.act,
        not ctx.has_residual, need[0], need_dw, need_ds,
    )  # fmt: skip
    return (
        dx if need[0] else None,
        dwd if need[1] else None,
        dbd if need[2] else None,
        dwu if need[3] else None,
        dbu if need[4] else None,
        None,
        ds if need_ds else None,
        None,
        dy if ctx.has_residual and need[8] else None,
    )


bottleneck_op.register_autograd(_backward, setup_context=_setup_context)

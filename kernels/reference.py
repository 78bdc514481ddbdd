"""Plain-PyTorch reference implementations of every fused op.

Two kinds of functions live here:

* ``*_ref`` — the forward math, written the obvious way (a few ``F.linear`` calls). Differentiable with autograd,
  dtype-agnostic (the tests run them in fp64 as the ground truth; the benchmarks time them as the eager baseline).
* ``*_bwd_ref`` — explicit gradient formulas. They are what the ops run for backward when the Triton kernels
  cannot (CPU, no Triton), and the tests check them against autograd through the ``*_ref`` functions.

Shapes follow ``nn.Linear``: ``w_down [r, d]``, ``w_up [d, r]``, LoRA ``lora_a [r, d_in]``, ``lora_b [d_out, r]``;
banks stack these on a leading adapter dim. Multi-adapter references run each adapter separately on its rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import act_code, compute_dtype, expand_ids

Tensor = torch.Tensor


def activation(h: Tensor, act: str) -> Tensor:
    """``act(h)`` for the supported activation names (see ``_common.ACTIVATIONS``)."""
    code = act_code(act)
    if code == 1:
        return F.relu(h)
    if code == 2:
        return F.gelu(h)
    if code == 3:
        return F.gelu(h, approximate="tanh")
    if code == 4:
        return F.silu(h)
    if code == 5:
        return torch.tanh(h)
    return h


def activation_grad(h: Tensor, act: str) -> Tensor:
    """``act'(h)`` written out (the fallback backward uses it; the tests check it against autograd)."""
    code = act_code(act)
    if code == 1:
        return (h > 0).to(h.dtype)  # matches autograd's relu backward: 0 at h == 0
    if code == 2:
        # d/dh [h Φ(h)] = Φ(h) + h φ(h)
        cdf = 0.5 * (1.0 + torch.erf(h * 0.7071067811865476))
        pdf = torch.exp(-0.5 * h * h) * 0.3989422804014327  # 1/√(2π)
        return cdf + h * pdf
    if code == 3:
        # g = ½h(1 + tanh u), u = √(2/π)(h + 0.044715h³) ⇒ g' = ½(1 + tanh u) + ½h(1 − tanh²u)·u'
        k = 0.7978845608028654  # √(2/π)
        th = torch.tanh(k * (h + 0.044715 * h**3))
        return 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * k * (1.0 + 3 * 0.044715 * h * h)
    if code == 4:
        sig = torch.sigmoid(h)
        return sig * (1.0 + h * (1.0 - sig))
    if code == 5:
        th = torch.tanh(h)
        return 1.0 - th * th
    return torch.ones_like(h)


# ----------------------------------------------------------------------------------------------------------------
# Forward references. Each ``*_ref`` has a ``*_parts`` twin that also returns the [N, r] intermediate the fused op
# saves for backward (h or t): the ops' fallback path runs exactly these.
def bottleneck_parts(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor = 1.0,
    act: str = "relu",
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, h) with h = x·Wdᵀ + bd the pre-activation and y = r + s·(act(h)·Wuᵀ + bu)."""
    h = F.linear(x, w_down, b_down)
    a = F.linear(activation(h, act), w_up, b_up)
    r = x if residual is None else residual
    return r + scale * a, h


def bottleneck_ref(
    x: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor = 1.0,
    act: str = "relu",
    residual: Tensor | None = None,
) -> Tensor:
    """y = r + s·(act(x·Wdᵀ + bd)·Wuᵀ + bu), r = ``residual`` if given else x. ``scale``: float, scalar or [d]."""
    return bottleneck_parts(x, w_down, b_down, w_up, b_up, scale, act, residual)[0]


def lora_parts(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """(y, t) with t = x·Aᵀ and y = x·Wᵀ + b + s·t·Bᵀ."""
    t = F.linear(x, lora_a)
    return F.linear(x, weight, bias) + scale * F.linear(t, lora_b), t


def lora_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ."""
    return lora_parts(x, weight, bias, lora_a, lora_b, scale)[0]


def _adapter_scale(scale: float | Tensor | None, a: int) -> float | Tensor:
    if scale is None:
        return 1.0
    if isinstance(scale, Tensor):
        return scale.reshape(-1)[a if scale.numel() > 1 else 0]  # per-adapter [A], or one scalar for all
    return scale


def _bank(t: Tensor | None, a: int) -> Tensor | None:
    return None if t is None else t[a]


def bottleneck_multi_parts(
    x2: Tensor,
    ids: Tensor,
    w_down: Tensor,
    b_down: Tensor | None,
    w_up: Tensor,
    b_up: Tensor | None,
    scale: float | Tensor | None = None,
    act: str = "relu",
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, h) over flat rows ``x2 [N, d]`` with one id per row: :func:`bottleneck_parts` once per adapter on its
    rows; −1 rows get y = r and h = 0. Out of place, so autograd sees every adapter's rows."""
    r2 = x2 if residual is None else residual
    y = r2
    h = x2.new_zeros((x2.shape[0], w_down.shape[1]))
    for a in range(w_down.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        ya, ha = bottleneck_parts(
            x2[rows],
            w_down[a],
            _bank(b_down, a),
            w_up[a],
            _bank(b_up, a),
            _adapter_scale(scale, a),
            act,
            r2[rows],
        )
        y = y.index_put((rows,), ya)
        h = h.index_put((rows,), ha)
    return y, h


def bottleneck_multi_ref(
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
    """Each row uses bank entry ``adapter_ids[row]`` (−1: y = r). Runs :func:`bottleneck_ref` once per adapter.

    Banks: ``w_down [A, r, d]``, ``b_down [A, r]``, ``w_up [A, d, r]``, ``b_up [A, d]``, ``scale [A]`` or float.
    This per-adapter Python loop is also the benchmarks' multi-adapter baseline.
    """
    d = x.shape[-1]
    ids = expand_ids(adapter_ids, x.shape[:-1]).to(x.device)
    r2 = None if residual is None else residual.reshape(-1, d)
    y, _ = bottleneck_multi_parts(x.reshape(-1, d), ids, w_down, b_down, w_up, b_up, scale, act, r2)
    return y.reshape(x.shape)


def lora_multi_parts(
    x2: Tensor,
    ids: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(y, t) over flat rows with one id per row; −1 rows: base output, t = 0."""
    y = F.linear(x2, weight, bias)
    t = x2.new_zeros((x2.shape[0], lora_a.shape[1]))
    for a in range(lora_a.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        ta = F.linear(x2[rows], lora_a[a])
        y = y.index_put((rows,), y[rows] + _adapter_scale(scale, a) * F.linear(ta, lora_b[a]))
        t = t.index_put((rows,), ta)
    return y, t


def lora_multi_ref(
    x: Tensor,
    adapter_ids: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float | Tensor | None = None,
) -> Tensor:
    """Each row adds LoRA bank entry ``adapter_ids[row]`` (−1: base output only). ``lora_a [A, r, d_in]``,
    ``lora_b [A, d_out, r]``, ``scale [A]`` or float. Runs :func:`lora_ref`'s low-rank term once per adapter."""
    d_in = x.shape[-1]
    ids = expand_ids(adapter_ids, x.shape[:-1]).to(x.device)
    y, _ = lora_multi_parts(x.reshape(-1, d_in), ids, weight, bias, lora_a, lora_b, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# Explicit backward formulas (the fallback's backward). All arithmetic in compute_dtype (fp32 for half inputs).
def _reduce_to(grad_channel: Tensor, like: Tensor) -> Tensor:
    """d/d(scale tensor) from d/d(per-channel scale): sum the channels unless the scale itself is per-channel."""
    g = grad_channel if like.numel() == grad_channel.numel() else grad_channel.sum()
    return g.reshape(like.shape).to(like.dtype)


def bottleneck_bwd_ref(
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
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """Gradients of :func:`bottleneck_ref` given the saved pre-activation ``h [N, r]``.

    Effective scale s = ``scale``·``scale_t`` (``scale_t`` None, scalar or [d]). Returns
    (dx [N, d], dWd, dbd, dWu, dbu, dscale_t), each None where the input is None. dx includes dy when the residual
    is x. With P = dyᵀ·act(h) and q = Σ_rows dy: dWu = s⊙P, dbu = s⊙q and dL/ds_j = P_j·Wu_j + q_j·bu_j.
    """
    c = compute_dtype(x)
    d = x.shape[-1]
    dy2, x2, hc = dy.reshape(-1, d).to(c), x.reshape(-1, d).to(c), h.to(c)
    wd, wu = w_down.to(c), w_up.to(c)
    s = torch.full((d,), scale, dtype=c, device=x.device)
    if scale_t is not None:
        s = s * scale_t.to(c).reshape(-1).expand(d)
    g = activation(hc, act)
    dh = ((dy2 * s) @ wu) * activation_grad(hc, act)
    dx = dh @ wd
    if residual_is_x:
        dx = dx + dy2
    p = dy2.t() @ g  # [d, r]
    q = dy2.sum(0)
    dwd = (dh.t() @ x2).to(w_down.dtype)
    dbd = None if b_down is None else dh.sum(0).to(b_down.dtype)
    dwu = (s[:, None] * p).to(w_up.dtype)
    dbu = None if b_up is None else (s * q).to(b_up.dtype)
    dscale = None
    if scale_t is not None:
        ds = (p * wu).sum(1)
        if b_up is not None:
            ds = ds + q * b_up.to(c)
        dscale = _reduce_to(scale * ds, scale_t)
    return dx.to(x.dtype), dwd, dbd, dwu, dbu, dscale


def lora_bwd_ref(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    t: Tensor,
    scale: float,
    scale_t: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`lora_ref` given the saved ``t = x·Aᵀ [N, r]``.

    Returns (dx, dW, db, dA, dB, dscale_t). With s = ``scale``·``scale_t`` and dt = dy·B:
    dx = dy·W + s·dt·A, dA = s·dtᵀx, dB = s·dyᵀt, dW = dyᵀx, db = Σ dy, dL/ds = ⟨dyᵀt, B⟩.
    """
    c = compute_dtype(x)
    d_in, d_out = x.shape[-1], dy.shape[-1]
    dy2, x2, tc = dy.reshape(-1, d_out).to(c), x.reshape(-1, d_in).to(c), t.to(c)
    a, b = lora_a.to(c), lora_b.to(c)
    s = scale * (1.0 if scale_t is None else scale_t.to(c).reshape(()))
    dt = dy2 @ b
    dx = dy2 @ weight.to(c) + (s * dt) @ a
    db_raw = dy2.t() @ tc
    dscale = None if scale_t is None else _reduce_to(scale * (db_raw * b).sum(), scale_t)
    return (
        dx.to(x.dtype),
        (dy2.t() @ x2).to(weight.dtype),
        dy2.sum(0).to(weight.dtype),
        (s * dt.t() @ x2).to(lora_a.dtype),
        (s * db_raw).to(lora_b.dtype),
        dscale,
    )


def _rows_of(ids: Tensor, a: int) -> Tensor:
    return (ids == a).nonzero().squeeze(1)


def bottleneck_multi_bwd_ref(
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
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """Per-adapter loop over :func:`bottleneck_bwd_ref`; ``ids`` one per flattened row. Bank-shaped grads."""
    d = x.shape[-1]
    x2, dy2 = x.reshape(-1, d), dy.reshape(-1, d)
    dx = dy2.clone() if residual_is_x else torch.zeros_like(x2)  # passthrough rows: y = r
    dwd, dwu = torch.zeros_like(w_down), torch.zeros_like(w_up)
    dbd = None if b_down is None else torch.zeros_like(b_down)
    dbu = None if b_up is None else torch.zeros_like(b_up)
    dscale = None if scale_t is None else torch.zeros_like(scale_t)
    for a in range(w_down.shape[0]):
        rows = _rows_of(ids, a)
        if rows.numel() == 0:
            continue
        out = bottleneck_bwd_ref(
            dy2[rows],
            x2[rows],
            w_down[a],
            None if b_down is None else b_down[a],
            w_up[a],
            None if b_up is None else b_up[a],
            h[rows],
            scale,
            None if scale_t is None else scale_t[a],
            act,
            residual_is_x,
        )
        dx[rows] = out[0]
        dwd[a], dwu[a] = out[1], out[3]
        if dbd is not None:
            dbd[a] = out[2]
        if dbu is not None:
            dbu[a] = out[4]
        if dscale is not None:
            dscale[a] = out[5]
    return dx.reshape(x.shape), dwd, dbd, dwu, dbu, dscale


def lora_multi_bwd_ref(
    dy: Tensor,
    x: Tensor,
    ids: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    t: Tensor,
    scale: float,
    scale_t: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Per-adapter loop over :func:`lora_bwd_ref`'s low-rank terms; base-layer grads over all rows."""
    c = compute_dtype(x)
    d_in, d_out = x.shape[-1], dy.shape[-1]
    x2, dy2 = x.reshape(-1, d_in).to(c), dy.reshape(-1, d_out).to(c)
    dx = dy2 @ weight.to(c)
    da, db = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
    dscale = None if scale_t is None else torch.zeros_like(scale_t)
    for a in range(lora_a.shape[0]):
        rows = _rows_of(ids, a)
        if rows.numel() == 0:
            continue
        s = scale * (1.0 if scale_t is None else scale_t[a].to(c))
        aa, bb = lora_a[a].to(c), lora_b[a].to(c)
        dt = dy2[rows] @ bb
        dx[rows] = dx[rows] + (s * dt) @ aa
        db_raw = dy2[rows].t() @ t[rows].to(c)
        da[a] = (s * dt.t() @ x2[rows]).to(lora_a.dtype)
        db[a] = (s * db_raw).to(lora_b.dtype)
        if dscale is not None:
            dscale[a] = (scale * (db_raw * bb).sum()).to(scale_t.dtype)
    dw = (dy2.t() @ x2).to(weight.dtype)
    dbias = dy2.sum(0).to(weight.dtype)
    return dx.to(x.dtype).reshape(x.shape), dw, dbias, da, db, dscale

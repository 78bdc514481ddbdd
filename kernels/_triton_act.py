"""The activations as Triton functions, by the codes of ``_common.ACTIVATIONS`` (the one activation table).

``act_fwd`` and ``act_bwd`` implement the same formulas as ``reference.activation`` / ``reference.activation_grad``;
act(0) = 0 for every code, so zero-padded rank lanes and masked rows stay zero after it.
"""

import triton
import triton.language as tl

_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)  # 1/√2, for erf-GELU
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # 1/√(2π), the normal pdf's constant
_SQRT_2_PI: tl.constexpr = tl.constexpr(0.7978845608028654)  # √(2/π), tanh-GELU
_GELU_C: tl.constexpr = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # tanh through exp(−2|u|) ∈ (0, 1]: never overflows (the interpreter would warn on exp(+large)).
    e = tl.exp(-2.0 * tl.abs(u))
    v = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, v, -v)


@triton.jit
def _sigmoid(h):
    e = tl.exp(-tl.abs(h))  # same overflow-free trick: σ(h) = 1/(1+e) for h ≥ 0, e/(1+e) for h < 0
    return tl.where(h >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def act_fwd(h, ACT: tl.constexpr):
    """Activation by code (see ``_common.ACTIVATIONS``). act(0) = 0 for every code, so zero-padded rank columns and
    masked rows stay zero after it."""
    if ACT == 1:
        g = tl.maximum(h, 0.0)
    elif ACT == 2:
        g = 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))
    elif ACT == 3:
        g = 0.5 * h * (1.0 + _tanh((h + h * h * h * _GELU_C) * _SQRT_2_PI))
    elif ACT == 4:
        g = h * _sigmoid(h)
    elif ACT == 5:
        g = _tanh(h)
    else:
        g = h
    return g


@triton.jit
def act_bwd(h, ACT: tl.constexpr):
    """act'(h); the same formulas as ``reference.activation_grad``."""
    if ACT == 1:
        d = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACT == 3:
        th = _tanh((h + h * h * h * _GELU_C) * _SQRT_2_PI)
        d = 0.5 * (1.0 + th) + 0.5 * h * (1.0 - th * th) * _SQRT_2_PI * (1.0 + h * h * (3.0 * _GELU_C))
    elif ACT == 4:
        sg = _sigmoid(h)
        d = sg * (1.0 + h * (1.0 - sg))
    elif ACT == 5:
        th = _tanh(h)
        d = 1.0 - th * th
    else:
        d = tl.full(h.shape, 1.0, tl.float32)
    return d

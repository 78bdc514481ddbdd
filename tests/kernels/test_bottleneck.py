"""Fused bottleneck adapter vs the fp64 reference: forward and every gradient, on the Triton path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import (
    ACTS,
    BOTTLENECK_SCALES,
    DEVICE,
    DTYPES,
    INTERPRET,
    assert_close,
    bottleneck_args,
    check_against_fp64,
    cycle,
    kernel_settings,
)

import fxadapt.kernels as K
from fxadapt.kernels import reference as R

SIZES_N, SIZES_D, SIZES_R = (1, 7, 129, 1151), (64, 200, 768), (1, 8, 24, 64)


def _cases() -> list:
    cases = []
    # Every activation (aliases included) in every dtype, rotating the secondary options.
    for i, (act, dtype) in enumerate((a, t) for a in ACTS for t in DTYPES):
        opts = {
            "bias": cycle((True, False), i),
            "scale_kind": cycle(BOTTLENECK_SCALES, i),
            "transposed": cycle((False, True, True), i),
            "residual": cycle((False, True, False, True, True), i),
        }
        cases.append(pytest.param(129, 200, 24, dtype, act, opts, id=f"{act}-{str(dtype)[6:]}-{i}"))
    # Shape corners: every N, d, r value of the spec, odd sizes, rank 1 and 64, the largest shape.
    shapes = [
        (1, 64, 1), (1, 768, 64), (7, 200, 8), (7, 64, 24), (129, 768, 1), (129, 64, 64),
        (1151, 768, 64), (1151, 200, 1), (1151, 64, 8), (7, 768, 24), (1151, 768, 24),
        (7, 64, 200), (33, 200, 256), (129, 64, 130),  # rank tiers 128 and 256 (the launch that used to fail)
    ]  # fmt: skip
    for i, (n, d, r) in enumerate(shapes):
        opts = {
            "bias": cycle((False, True), i),
            "scale_kind": cycle(BOTTLENECK_SCALES, i + 1),
            "transposed": cycle((True, False), i),
            "residual": cycle((True, False, False), i),
        }
        dtype = cycle((torch.float32, torch.float32, torch.bfloat16, torch.float16), i)
        act = cycle(("gelu", "relu", "silu", "gelu_tanh", "tanh", "identity"), i)
        cases.append(pytest.param(n, d, r, dtype, act, opts, id=f"shape-{n}x{d}x{r}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize(("n", "d", "r", "dtype", "act", "opts"), _cases())
def test_matches_fp64_reference(n, d, r, dtype, act, opts):
    args = bottleneck_args(n, d, r, dtype, act=act, seed=n + d + r, **opts)
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, dtype, seed=n)


def test_leading_dims_are_flattened():
    args = bottleneck_args(
        (3, 43), 200, 8, torch.float32, act="gelu", residual=True, scale_kind="channel", seed=3
    )
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.float32)


@kernel_settings(30)
@given(
    n=st.integers(1, 1200),
    d=st.integers(1, 800),
    r=st.integers(1, 64),
    dtype=st.sampled_from(DTYPES),
    act=st.sampled_from(ACTS),
    bias=st.booleans(),
    scale_kind=st.sampled_from(BOTTLENECK_SCALES),
    transposed=st.booleans(),
    residual=st.booleans(),
)
def test_random_shapes(n, d, r, dtype, act, bias, scale_kind, transposed, residual):
    opts = {"bias": bias, "scale_kind": scale_kind, "transposed": transposed, "residual": residual}
    args = bottleneck_args(n, d, r, dtype, act=act, seed=n * 7 + d, **opts)
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, dtype, seed=r)


@pytest.mark.parametrize(
    "trainable",
    [("x",), ("w_down", "b_down", "w_up", "b_up"), ("scale",), ("residual",), ("x", "scale")],
    ids=lambda t: "+".join(t),
)
def test_partial_gradients(trainable):
    """Only some inputs require grad: the op skips the rest (need_dx / need_dw / need_dscale flags)."""
    args = bottleneck_args(
        129, 200, 24, torch.float32, act="silu", scale_kind="channel", residual=True, grads=False
    )
    for k in trainable:
        args[k].requires_grad_(True)
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.float32)


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_half_precision_dot_path(monkeypatch, act):
    """fp16 with fp16 tensor-core-style dots (the GPU path: operands in fp16, fp32 accumulation) also meets the
    fp16 tolerance. Under the interpreter this needs the test hook; on a GPU it is the normal path."""
    if INTERPRET:
        import fxadapt.kernels._triton_common as tc

        monkeypatch.setattr(tc, "HALF_DOT_IN_INTERPRETER", True)
    args = bottleneck_args(
        1151, 768, 64, torch.float16, act=act, scale_kind="scalar", residual=act == "relu", seed=5
    )
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.float16)


def test_no_grad_forward_is_the_same_computation():
    args = bottleneck_args(129, 200, 8, torch.bfloat16, act="gelu", scale_kind="channel")
    y = K.bottleneck(**args)
    with torch.no_grad():
        y_ng = K.bottleneck(**args)
    assert torch.equal(y, y_ng)


def test_backward_is_deterministic():
    args = bottleneck_args(1151, 768, 24, torch.float32, act="gelu_tanh", scale_kind="scalar", seed=11)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
    dy = torch.randn(args["x"].shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    first = torch.autograd.grad(K.bottleneck(**args), leaves, dy)
    second = torch.autograd.grad(K.bottleneck(**args), leaves, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_saves_only_pre_activation_for_backward():
    """Besides the inputs, autograd keeps exactly one [N, r] fp32 tensor (h): no [N, d] intermediate."""
    n, d, r = 129, 200, 24
    args = bottleneck_args(n, d, r, torch.bfloat16, residual=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        K.bottleneck(**args)
    inputs = {id(v) for v in args.values() if isinstance(v, torch.Tensor)}
    extra = [t for t in saved if id(t) not in inputs]
    assert [(tuple(t.shape), t.dtype) for t in extra] == [((n, r), torch.float32)]


def test_empty_batch():
    args = bottleneck_args(0, 64, 8, torch.float32)
    y = K.bottleneck(**args)
    y.sum().backward()
    assert y.shape == (0, 64)
    assert torch.count_nonzero(args["w_down"].grad) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"w_down": torch.zeros(8, 65)}, "w_down must be"),
        ({"w_up": torch.zeros(8, 64)}, "w_up must be"),
        ({"b_down": torch.zeros(9)}, "b_down must be"),
        ({"b_up": torch.zeros(63)}, "b_up must be"),
        ({"scale": torch.zeros(3)}, "scale"),
        ({"residual": torch.zeros(7, 64)}, "residual"),
        ({"act": "gleu"}, "did you mean 'gelu'"),
    ],
)
def test_invalid_arguments_raise(change, message):
    args = bottleneck_args(5, 64, 8, torch.float32, grads=False)
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        K.bottleneck(**args)


def test_activation_aliases_are_the_same_op():
    args = bottleneck_args(7, 64, 8, torch.float32, grads=False)
    for alias, canonical in [("swish", "silu"), ("linear", "identity"), ("gelu_new", "gelu_tanh")]:
        y_alias = K.bottleneck(**{**args, "act": alias})
        assert_close(y_alias, K.bottleneck(**{**args, "act": canonical}), torch.float32, alias)

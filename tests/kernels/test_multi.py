"""Batched multi-adapter ops: rows routed to random adapters (−1 included) equal running each adapter separately."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import (
    BANK_SCALES,
    DEVICE,
    DTYPES,
    assert_close,
    bottleneck_bank_args,
    check_against_fp64,
    cycle,
    kernel_settings,
    lora_bank_args,
)

import fxadapt.kernels as K
from fxadapt.kernels import reference as R


# ---------------------------------------------------------------------------------------------------------------
# Against the fp64 reference (which itself runs each adapter separately on its rows).
def _bn_cases() -> list:
    shapes = [
        (129, 200, 24, 3),
        (1151, 768, 64, 8),
        (7, 64, 1, 5),
        (1, 200, 8, 2),
        (1151, 64, 8, 1),
        (129, 200, 1, 64),
        (65, 64, 160, 3),  # rank tier 256
    ]
    cases = []
    for i, (n, d, r, a) in enumerate(shapes):
        dtype = cycle(DTYPES, i)
        opts = {
            "act": cycle(("relu", "gelu", "silu", "gelu_tanh", "tanh", "identity"), i),
            "bias": cycle((True, False), i),
            "scale_kind": cycle(BANK_SCALES, i + 3),
            "transposed": cycle((False, True, True), i),
            "residual": cycle((False, True), i // 2),
        }
        cases.append(pytest.param(n, d, r, a, dtype, opts, id=f"{n}x{d}x{r}-A{a}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize(("n", "d", "r", "adapters", "dtype", "opts"), _bn_cases())
def test_bottleneck_multi_matches_fp64_reference(n, d, r, adapters, dtype, opts):
    args = bottleneck_bank_args(n, d, r, adapters, dtype, seed=n + adapters, **opts)
    check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, args, dtype)


def _lora_cases() -> list:
    shapes = [
        (129, 200, 64, 24, 3),
        (1151, 768, 200, 64, 8),
        (7, 64, 768, 1, 5),
        (1, 200, 200, 8, 2),
        (129, 200, 64, 8, 64),
    ]
    cases = []
    for i, (n, d_in, d_out, r, a) in enumerate(shapes):
        dtype = cycle(DTYPES, i)
        opts = {
            "bias": cycle((True, False), i),
            "scale_kind": cycle(BANK_SCALES, i),
            "transposed": cycle((False, True), i),
            "base_grad": cycle((True, False, False), i),
        }
        cases.append(
            pytest.param(
                n, d_in, d_out, r, a, dtype, opts, id=f"{n}x{d_in}x{d_out}x{r}-A{a}-{str(dtype)[6:]}"
            )
        )
    return cases


@pytest.mark.parametrize(("n", "d_in", "d_out", "r", "adapters", "dtype", "opts"), _lora_cases())
def test_lora_multi_matches_fp64_reference(n, d_in, d_out, r, adapters, dtype, opts):
    args = lora_bank_args(n, d_in, d_out, r, adapters, dtype, seed=n + adapters, **opts)
    check_against_fp64(K.lora_multi, R.lora_multi_ref, args, dtype)


@kernel_settings(16)
@given(
    n=st.integers(1, 700),
    d=st.integers(1, 300),
    r=st.integers(1, 40),
    adapters=st.integers(1, 9),
    skew=st.floats(0.0, 3.0),
    dtype=st.sampled_from(DTYPES),
    lora=st.booleans(),
)
def test_random_routing(n, d, r, adapters, skew, dtype, lora):
    """Random sizes and zipf-like skewed routing (skew 0 = uniform), −1 included."""
    weights = (
        torch.arange(1, adapters + 2, dtype=torch.float64) ** -skew
    )  # id −1 is the most frequent when skewed
    gen = torch.Generator().manual_seed(n * 31 + adapters)
    ids = (torch.multinomial(weights, n, replacement=True, generator=gen) - 1).to(DEVICE)
    if lora:
        args = lora_bank_args(n, d, d + 5, r, adapters, dtype, seed=n, ids=ids)
        check_against_fp64(K.lora_multi, R.lora_multi_ref, args, dtype)
    else:
        args = bottleneck_bank_args(
            n, d, r, adapters, dtype, act="gelu", seed=n, ids=ids, residual=n % 2 == 1
        )
        check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, args, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Against the single-adapter fused ops run once per adapter.
def _grads(y: torch.Tensor, leaves: list[torch.Tensor]) -> tuple:
    """Gradients for an upstream gradient of N(0, 1/rows), as in kernel_helpers.check_against_fp64."""
    rows = y.numel() // y.shape[-1]
    dy = (torch.randn(y.shape, generator=torch.Generator().manual_seed(7)) / rows**0.5).to(DEVICE, y.dtype)
    return torch.autograd.grad(y, leaves, dy, allow_unused=True)


def _per_adapter_bottleneck(x, ids, w_down, b_down, w_up, b_up, scale, act):
    """The loop a user would write with the single fused op; −1 rows pass through."""
    y = x
    for a in range(w_down.shape[0]):
        rows = (ids == a).nonzero().squeeze(1)
        if rows.numel():
            ya = K.bottleneck(x[rows], w_down[a], b_down[a], w_up[a], b_up[a], scale[a], act)
            y = y.index_put((rows,), ya)
    return y


def test_bottleneck_multi_equals_single_op_per_adapter():
    args = bottleneck_bank_args(1151, 200, 24, 6, torch.float32, act="silu", seed=1)
    leaves = [args[k] for k in ("x", "w_down", "b_down", "w_up", "b_up", "scale")]
    fused = K.bottleneck_multi(**args)
    looped = _per_adapter_bottleneck(
        *(args[k] for k in ("x", "adapter_ids", "w_down", "b_down", "w_up", "b_up", "scale", "act"))
    )
    assert_close(fused, looped, torch.float32, "y")
    for name, g, g_loop in zip(
        ("x", "w_down", "b_down", "w_up", "b_up", "scale"), _grads(fused, leaves), _grads(looped, leaves)
    ):
        assert_close(g, g_loop, torch.float32, f"d{name}")


def test_lora_multi_equals_single_op_per_adapter():
    args = lora_bank_args(1151, 200, 72, 8, 5, torch.float32, base_grad=True, seed=2)
    x, ids = args["x"], args["adapter_ids"]
    leaves = [args[k] for k in ("x", "weight", "bias", "lora_a", "lora_b", "scale")]
    fused = K.lora_multi(**args)
    base = torch.nn.functional.linear(x, args["weight"], args["bias"])
    looped = base
    for a in range(5):
        rows = (ids == a).nonzero().squeeze(1)
        ya = K.lora_linear(
            x[rows], args["weight"], args["bias"], args["lora_a"][a], args["lora_b"][a], args["scale"][a]
        )
        looped = looped.index_put((rows,), ya)
    assert_close(fused, looped, torch.float32, "y")
    for name, g, g_loop in zip(
        ("x", "weight", "bias", "lora_a", "lora_b", "scale"), _grads(fused, leaves), _grads(looped, leaves)
    ):
        assert_close(g, g_loop, torch.float32, f"d{name}")


# ---------------------------------------------------------------------------------------------------------------
# Routing corner cases.
def test_per_sequence_ids():
    """ids of shape [B] for x [B, T, d]: every token of sequence b uses adapter ids[b]."""
    ids = torch.tensor([2, -1, 0, 2], device=DEVICE)
    args = bottleneck_bank_args((4, 33), 64, 8, 3, torch.float32, ids=ids, residual=True)
    check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, args, torch.float32)
    args = lora_bank_args((4, 33), 64, 48, 8, 3, torch.float32, ids=ids)
    check_against_fp64(K.lora_multi, R.lora_multi_ref, args, torch.float32)


def test_all_rows_without_adapter_pass_through():
    ids = torch.full((129,), -1, device=DEVICE)
    args = bottleneck_bank_args(129, 64, 8, 3, torch.bfloat16, ids=ids, act="gelu")
    y = K.bottleneck_multi(**args)
    assert torch.equal(y, args["x"])  # bit-exact: the passthrough rows never touch adapter math
    dx, dwd, dscale = torch.autograd.grad(y, [args["x"], args["w_down"], args["scale"]], torch.ones_like(y))
    assert torch.equal(dx, torch.ones_like(dx))
    assert torch.count_nonzero(dwd) == 0 and torch.count_nonzero(dscale) == 0
    largs = lora_bank_args(129, 64, 32, 8, 3, torch.float32, ids=ids)
    base = torch.nn.functional.linear(largs["x"], largs["weight"], largs["bias"])
    assert_close(K.lora_multi(**largs), base, torch.float32, "y")


def test_unused_adapters_get_zero_gradients():
    ids = torch.tensor([0, 0, 2, -1, 2, 0, 0], device=DEVICE)
    args = bottleneck_bank_args(7, 64, 8, 4, torch.float32, ids=ids)
    y = K.bottleneck_multi(**args)
    (dwd,) = torch.autograd.grad(y.square().sum(), [args["w_down"]])
    assert torch.count_nonzero(dwd[1]) == 0 and torch.count_nonzero(dwd[3]) == 0
    assert torch.count_nonzero(dwd[0]) > 0 and torch.count_nonzero(dwd[2]) > 0


@pytest.mark.parametrize("bad", [-2, 3])
def test_out_of_range_ids_raise(bad):
    ids = torch.tensor([0, bad, 1], device=DEVICE)
    with pytest.raises(ValueError, match="out of range"):
        K.bottleneck_multi(**bottleneck_bank_args(3, 16, 4, 3, torch.float32, ids=ids))
    with pytest.raises(ValueError, match="out of range"):
        K.lora_multi(**lora_bank_args(3, 16, 8, 4, 3, torch.float32, ids=ids))


def test_ids_shape_must_prefix_x():
    with pytest.raises(ValueError, match="prefix"):
        K.bottleneck_multi(
            **bottleneck_bank_args(
                (4, 5), 16, 4, 3, torch.float32, ids=torch.zeros(5, dtype=torch.long, device=DEVICE)
            )
        )


def test_multi_backward_is_deterministic():
    args = lora_bank_args(1151, 200, 64, 8, 8, torch.float32, seed=9)
    leaves = [args["x"], args["lora_a"], args["lora_b"], args["scale"]]
    first = _grads(K.lora_multi(**args), leaves)
    second = _grads(K.lora_multi(**args), leaves)
    for a, b in zip(first, second):
        assert torch.equal(a, b)

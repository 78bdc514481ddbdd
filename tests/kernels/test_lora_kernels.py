"""Fused LoRA linear vs the fp64 reference: forward and every gradient, on the Triton path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import (
    DEVICE,
    DTYPES,
    INTERPRET,
    LORA_SCALES,
    check_against_fp64,
    cycle,
    kernel_settings,
    lora_args,
)

import fxadapt.kernels as K
from fxadapt.kernels import reference as R


def _cases() -> list:
    cases = []
    for i, (dtype, kind) in enumerate((t, k) for t in DTYPES for k in LORA_SCALES):
        opts = {
            "bias": cycle((True, False), i),
            "scale_kind": kind,
            "transposed": cycle((False, True), i // 2),
            "base_grad": cycle((True, False, False), i),
        }
        cases.append(pytest.param(129, 200, 64, 24, dtype, opts, id=f"{str(dtype)[6:]}-{kind}-{i}"))
    shapes = [
        (1, 64, 768, 1), (7, 768, 200, 8), (129, 768, 768, 64), (1151, 768, 64, 24),
        (1151, 200, 200, 64), (1151, 64, 768, 1), (7, 200, 64, 24), (1, 768, 768, 8),
        (33, 64, 48, 200), (7, 200, 64, 256),  # rank tiers 128..256
    ]  # fmt: skip
    for i, (n, d_in, d_out, r) in enumerate(shapes):
        opts = {
            "bias": cycle((False, True), i),
            "scale_kind": cycle(LORA_SCALES, i),
            "transposed": cycle((True, False), i),
            "base_grad": cycle((False, True, False), i),
        }
        dtype = cycle((torch.float32, torch.bfloat16, torch.float32, torch.float16), i)
        cases.append(
            pytest.param(n, d_in, d_out, r, dtype, opts, id=f"shape-{n}x{d_in}x{d_out}x{r}-{str(dtype)[6:]}")
        )
    return cases


@pytest.mark.parametrize(("n", "d_in", "d_out", "r", "dtype", "opts"), _cases())
def test_matches_fp64_reference(n, d_in, d_out, r, dtype, opts):
    args = lora_args(n, d_in, d_out, r, dtype, seed=n + d_in + r, **opts)
    check_against_fp64(K.lora_linear, R.lora_ref, args, dtype, seed=n)


def test_leading_dims_are_flattened():
    args = lora_args((2, 3, 21), 200, 64, 8, torch.float32, scale_kind="scalar", base_grad=True, seed=4)
    check_against_fp64(K.lora_linear, R.lora_ref, args, torch.float32)


@kernel_settings(20)
@given(
    n=st.integers(1, 1200),
    d_in=st.integers(1, 800),
    d_out=st.integers(1, 800),
    r=st.integers(1, 64),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    scale_kind=st.sampled_from(LORA_SCALES),
    transposed=st.booleans(),
    base_grad=st.booleans(),
)
def test_random_shapes(n, d_in, d_out, r, dtype, bias, scale_kind, transposed, base_grad):
    opts = {"bias": bias, "scale_kind": scale_kind, "transposed": transposed, "base_grad": base_grad}
    args = lora_args(n, d_in, d_out, r, dtype, seed=n + 3 * d_out, **opts)
    check_against_fp64(K.lora_linear, R.lora_ref, args, dtype, seed=r)


@pytest.mark.parametrize(
    "trainable",
    [("x",), ("lora_a", "lora_b"), ("lora_a",), ("scale",), ("weight", "bias"), ("x", "weight")],
    ids=lambda t: "+".join(t),
)
def test_partial_gradients(trainable):
    args = lora_args(129, 200, 72, 8, torch.float32, scale_kind="scalar", lora_grad=False, x_grad=False)
    for k in trainable:
        args[k].requires_grad_(True)
    check_against_fp64(K.lora_linear, R.lora_ref, args, torch.float32)


def test_half_precision_dot_path(monkeypatch):
    """fp16 with fp16 dots (the GPU path) meets the fp16 tolerance; see test_bottleneck's twin."""
    if INTERPRET:
        import fxadapt.kernels._triton_common as tc

        monkeypatch.setattr(tc, "HALF_DOT_IN_INTERPRETER", True)
    args = lora_args(1151, 768, 200, 64, torch.float16, base_grad=True, scale_kind="scalar", seed=8)
    check_against_fp64(K.lora_linear, R.lora_ref, args, torch.float16)


def test_saves_only_low_rank_projection():
    """Autograd keeps the inputs plus t = x·Aᵀ [N, r] fp32: no [N, d_out] intermediate."""
    n, r = 129, 8
    args = lora_args(n, 200, 64, r, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        K.lora_linear(**args)
    inputs = {id(v) for v in args.values() if isinstance(v, torch.Tensor)}
    assert [(tuple(t.shape), t.dtype) for t in saved if id(t) not in inputs] == [((n, r), torch.float32)]


def test_backward_is_deterministic():
    args = lora_args(1151, 768, 200, 24, torch.float32, base_grad=True)
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    dy = torch.randn(1151, 200, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    first = torch.autograd.grad(K.lora_linear(**args), leaves, dy)
    second = torch.autograd.grad(K.lora_linear(**args), leaves, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    args = lora_args(0, 64, 32, 8, torch.float32)
    y = K.lora_linear(**args)
    y.sum().backward()
    assert y.shape == (0, 32)
    assert torch.count_nonzero(args["lora_a"].grad) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weight": torch.zeros(32, 65)}, "weight must be"),
        ({"bias": torch.zeros(31)}, "bias must be"),
        ({"lora_a": torch.zeros(8, 63)}, "lora_a must be"),
        ({"lora_b": torch.zeros(32, 9)}, "lora_b must be"),
        ({"scale": torch.zeros(2)}, "one value"),
    ],
)
def test_invalid_arguments_raise(change, message):
    args = lora_args(5, 64, 32, 8, torch.float32, lora_grad=False, x_grad=False)
    args.update({k: v.to(DEVICE) for k, v in change.items()})
    with pytest.raises(ValueError, match=message):
        K.lora_linear(**args)

"""GPU-only checks (real CUDA, no interpreter): auto dispatch, production-sized shapes, determinism with the
row-split reductions engaged, and Inductor on CUDA. Run by ``bench/gpu_check.sh``; skipped without CUDA."""

from __future__ import annotations

import importlib

import fxadapt.kernels as K
import pytest
import torch
from fxadapt.kernels import reference as R
from kernel_helpers import (
    assert_close,
    bottleneck_args,
    bottleneck_bank_args,
    check_against_fp64,
    lora_args,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_auto_dispatch_runs_triton_on_cuda(monkeypatch):
    """Without forcing anything, CUDA tensors go through the Triton launcher."""
    calls = []
    kernels = importlib.import_module("fxadapt.kernels._common").kernel_module("bottleneck")
    original = kernels.forward
    monkeypatch.setattr(kernels, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = bottleneck_args(64, 256, 16, torch.bfloat16, grads=False)
    with K.backend("auto"):
        assert K.can_use_triton(args["x"])[0]
        K.bottleneck(**args)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_production_shapes_match_fp64(dtype):
    """N = 8192 tokens, d = 4096, r = 64: the benchmark's headline shape, every gradient."""
    check_against_fp64(
        K.bottleneck, R.bottleneck_ref, bottleneck_args(8192, 4096, 64, dtype, act="gelu"), dtype
    )
    check_against_fp64(
        K.lora_linear, R.lora_ref, lora_args(8192, 4096, 4096, 64, dtype, base_grad=True), dtype
    )
    args = bottleneck_bank_args(8192, 1024, 16, 64, dtype, act="silu")
    check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, args, dtype)


def test_backward_bitwise_deterministic_with_row_splits():
    """At N = 8192 the column kernels split rows (SPLIT > 1): partial sums reduced in a fixed order."""
    args = bottleneck_args(8192, 768, 64, torch.bfloat16, act="gelu", scale_kind="channel")
    leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
    dy = torch.randn_like(args["x"])
    first = torch.autograd.grad(K.bottleneck(**args), leaves, dy)
    for _ in range(3):
        again = torch.autograd.grad(K.bottleneck(**args), leaves, dy)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_inductor_on_cuda_matches_eager():
    torch._dynamo.reset()
    args = bottleneck_args(512, 768, 16, torch.bfloat16, act="gelu", scale_kind="scalar", residual=True)

    def f(x, w_down, b_down, w_up, b_up, scale, act, residual):
        return K.bottleneck(x, w_down, b_down, w_up, b_up, scale, act, residual).float().square().mean()

    eager = f(**args)
    compiled = torch.compile(f, fullgraph=True)(**args)
    assert_close(compiled, eager, torch.bfloat16, "compiled loss")

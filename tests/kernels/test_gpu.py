"""GPU-only checks (real CUDA, no interpreter): auto dispatch, production-sized shapes, determinism with the
row-split reductions engaged, and Inductor on CUDA. Run by ``bench/gpu_check.sh``; skipped without CUDA."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import (
    assert_close,
    bottleneck_args,
    bottleneck_bank_args,
    check_against_fp64,
    lora_args,
    lora_bank_args,
)

import fxadapt.kernels as K
from fxadapt.kernels import reference as R

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


@pytest.mark.parametrize("r", [129, 200, 256])
def test_ranks_above_128_launch_and_match(r):
    """The column kernel used to need 266 KB of shared memory at rank tier 256 (OutOfResources on H100/H200)."""
    check_against_fp64(
        K.bottleneck,
        R.bottleneck_ref,
        bottleneck_args(1024, 1024, r, torch.bfloat16, act="gelu"),
        torch.bfloat16,
    )
    check_against_fp64(
        K.lora_linear, R.lora_ref, lora_args(1024, 1024, 768, r, torch.bfloat16), torch.bfloat16
    )


def test_cpu_scale_and_ids_with_cuda_activations():
    """A CPU scale tensor (learned, per channel) and CPU adapter ids with CUDA x: moved, and the scale's gradient
    comes back on the CPU, like the reference path's."""
    args = bottleneck_args(256, 512, 16, torch.bfloat16, scale_kind="channel")
    args["scale"] = args["scale"].detach().cpu().requires_grad_(True)
    check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.bfloat16)
    bank = bottleneck_bank_args(256, 512, 16, 4, torch.bfloat16)
    bank["adapter_ids"] = bank["adapter_ids"].cpu()
    check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, bank, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launches_go_to_the_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device_map="auto" models)."""
    args = bottleneck_args(128, 256, 16, torch.bfloat16, grads=False)
    args = {k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with torch.cuda.device(0):
        y = K.bottleneck(**args)
    torch.testing.assert_close(y.float(), R.bottleneck_ref(**args).float(), rtol=1.6e-2, atol=2e-2)


def test_multi_adapter_ops_never_sync():
    """No host sync in the multi-adapter forward and backward (schedule, id check, launches): CUDA-graph safe."""
    bank = bottleneck_bank_args(512, 256, 16, 8, torch.bfloat16)
    lbank = lora_bank_args(512, 256, 128, 16, 8, torch.bfloat16)

    def step():
        y = K.bottleneck_multi(**bank)
        z = K.lora_multi(**lbank)
        (y.float().square().mean() + z.float().square().mean()).backward()

    step()  # first call: compiles and autotunes (timing syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_out_of_range_ids_fail_on_the_device_or_raise_when_checked(monkeypatch):
    """Sync-free by default (a device-side assertion); FXADAPT_CHECK_IDS=sync raises the ValueError at once."""
    ids = torch.tensor([0, 5, 1], device="cuda")
    monkeypatch.setenv("FXADAPT_CHECK_IDS", "sync")
    with pytest.raises(ValueError, match="adapter id 5 out of range"):
        K.bottleneck_multi(**bottleneck_bank_args(3, 64, 16, 3, torch.bfloat16, ids=ids))

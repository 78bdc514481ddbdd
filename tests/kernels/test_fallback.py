"""The reference path: what runs on CPU without the forced Triton backend, its gradient formulas, backend
selection, ``can_use_triton`` reasons, lazy Triton import, and the multi-adapter schedule (pure torch)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import kernel_helpers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_helpers import (
    ACTS,
    BOTTLENECK_SCALES,
    DTYPES,
    bottleneck_args,
    bottleneck_bank_args,
    check_against_fp64,
    kernel_settings,
    lora_args,
    lora_bank_args,
)

import fxadapt.kernels as K
from fxadapt.kernels import reference as R
from fxadapt.kernels._common import build_schedule

NEEDS_TRITON = False  # these tests choose their own backend (see conftest)

OP_MODULES = ("fxadapt.kernels.bottleneck", "fxadapt.kernels.lora", "fxadapt.kernels.multi")


@pytest.fixture(autouse=True)
def _cpu_tensors(monkeypatch):
    """The reference path is the CPU path: build inputs on CPU even where the tier runs on CUDA."""
    monkeypatch.setattr(kernel_helpers, "DEVICE", torch.device("cpu"))


@pytest.fixture
def no_kernels(monkeypatch):
    """Make any attempt to load a Triton kernel module fail: whatever runs after this is the reference."""

    def refuse(name):
        raise AssertionError(f"Triton kernel module {name!r} was requested on the reference path")

    for mod in OP_MODULES:
        monkeypatch.setattr(importlib.import_module(mod), "kernel_module", refuse)


def test_cpu_default_is_the_reference(no_kernels):
    """Without forcing, CPU tensors go through the reference (the op is the same; no user-side branching)."""
    with K.backend("auto"):
        ok, why = K.can_use_triton(torch.empty(3))
        assert not ok and "cpu" in why
        check_against_fp64(
            K.bottleneck,
            R.bottleneck_ref,
            bottleneck_args(129, 200, 24, torch.float32, act="gelu", scale_kind="channel", residual=True),
            torch.float32,
        )
        check_against_fp64(
            K.lora_linear,
            R.lora_ref,
            lora_args(129, 200, 64, 8, torch.float32, scale_kind="scalar", base_grad=True),
            torch.float32,
        )
        check_against_fp64(
            K.bottleneck_multi,
            R.bottleneck_multi_ref,
            bottleneck_bank_args(129, 64, 8, 4, torch.float32, act="silu"),
            torch.float32,
        )
        check_against_fp64(K.lora_multi, R.lora_multi_ref, lora_bank_args(129, 64, 48, 8, 4, torch.float32, base_grad=True), torch.float32)  # fmt: skip


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("scale_kind", BOTTLENECK_SCALES)
def test_reference_backward_formulas(no_kernels, act, scale_kind):
    """The explicit gradient formulas of the fallback (reference.*_bwd_ref) against autograd in fp64."""
    args = bottleneck_args(
        129, 200, 24, torch.float32, act=act, scale_kind=scale_kind, residual=act == "gelu"
    )
    with K.backend("reference"):
        check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path_in_every_dtype(no_kernels, dtype):
    """The fallback computes half inputs in fp32 (like the kernels), so it meets the same tolerance table."""
    with K.backend("reference"):
        args = bottleneck_args(129, 200, 24, dtype, act="gelu_tanh", scale_kind="scalar", transposed=True)
        check_against_fp64(K.bottleneck, R.bottleneck_ref, args, dtype)
        args = lora_args(129, 200, 72, 8, dtype, scale_kind="scalar", transposed=True, base_grad=True)
        check_against_fp64(K.lora_linear, R.lora_ref, args, dtype)
        args = bottleneck_bank_args(129, 64, 8, 3, dtype, scale_kind="per_adapter", residual=True)
        check_against_fp64(K.bottleneck_multi, R.bottleneck_multi_ref, args, dtype)
        args = lora_bank_args(129, 64, 40, 8, 3, dtype, scale_kind="scalar")
        check_against_fp64(K.lora_multi, R.lora_multi_ref, args, dtype)


def test_fp64_runs_on_the_reference(no_kernels):
    ok, why = K.can_use_triton(torch.empty(3, dtype=torch.float64))
    assert not ok and "float64" in why
    with K.backend("auto"):
        args = bottleneck_args(7, 64, 8, torch.float64, act="tanh")
        check_against_fp64(K.bottleneck, R.bottleneck_ref, args, torch.float64)


def test_activation_grad_matches_autograd():
    h = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    for act in ACTS:
        (auto,) = torch.autograd.grad(R.activation(h, act).sum(), h)
        torch.testing.assert_close(R.activation_grad(h.detach(), act), auto, rtol=1e-12, atol=1e-12, msg=act)


# ---------------------------------------------------------------------------------------------------------------
# Backend selection and can_use_triton.
def test_can_use_triton_reasons():
    x = torch.empty(4, 8)
    with K.backend("reference"):
        assert K.can_use_triton(x) == (
            False,
            "backend is 'reference' (FXADAPT_KERNELS or fxadapt.kernels.backend())",
        )
    with K.backend("auto"):
        assert "mixed dtypes" in K.can_use_triton(x, torch.empty(8, dtype=torch.bfloat16))[1]
        assert "rank 300 exceeds" in K.can_use_triton(x, rank=300)[1]
        assert "float64" in K.can_use_triton(x.double())[1]


def test_forced_triton_that_cannot_run_raises():
    """A forced backend never falls back quietly: fp64 cannot run in the kernels, so the op raises."""
    args = bottleneck_args(7, 64, 8, torch.float64, grads=False)
    with K.force_triton(), pytest.raises(RuntimeError, match="backend 'triton' was forced"):
        K.bottleneck(**args)


def test_backend_env_var(monkeypatch):
    with K.backend("auto"):
        pass  # the context manager restores the previous (unset) override
    monkeypatch.setenv("FXADAPT_KERNELS", "reference")
    assert K.backend_mode() == "reference"
    monkeypatch.setenv("FXADAPT_KERNELS", "Triton ")
    assert K.backend_mode() == "triton"
    monkeypatch.setenv("FXADAPT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FXADAPT_KERNELS='cuda'"):
        K.backend_mode()
    with K.backend("reference"):  # the context manager wins over the environment
        assert K.backend_mode() == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend"), K.backend("gpu"):
        pass


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FXADAPT_KERNELS")}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True
    )


def test_import_does_not_load_kernel_modules():
    done = _python("""
        import sys
        import fxadapt.kernels
        loaded = [m for m in sys.modules if m.startswith("fxadapt.kernels._triton")]
        assert not loaded, loaded
    """)
    assert done.returncode == 0, done.stderr


def test_everything_works_without_triton():
    """With triton not importable at all, the ops run on the reference and can_use_triton says why."""
    done = _python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import fxadapt.kernels as K
        x = torch.randn(5, 16, requires_grad=True)
        wd, wu = torch.randn(4, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
        K.bottleneck(x, wd, None, wu, None, 0.5).sum().backward()
        ids = torch.tensor([0, -1, 1, 1, 0])
        K.lora_multi(x, ids, torch.randn(8, 16), None, torch.randn(2, 4, 16), torch.randn(2, 8, 4), 2.0).sum()
        with K.force_triton():
            ok, why = K.can_use_triton(x)
        assert not ok and "triton is not importable" in why, why
        assert x.grad is not None and wd.grad is not None
    """)
    assert done.returncode == 0, done.stderr


def test_interpreter_requested_too_late_is_reported():
    """TRITON_INTERPRET=1 set after Triton was imported leaves the interpreter off: say so, never crash in a kernel."""
    done = _python("""
        import os
        import triton.language  # what torch.compile / Dynamo do on import
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import fxadapt.kernels as K
        x = torch.randn(3, 8)
        with K.force_triton():
            ok, why = K.can_use_triton(x)
            assert not ok and "set after triton was imported" in why, why
            try:
                K.bottleneck(x, torch.randn(2, 8), None, torch.randn(8, 2), None, 1.0)
            except RuntimeError as exc:
                assert "set after triton was imported" in str(exc)
            else:
                raise AssertionError("a forced backend that cannot run must raise")
    """)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The multi-adapter schedule (pure torch).
@kernel_settings(60)
@given(
    ids=st.lists(st.integers(-1, 6), min_size=0, max_size=300),
    adapters=st.integers(7, 9),
    block_m=st.sampled_from([16, 32, 64]),
)
def test_schedule_covers_every_row_once_in_single_adapter_blocks(ids, adapters, block_m):
    ids_t = torch.tensor(ids, dtype=torch.long)
    s = build_schedule(ids_t, adapters, block_m)
    covered = []
    for b in range(s.num_blocks):
        lo, hi, g = int(s.blk_lo[b]), int(s.blk_hi[b]), int(s.blk_grp[b])
        assert 0 <= hi - lo <= block_m
        rows = s.perm[lo:hi].long()
        assert bool((ids_t[rows] == g - 1).all()), "a block mixes adapters"
        covered += rows.tolist()
    assert sorted(covered) == list(range(len(ids)))
    # Segments: group g holds exactly the rows with id g − 1, in sorted-position order.
    for g in range(adapters + 1):
        start, count = int(s.seg_start[g]), int(s.seg_count[g])
        assert sorted(s.perm[start : start + count].tolist()) == [i for i, v in enumerate(ids) if v == g - 1]


def test_validate_ids_and_check_mode(monkeypatch):
    """validate_ids (for ids made on the host) raises with the bad id; FXADAPT_CHECK_IDS is validated."""
    K.validate_ids(torch.tensor([-1, 0, 2]), 3)
    K.validate_ids(torch.empty(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="adapter id -2 out of range"):
        K.validate_ids(torch.tensor([0, -2]), 3)
    with pytest.raises(ValueError, match="adapter id 3 out of range"):
        K.validate_ids(torch.tensor([3]), 3)
    from fxadapt.kernels._common import ids_check_mode

    assert ids_check_mode() == "async"
    monkeypatch.setenv("FXADAPT_CHECK_IDS", "Sync")
    assert ids_check_mode() == "sync"
    monkeypatch.setenv("FXADAPT_CHECK_IDS", "later")
    with pytest.raises(ValueError, match="FXADAPT_CHECK_IDS='later'"):
        ids_check_mode()


def test_configs_cover_every_rank_tier_on_every_target():
    """Every launcher config exists for every rank tier, dtype and target tier (the compile check compiles them);
    the persistent grid never exceeds the row blocks, and the fp32 tables use one config (no autotuning)."""
    from fxadapt.kernels import _configs
    from fxadapt.kernels._common import KNOWN_TARGETS

    for tgt in KNOWN_TARGETS.values():
        for r in (1, 16, 17, 64, 100, 256):
            for elem in (2, 4):
                cands = _configs.row_candidates(tgt, 8192, 4096, r, elem)
                assert cands and (elem == 2 or len(cands) == 1)
                for cfg in cands:
                    progs = _configs.row_programs(tgt, cfg, -(-8192 // cfg["BM"]), 4096, elem)
                    assert 1 <= progs <= -(-8192 // cfg["BM"])
                assert _configs.col_config(tgt, 8192, 4096, r, elem, 1, 1)["SPLIT"] >= 1
                assert _configs.outer_config(tgt, 8192, 4096, r, elem, 1, 1)["SPLIT"] >= 1

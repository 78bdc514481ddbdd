"""Helpers for the kernel tests: the tolerance table, the device, input factories and the fp64 comparison.

Every check runs the op under test on inputs of the tested dtype and the plain-PyTorch reference on fp64 copies
of *the same* (already rounded) inputs, then compares the output and every requested gradient.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from hypothesis import Phase, settings

import fxadapt.kernels as K

#: (rtol, atol) per dtype against the fp64 reference — the one tolerance table of the kernel tier (docs/design.md §6).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
    torch.float64: (1e-10, 1e-10),  # the reference path only (the kernels take fp32/fp16/bf16)
}

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: The interpreter runs on CPU tensors; without it the kernels need CUDA tensors.
DEVICE = torch.device("cuda" if not INTERPRET and torch.cuda.is_available() else "cpu")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_settings(max_examples: int) -> settings:
    """Hypothesis profile of the kernel tier: derandomised (the same examples on every run), no example database,
    no deadline (the interpreter is slow) and no shrinking (shrinking a kernel failure under the interpreter can
    take many minutes; the failing example is printed as generated)."""
    return settings(
        derandomize=True,
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate),
    )


def triton_runnable() -> tuple[bool, str]:
    with K.force_triton():
        return K.can_use_triton(torch.empty(0, device=DEVICE))


class Maker:
    """Seeded tensor factory. ``transposed=True`` builds a 2-D (or banked 3-D) tensor as a transposed *view* of a
    contiguous one, i.e. the layout of ``linear.weight.t()``; it is still a leaf that can require grad."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def __call__(
        self, *shape: int, std: float = 1.0, transposed: bool = False, grad: bool = True
    ) -> torch.Tensor:
        if transposed:
            storage = torch.randn((*shape[:-2], shape[-1], shape[-2]), generator=self.gen) * std
            t = storage.to(DEVICE, self.dtype).transpose(-1, -2)
            assert not t.is_contiguous() or min(shape[-2:]) == 1
        else:
            t = (torch.randn(shape, generator=self.gen) * std).to(DEVICE, self.dtype)
        return t.requires_grad_(grad)

    def ids(self, n: int, adapters: int) -> torch.Tensor:
        """Adapter ids in [−1, adapters): −1 (no adapter) included."""
        return torch.randint(-1, adapters, (n,), generator=self.gen).to(DEVICE)


def to64(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().double().requires_grad_(v.requires_grad)
    return v


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what} ({dtype}): {m}"
    )


def check_against_fp64(
    fn: Callable[..., torch.Tensor],
    ref: Callable[..., torch.Tensor],
    args: dict,
    dtype: torch.dtype,
    *,
    seed: int = 0,
) -> None:
    """``fn(**args)`` vs ``ref(**fp64 args)``: output, then the gradient of every tensor arg requiring grad.

    The upstream gradient is drawn once, rounded to ``dtype`` and given to both sides. It is N(0, 1/rows), the
    scale of a mean-reduced loss's gradient: with O(1) upstream gradients the weight-gradient sums over ~1k rows
    carry fp32 rounding (of *any* fp32 implementation — eager PyTorch measured the same) above the fp32 atol of
    1e-5 on elements that cancel; at this scale every fp32 gradient has a 10⁻⁵-relative check with headroom.
    """
    args64 = {k: to64(v) for k, v in args.items()}
    y = fn(**args)
    y64 = ref(**args64)
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert_close(y, y64, dtype, "output")
    wrt = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not wrt:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    rows = max(y64.numel() // max(y64.shape[-1], 1), 1)
    dy = (torch.randn(y64.shape, generator=gen) / rows**0.5).to(DEVICE, dtype)
    grads = torch.autograd.grad(y, [args[k] for k in wrt], dy)
    # allow_unused: a bank entry that no row routes to is not in the reference's graph (its gradient is zero).
    grads64 = torch.autograd.grad(y64, [args64[k] for k in wrt], dy.double(), allow_unused=True)
    grads64 = [torch.zeros_like(args64[k]) if g is None else g for k, g in zip(wrt, grads64)]
    for k, g, g64 in zip(wrt, grads, grads64):
        assert g is not None, f"no gradient for {k}"
        assert g.dtype == args[k].dtype, f"d{k} dtype {g.dtype}, expected {args[k].dtype}"
        assert_close(g, g64, dtype, f"d{k}")


def cycle(values: Iterable, i: int):
    """The i-th value of ``values``, cycling: spreads secondary options across a parametrized case list."""
    values = tuple(values)
    return values[i % len(values)]


# ---------------------------------------------------------------------------------------------------------------
# Input factories (one per op), shared by the test modules.
ACTS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "identity", "linear", "tanh")
BOTTLENECK_SCALES = ("float", "scalar", "scalar1", "channel")
LORA_SCALES = ("float", "scalar", "scalar1")
BANK_SCALES = ("none", "float", "scalar", "per_adapter")


def bottleneck_args(
    n: int | tuple[int, ...],
    d: int,
    r: int,
    dtype: torch.dtype,
    *,
    act: str = "relu",
    bias: bool = True,
    scale_kind: str = "float",
    transposed: bool = False,
    residual: bool = False,
    seed: int = 0,
    grads: bool = True,
) -> dict:
    """Inputs of a realistic scale: x ~ N(0, 1); w_down ~ N(0, 1/d), so h ~ N(0, 1) spans every activation's curved
    region; w_up ~ N(0, 1/d) (adapters start with a small up projection), so neither direction amplifies by √(d/r)."""
    m = Maker(seed, dtype)
    lead = n if isinstance(n, tuple) else (n,)
    scale = {
        "float": 0.7,
        "scalar": lambda: m(grad=grads),  # 0-dim learned scalar
        "scalar1": lambda: m(1, grad=grads),
        "channel": lambda: m(d, grad=grads),
    }[scale_kind]
    return {
        "x": m(*lead, d, grad=grads),
        "w_down": m(r, d, std=d**-0.5, transposed=transposed, grad=grads),
        "b_down": m(r, grad=grads) if bias else None,
        "w_up": m(d, r, std=d**-0.5, transposed=transposed, grad=grads),
        "b_up": m(d, grad=grads) if bias else None,
        "scale": scale if isinstance(scale, float) else scale(),
        "act": act,
        "residual": m(*lead, d, grad=grads) if residual else None,
    }


def lora_args(
    n: int | tuple[int, ...],
    d_in: int,
    d_out: int,
    r: int,
    dtype: torch.dtype,
    *,
    bias: bool = True,
    scale_kind: str = "float",
    transposed: bool = False,
    base_grad: bool = False,
    lora_grad: bool = True,
    x_grad: bool = True,
    seed: int = 0,
) -> dict:
    """x ~ N(0, 1); W, A ~ N(0, 1/d_in); B ~ N(0, 1/d_out) (so x·Aᵀ is O(1) and dy·B does not amplify by √(d_out/r)).
    The base layer is frozen unless ``base_grad``; ``transposed`` passes W, A and B as transposed views."""
    m = Maker(seed, dtype)
    lead = n if isinstance(n, tuple) else (n,)
    scale = {
        "float": 2.0,  # alpha / r
        "scalar": lambda: m(grad=lora_grad),
        "scalar1": lambda: m(1, grad=lora_grad),
    }[scale_kind]
    return {
        "x": m(*lead, d_in, grad=x_grad),
        "weight": m(d_out, d_in, std=d_in**-0.5, transposed=transposed, grad=base_grad),
        "bias": m(d_out, grad=base_grad) if bias else None,
        "lora_a": m(r, d_in, std=d_in**-0.5, transposed=transposed, grad=lora_grad),
        "lora_b": m(d_out, r, std=d_out**-0.5, transposed=transposed, grad=lora_grad),
        "scale": scale if isinstance(scale, float) else scale(),
    }


def _bank_scale(m: Maker, kind: str, adapters: int, grad: bool):
    return {
        "none": lambda: None,
        "float": lambda: 0.5,
        "scalar": lambda: m(grad=grad),
        "per_adapter": lambda: m(adapters, grad=grad),
    }[kind]()


def bottleneck_bank_args(n, d, r, adapters, dtype, *, act="relu", bias=True, scale_kind="per_adapter", transposed=False,
            residual=False, seed=0, ids=None) -> dict:  # fmt: skip
    """Same scales as bottleneck_args, stacked into banks of ``adapters``."""
    m = Maker(seed, dtype)
    lead = n if isinstance(n, tuple) else (n,)
    return {
        "x": m(*lead, d),
        "adapter_ids": m.ids(lead[0], adapters) if ids is None else ids,
        "w_down": m(adapters, r, d, std=d**-0.5, transposed=transposed),
        "b_down": m(adapters, r) if bias else None,
        "w_up": m(adapters, d, r, std=d**-0.5, transposed=transposed),
        "b_up": m(adapters, d) if bias else None,
        "scale": _bank_scale(m, scale_kind, adapters, True),
        "act": act,
        "residual": m(*lead, d) if residual else None,
    }


def lora_bank_args(n, d_in, d_out, r, adapters, dtype, *, bias=True, scale_kind="per_adapter", transposed=False,
              base_grad=False, seed=0, ids=None) -> dict:  # fmt: skip
    """Same scales as lora_args, LoRA factors stacked into banks of ``adapters``."""
    m = Maker(seed, dtype)
    lead = n if isinstance(n, tuple) else (n,)
    return {
        "x": m(*lead, d_in),
        "adapter_ids": m.ids(lead[0], adapters) if ids is None else ids,
        "weight": m(d_out, d_in, std=d_in**-0.5, grad=base_grad),
        "bias": m(d_out, grad=base_grad) if bias else None,
        "lora_a": m(adapters, r, d_in, std=d_in**-0.5, transposed=transposed),
        "lora_b": m(adapters, d_out, r, std=d_out**-0.5, transposed=transposed),
        "scale": _bank_scale(m, scale_kind, adapters, True),
    }

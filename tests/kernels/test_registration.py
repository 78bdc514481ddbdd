"""Op registration: ``torch.library.opcheck`` on every op, and ``torch.compile(fullgraph=True)`` forward+backward of
a module calling all four public ops (0 graph breaks, the ops stay opaque nodes, results equal eager)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DEVICE, Maker, assert_close

import fxadapt.kernels as K

# Inductor's CPU path touches torch.jit internally, which warns on every compile; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

N, D, R, A, D_OUT = 7, 64, 8, 3, 48


def _inputs(dtype=torch.float32, grad=True) -> dict:
    m = Maker(0, dtype)
    return {
        "x": m(N, D, grad=grad),
        "ids": torch.tensor([0, -1, 2, 2, 1, 0, -1], device=DEVICE),
        "wd": m(R, D, std=D**-0.5, grad=grad),
        "bd": m(R, grad=grad),
        "wu": m(D, R, std=D**-0.5, grad=grad),
        "bu": m(D, grad=grad),
        "st": m(D, grad=grad),
        "res": m(N, D, grad=grad),
        "wdb": m(A, R, D, std=D**-0.5, grad=grad),
        "bdb": m(A, R, grad=grad),
        "wub": m(A, D, R, std=D**-0.5, grad=grad),
        "bub": m(A, D, grad=grad),
        "sb": m(A, grad=grad),
        "w": m(D_OUT, D, std=D**-0.5, grad=grad),
        "b": m(D_OUT, grad=grad),
        "la": m(R, D, std=D**-0.5, grad=grad),
        "lb": m(D_OUT, R, std=D_OUT**-0.5, grad=grad),
        "s0": m(grad=grad),
        "lab": m(A, R, D, std=D**-0.5, grad=grad),
        "lbb": m(A, D_OUT, R, std=D_OUT**-0.5, grad=grad),
    }


def _forward_cases(t: dict) -> list:
    ops = torch.ops.fxadapt
    return [
        (ops.bottleneck.default, (t["x"], t["wd"], t["bd"], t["wu"], t["bu"], 1.0, t["st"], "gelu", None)),
        (ops.bottleneck.default, (t["x"], t["wd"], None, t["wu"], None, 0.5, None, "relu", t["res"])),
        (ops.lora_linear.default, (t["x"], t["w"], t["b"], t["la"], t["lb"], 2.0, t["s0"])),
        (ops.lora_linear.default, (t["x"], t["w"], None, t["la"], t["lb"], 2.0, None)),
        (ops.bottleneck_multi.default, (t["x"], t["ids"], t["wdb"], t["bdb"], t["wub"], t["bub"], 1.0, t["sb"], "silu", None)),
        (ops.lora_multi.default, (t["x"], t["ids"], t["w"], t["b"], t["lab"], t["lbb"], 0.5, t["sb"])),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(6))
def test_opcheck_forward_ops(case):
    op, args = _forward_cases(_inputs())[case]
    torch.library.opcheck(op, args)


def _backward_cases(t: dict) -> list:
    ops = torch.ops.fxadapt
    h = torch.randn(N, R, device=DEVICE)
    tt = torch.randn(N, R, device=DEVICE)
    dy, dyo = torch.randn(N, D, device=DEVICE), torch.randn(N, D_OUT, device=DEVICE)
    flags3 = (True, True, True)
    return [
        (ops.bottleneck_bwd.default,
         (dy, t["x"], t["wd"], t["bd"], t["wu"], t["bu"], h, 1.0, t["st"], "gelu", True, *flags3)),
        (ops.bottleneck_bwd.default,
         (dy, t["x"], t["wd"], None, t["wu"], None, h, 0.5, None, "relu", False, False, True, False)),
        (ops.lora_bwd.default, (dyo, t["x"], t["w"], t["la"], t["lb"], tt, 2.0, t["s0"], True, True, True, True)),
        (ops.bottleneck_multi_bwd.default,
         (dy, t["x"], t["ids"], t["wdb"], t["bdb"], t["wub"], t["bub"], h, 1.0, t["sb"], "silu", True, *flags3)),
        (ops.lora_multi_bwd.default,
         (dyo, t["x"], t["ids"], t["w"], t["lab"], t["lbb"], tt, 0.5, t["sb"], True, False, True, True)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(5))
def test_opcheck_backward_ops(case):
    # The backward ops have no autograd of their own (no double backward): check them with plain tensors.
    op, args = _backward_cases(_inputs(grad=False))[case]
    torch.library.opcheck(op, args)


class AllOps(torch.nn.Module):
    """One block using every public op: a bottleneck with a learned per-channel scale and a separate residual, a
    LoRA linear, and the two multi-adapter ops routed by per-row ids."""

    def __init__(self, t: dict):
        super().__init__()
        names = (
            "wd",
            "bd",
            "wu",
            "bu",
            "st",
            "w",
            "b",
            "la",
            "lb",
            "wdb",
            "bdb",
            "wub",
            "bub",
            "sb",
            "lab",
            "lbb",
        )
        for k in names:
            self.register_parameter(k, torch.nn.Parameter(t[k].detach().clone()))
        self.w.requires_grad_(False)  # frozen base layer, the LoRA common case
        self.b.requires_grad_(False)
        self.lora_scale = 2.0

    def forward(self, x, res, ids):
        h = K.bottleneck(x, self.wd, self.bd, self.wu, self.bu, self.st, act="gelu", residual=res)
        y = K.lora_linear(h, self.w, self.b, self.la, self.lb, self.lora_scale)
        z = K.bottleneck_multi(h, ids, self.wdb, self.bdb, self.wub, self.bub, self.sb, act="swish")
        u = K.lora_multi(z, ids, self.w, None, self.lab, self.lbb, 0.5)
        return y.sum(-1) + u.square().mean(-1)


def _run(module, x, res, ids):
    out = module(x, res, ids)
    grads = torch.autograd.grad(out.sum(), [x, res, *(p for p in module.parameters() if p.requires_grad)])
    return out, grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    t = _inputs()
    module = AllOps(t)
    x, res, ids = t["x"].detach().requires_grad_(), t["res"].detach().requires_grad_(), t["ids"]
    eager_out, eager_grads = _run(module, x, res, ids)

    seen: list[torch.fx.GraphModule] = []

    def recording(gm, example_inputs):
        seen.append(gm)
        if backend == "aot_eager":
            return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(module, fullgraph=True, backend=recording)
    out, grads = _run(compiled, x, res, ids)
    assert len(seen) == 1, f"expected one graph (no breaks), got {len(seen)}"
    # Dynamo records the op packets (torch.ops.fxadapt.<name>); each must be a node of the one graph.
    targets = {str(n.target) for n in seen[0].graph.nodes if n.op == "call_function"}
    for op in ("fxadapt.bottleneck", "fxadapt.lora_linear", "fxadapt.bottleneck_multi", "fxadapt.lora_multi"):
        assert op in targets, f"{op} missing from the captured graph: {sorted(targets)}"
    assert_close(out, eager_out, torch.float32, "compiled output")
    for i, (g, ge) in enumerate(zip(grads, eager_grads)):
        assert_close(g, ge, torch.float32, f"compiled grad {i}")

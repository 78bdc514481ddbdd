"""What an op in a captured layer graph *is*: projection, norm, attention, data movement, pass-through.

Site discovery (``sites.py``) reads layer graphs through these predicates only, so every rule about op kinds
lives here, once. They look at the op and the module it calls, never at module *names*:

==================  ============================================================================================
projection          ``nn.Linear`` (and subclasses: quantized linears), HF ``Conv1D``, any childless module with a
                    2-D weight, or a function whose weight operand is a parameter (``einsum``/``matmul``/
                    ``F.linear`` with a ``get_attr`` of a >=2-D parameter: XLNet's ``einsum("ibh,hnd->ibnd")``)
weighted leaf       an opaque module call with a >=2-D parameter (a mixture-of-experts block, an attention
                    module that could not be traced through, a convolution)
attention           an HF attention function (leaf call), ``scaled_dot_product_attention``, a softmax, or an
                    opaque module whose class is an attention module
pass-through        dropout, identity, casts, hook replays, ``[0]`` of a tuple result, data movement
                    (view/reshape/permute/...), unary ops and multiplies by constants or parameters (layer
                    scale, residual multipliers), parameter-only elementwise modules (norms, ``LayerScale``)
==================  ============================================================================================
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "ADD_TARGETS",
    "MATMULS",
    "ancestors",
    "has_input_ancestor",
    "is_attention",
    "is_attention_function",
    "is_linear_like",
    "is_norm",
    "is_projection",
    "is_softmax",
    "is_weighted",
    "module_of",
    "pass_through_input",
    "replay_forward_hooks",
    "tensor_inputs",
    "tensor_shape",
]

ADD_TARGETS = {operator.add, operator.iadd, torch.add}
DROPOUT_FUNCTIONS = {torch.nn.functional.dropout, torch.dropout, torch.nn.functional.dropout1d}
CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "double", "contiguous", "type_as", "clone"}
MOVEMENT_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "contiguous",
    "view_as",
    "reshape_as",
}
MOVEMENT_FUNCTIONS = {
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
}
UNARY_FUNCTIONS = {torch.clamp, torch.clip, torch.tanh, torch.nn.functional.gelu, torch.nn.functional.silu}
SCALE_OPS = {operator.mul, operator.truediv, operator.imul, operator.itruediv, torch.mul, torch.div}
SOFTMAX_FUNCTIONS = {torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
ATTENTION_OPS = {torch.nn.functional.scaled_dot_product_attention}
MATMULS = {torch.matmul, torch.bmm, operator.matmul, torch.baddbmm, torch.einsum, torch.mm}
MATMUL_METHODS = {"matmul", "bmm", "baddbmm", "mm"}
_PARAM_FUNCTIONS = MATMULS | {torch.nn.functional.linear, torch.addmm, torch.nn.functional.conv1d}


ATTENTION_FLAG = "fxadapt_attention"  # node meta flag set on HF attention functions called as leaves


def replay_forward_hooks(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Run a traced-through module's forward hooks at run time, as ``Module.__call__`` would have."""
    for hook_id, hook in list(module._forward_hooks.items()):
        if hook_id in module._forward_hooks_with_kwargs:
            result = hook(module, args, kwargs, output)
        else:
            result = hook(module, args, output)
        if result is not None:
            output = result
    return output


def is_attention_function(node: fx.Node) -> bool:
    return node.op == "call_function" and bool(node.meta.get(ATTENTION_FLAG))


def module_of(root: nn.Module, node: object) -> nn.Module | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    try:
        return root.get_submodule(str(node.target))
    except AttributeError:
        return None


def tensor_shape(node: object) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("fxadapt_meta")
    return meta[1] if meta else None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors (sizes and shapes are not data flow)."""
    return [n for n in node.all_input_nodes if n.meta.get("fxadapt_kind") != "size"]


def ancestors(node: fx.Node, tensors_only: bool = False, stop: Iterable[fx.Node] = ()) -> set[fx.Node]:
    """Nodes ``node`` depends on (not crossing ``stop``); with ``tensors_only``, through tensor data flow only."""
    inputs = tensor_inputs if tensors_only else (lambda n: n.all_input_nodes)
    stop = set(stop)
    seen: set[fx.Node] = set()
    todo = list(inputs(node))
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if n not in stop:
                todo.extend(inputs(n))
    return seen


def has_input_ancestor(node: object) -> bool:
    """Whether ``node`` depends on a graph input (else it is computed from parameters and constants alone)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    return any(n.op == "placeholder" for n in ancestors(node))


# ---------------------------------------------------------------------------------------------------------------
# module kinds


def is_linear_like(module: nn.Module | None) -> bool:
    """nn.Linear and subclasses, HF's Conv1D, and other childless parameter leaves with a 2-D weight."""
    if module is None or isinstance(module, nn.Embedding):
        return False
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and next(module.children(), None) is None


def is_norm(module: nn.Module | None) -> bool:
    if module is None:
        return False
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    return type(module).__name__.lower().endswith("norm")


def _is_elementwise_module(module: nn.Module) -> bool:
    """A childless module whose parameters are all vectors (norms, layer scale) or that has none (activations,
    drop path, identity): it maps the sublayer output to something of the same shape."""
    if next(module.children(), None) is not None:
        return False
    return all(p.dim() <= 1 for p in module.parameters(recurse=False))


def _is_attention_module(module: nn.Module | None) -> bool:
    if module is None:
        return False
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("attn")


# ---------------------------------------------------------------------------------------------------------------
# node kinds


def _param_operand(root: nn.Module, node: fx.Node) -> bool:
    for a in node.all_input_nodes:
        if a.op == "get_attr":
            try:
                value = root.get_parameter(str(a.target))
            except AttributeError:
                continue
            if value.dim() >= 2:
                return True
    return False


def is_projection(root: nn.Module, node: object) -> bool:
    """A Linear-like module call, or a matmul/einsum/linear function whose weight operand is a parameter."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return is_linear_like(module_of(root, node))
    if node.op == "call_function" and node.target in _PARAM_FUNCTIONS:
        return _param_operand(root, node)
    if node.op == "call_method" and node.target in MATMUL_METHODS:
        return _param_operand(root, node)
    return False


def weight_owner(root: nn.Module, node: fx.Node) -> str | None:
    """Path of the ``nn.Linear`` whose own ``weight`` a traced-through ``F.linear`` call applies untransposed (an
    ``nn.Linear`` subclass with its own forward, e.g. a wrapper library's linear): the projection module to adapt."""
    if node.op != "call_function" or node.target is not torch.nn.functional.linear or len(node.args) < 2:
        return None
    weight = node.args[1]
    if not (
        isinstance(weight, fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight")
    ):
        return None
    owner = str(weight.target)[: -len(".weight")]
    try:
        module = root.get_submodule(owner)
    except AttributeError:
        return None
    return owner if isinstance(module, nn.Linear) else None


def is_weighted(root: nn.Module, node: object) -> bool:
    """A projection, an attention call, or an opaque module call holding a >=2-D parameter."""
    if not isinstance(node, fx.Node):
        return False
    if is_projection(root, node) or is_attention(root, node):
        return True
    module = module_of(root, node)
    return module is not None and any(p.dim() >= 2 for p in module.parameters())


def is_softmax(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target == "softmax":
        return True
    return isinstance(module_of(root, node), nn.Softmax)


def is_attention(root: nn.Module, node: fx.Node) -> bool:
    """An attention call: HF attention function, SDPA, an opaque attention module."""
    if is_attention_function(node):
        return True
    if node.op == "call_function" and node.target in ATTENTION_OPS:
        return True
    return node.op == "call_module" and _is_attention_module(module_of(root, node))


def is_matmul(node: fx.Node, root: nn.Module | None = None) -> bool:
    """A matmul: ``matmul``/``bmm``/``@``/``baddbmm``/``einsum``, or (given ``root``) a parameter-free module
    of two tensors whose shapes multiply as matrices (SqueezeBERT's ``MatMulWrapper``)."""
    if (node.op == "call_function" and node.target in MATMULS) or (
        node.op == "call_method" and node.target in MATMUL_METHODS
    ):
        return True
    module = module_of(root, node) if root is not None else None
    if module is None or next(module.parameters(), None) is not None or len(node.args) != 2:
        return False
    a, b, out = (tensor_shape(x) for x in (*node.args, node))
    return bool(
        a and b and out and len(a) >= 2 and len(b) >= 2 and a[-1] == b[-2] and out[-2:] == (a[-2], b[-1])
    )


def is_movement(node: fx.Node) -> bool:
    """Ops that only move data (same values, other layout): view, reshape, permute, split pieces, indexing."""
    if node.op == "call_method":
        return node.target in MOVEMENT_METHODS or node.target in {
            "split",
            "chunk",
            "unbind",
            "narrow",
            "expand",
        }
    if node.op == "call_function":
        return node.target in MOVEMENT_FUNCTIONS or node.target in {
            torch.split,
            torch.chunk,
            torch.unbind,
            torch.narrow,
            operator.getitem,
        }
    return False


def pass_through_input(root: nn.Module, node: fx.Node) -> tuple[fx.Node | None, str]:
    """If ``node`` passes one data input through (changing it elementwise or moving it), that input and the kind
    of pass (``dropout``, ``cast``, ``move``, ``scale``, ``norm``, ``unary``, ``first``); else ``(None, "")``."""
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        module = module_of(root, node)
        if module is None or not isinstance(first, fx.Node):
            return None, ""
        if isinstance(module, (nn.Dropout, nn.Identity)):
            return first, "dropout"
        if is_norm(module):
            return first, "norm"
        if _is_elementwise_module(module) and tensor_shape(node) == tensor_shape(first):
            return first, "scale"
        return None, ""
    if node.op == "call_function":
        if node.target is replay_forward_hooks:
            return node.args[3], "dropout"  # type: ignore[return-value]
        if node.target in DROPOUT_FUNCTIONS and isinstance(first, fx.Node):
            return first, "dropout"
        if (
            node.target is operator.getitem
            and node.args[1] == 0
            and node.meta.get("fxadapt_kind") == "tensor"
        ):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.meta.get("fxadapt_kind") == "object":
                return src, "first"  # ``out[0]`` of a module returning a tuple
        if node.target in SCALE_OPS and len(node.args) == 2:
            a, b = node.args
            data = [x for x in (a, b) if has_input_ancestor(x)]
            if len(data) == 1 and isinstance(data[0], fx.Node):
                return data[0], "scale"  # layer scale, residual multipliers
        if (
            node.target in UNARY_FUNCTIONS
            and isinstance(first, fx.Node)
            and not any(has_input_ancestor(a) for a in node.all_input_nodes if a is not first)
        ):
            return first, "unary"
        if node.target in MOVEMENT_FUNCTIONS and isinstance(first, fx.Node):
            return first, "move"
        return None, ""
    if node.op == "call_method" and isinstance(first, fx.Node):
        if node.target in CAST_METHODS:
            return first, "cast"
        if node.target in MOVEMENT_METHODS:
            return first, "move"
        if (
            node.target in ("mul", "div", "mul_", "div_")
            and len(node.args) == 2
            and not has_input_ancestor(node.args[1])
        ):
            return first, "scale"
    return None, ""

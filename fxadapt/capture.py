"""Capture: a Hugging Face model's repeating layers as torch.fx graphs, one per distinct call.

Design note
-----------
Whole-model tracing fails on transformers 5 (mask helpers, ``**kwargs``, caches). The unit of capture is
therefore each element of the model's repeating layer lists (``encoder.layer.N``, ``layers.N``, ``h.N``...),
found structurally: outermost ``ModuleList``s whose elements are instances of one custom block class.

A layer is traced *specialised to the call it actually receives*: the call is flattened with pytree; tensors
and opaque objects (caches) become graph inputs, everything else (``None``, flags, ints, strings, dtypes) is
baked in as a constant. The call's structure, input dtypes/ranks/devices, ``training`` and the hook state form
the **guard key**; a call with a new key is traced lazily. Sizes stay symbolic, so a new batch or sequence
length does not re-trace.

Every proxy carries a *shadow*: the real value the op produced on the recorded inputs. Shadows answer the
questions Python control flow asks (``x.dtype == torch.float16``, ``x.dim()``, ``len(x.shape)``,
``isinstance(out, tuple)``) concretely, while shape sizes remain graph values. A question that depends on data
or sizes (``bool(proxy)``) cannot be answered safely: the submodule being traced becomes a *leaf* (an opaque
call in the graph) and tracing retries. Hugging Face attention functions (``ALL_ATTENTION_FUNCTIONS``, eager or
sdpa) are always leaf calls, so attention modules are traced through and their q/k/v/o projections stay visible.
Hooks on traced-through submodules are not fired on proxies; they are replayed at run time by a graph node.

Each capture is verified bit-exactly before use: captures made by ``inject`` against a fresh eager call of the layer
(same RNG seed), captures made lazily for a new kind of call against the values its ops produced while tracing
(one forward cheaper). A capture that would change the model's numerics is never installed.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import CaptureError
from .guards import (
    _CONSTANT_TYPES,
    _MISSING,
    SHADOW,
    CaptureFailure,
    SizeGuardMiss,
    _guard_function,
    _is_dynamic,
    compile_graph,
    flatten_call,
    guard_key,
    unflatten_call,
)
from .layers import find_layer_lists, record_layer_calls
from .provenance import annotate_features
from .reads import attribute_reads, plain_int
from .tracer import (
    _LayerTracer,
    _module_state,
    _script_functions,
    _TracePatches,
    _value_kind,
)
from .tracing import gate, traced

__all__ = [
    "VERIFY_SEED",
    "Capture",
    "CaptureFailure",
    "SizeGuardMiss",
    "compile_graph",
    "find_layer_lists",
    "flatten_call",
    "guard_key",
    "layer_signature",
    "record_layer_calls",
    "seed_rng",
    "trace_layer",
    "unflatten_call",
    "verify_shared",
]

# --------------------------------------------------------------------------------------------------------------
# Captures


@dataclass(eq=False)  # captures are compared by identity
class Capture:
    """One traced specialisation of a layer: its graph plus how to call it."""

    graph: fx.Graph
    in_spec: tuple  # structure from flatten_call
    dynamic: tuple[int, ...]  # which flattened call leaves are graph inputs (the rest are baked constants)
    out_spec: pytree.TreeSpec
    out_slots: tuple[int | None, ...]  # per output leaf: index into the graph's outputs, or None = constant
    out_constants: tuple[Any, ...]
    leaves: tuple[str, ...]  # modules made leaves because tracing through them failed
    leaf_reasons: dict[str, str] = field(default_factory=dict)
    input_names: tuple[str, ...] = ()
    value_guards: tuple[tuple[Callable[..., Any], bool], ...] = ()
    size_guards: int = 0  # branches on sizes checked inside the generated code (SizeGuardMiss on the other)
    reads: tuple[
        tuple[tuple[str, str], Any], ...
    ] = ()  # ((module path, attribute), value) the trace baked in
    signature: tuple = ()  # layer_signature of the layer traced
    has_opaque_inputs: bool = False  # a cache or other object is among the inputs
    device: torch.device | None = None  # of the first tensor input
    dtype: torch.dtype | None = None
    # tensor literals of the forward (``torch.tensor(...)`` in its code), held by the layer under unique names
    constants: tuple[tuple[str, torch.Tensor], ...] = ()

    def adopt(self, layer: nn.Module) -> None:
        """Give a sibling layer this capture's tensor literals (the code reads them from its ``self``)."""
        for name, value in self.constants:
            if name not in layer.__dict__:
                layer.__dict__[name] = value

    def guards_hold(self, layer: nn.Module, leaves: list[Any]) -> bool:
        """Whether the branch flags this capture baked in hold for this call."""
        dynamic = self.dynamic
        for fn, expected in self.value_guards:
            if bool(fn(layer, *[leaves[i] for i in dynamic])) != expected:
                return False
        return True

    def fits(self, layer: nn.Module, signature: tuple | None = None, any_mode: bool = False) -> bool:
        """Whether this capture is also ``layer``'s: the same module structure and parameter shapes, and the same
        value of every plain attribute the trace read (a sibling layer differs in parameters, not in code).
        ``any_mode``: the ``training`` flags it read may differ (a capture verified to serve both modes)."""
        signature = layer_signature(layer) if signature is None else signature
        if signature is not self.signature and signature != self.signature:
            return False
        # reads come sorted by path: each submodule is looked up once
        modules: dict[str, nn.Module] = {"": layer}
        for (path, name), value in self.reads:
            if any_mode and name == "training":
                continue
            module = modules.get(path)
            if module is None:
                module = modules[path] = layer.get_submodule(path)
            if value != module.__dict__.get(name, _MISSING):  # value first: ANY_INT compares by type
                return False
        return True

    def code(self) -> Callable[..., Any]:
        """The capture's own generated code (compiled once)."""
        code = self.__dict__.get("_code")
        if code is None:
            code = self.__dict__["_code"] = compile_graph(self.graph)
        return code

    def bind(self, code: Callable[..., Any]) -> Callable[[nn.Module, list[Any]], Any]:
        """A runner ``(layer, flat_call_leaves) -> output`` for generated code of this capture's signature."""
        dynamic, slots, consts, out_spec = self.dynamic, self.out_slots, self.out_constants, self.out_spec

        def run(layer: nn.Module, leaves: list[Any]) -> Any:
            outs = code(layer, *[leaves[i] for i in dynamic])
            values = [consts[j] if s is None else outs[s] for j, s in enumerate(slots)]
            return pytree.tree_unflatten(values, out_spec)

        return run


def layer_signature(layer: nn.Module) -> tuple:
    """The structure a capture depends on: every submodule's path and class, every parameter's and buffer's path,
    shape, dtype and device (fxadapt's adapter container excluded)."""
    out: list[Any] = []
    for path, m in layer.named_modules():
        if path.split(".", 1)[0] == "fxadapt":
            continue
        out.append((path, getattr(type(m), "_fxadapt_orig_class", type(m))))
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            out.append((path, name, None) if t is None else (path, name, tuple(t.shape), t.dtype, t.device))
    return tuple(out)


def _input_names(orig_forward: Callable[..., Any], args: tuple, kwargs: dict) -> list[str]:
    """Readable names for the flattened call leaves (``hidden_states``, ``position_embeddings_0``, ...)."""
    try:
        params = [p for p in inspect.signature(orig_forward).parameters if p != "self"]
    except (TypeError, ValueError):  # pragma: no cover - builtins
        params = []
    named: dict[str, Any] = {}
    for i, a in enumerate(args):
        named[params[i] if i < len(params) else f"arg{i}"] = a
    named.update(kwargs)
    names = []
    for path, _ in pytree.tree_flatten_with_path(named)[0]:
        raw = "_".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        names.append("".join(c if c.isalnum() or c == "_" else "_" for c in raw) or "input")
    return names


def _shadow_copy(value: Any) -> Any:
    """An independent copy to trace or verify on (caches are mutated by the layer; tensors may carry grad)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, _CONSTANT_TYPES):
        return value
    # Deep-copy opaque objects (caches); tensors inside may be non-leaf, which Tensor.__deepcopy__ refuses.
    orig = torch.Tensor.__deepcopy__
    torch.Tensor.__deepcopy__ = gate(lambda self, memo: self.detach().clone(), orig)  # type: ignore[method-assign]
    try:
        return copy.deepcopy(value)
    finally:
        torch.Tensor.__deepcopy__ = orig  # type: ignore[method-assign]


@traced  # serve: under the tracing lock, with patches visible to this thread only (tracing.py)
def trace_layer(
    layer: nn.Module,
    orig_forward: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    *,
    max_retries: int = 8,
    verify: str | None = "eager",
    expected: Any = None,
) -> Capture:
    """Trace ``orig_forward(layer, *args, **kwargs)`` into a :class:`Capture`, verified against eager.

    ``verify="eager"`` compares with ``expected`` (the output of this very call, recorded eagerly under the
    verification seed) or, without it, with a fresh eager call; ``"shadow"`` with the values computed while
    tracing. Raises :class:`CaptureError` when the layer cannot be captured (even with leaves) or verification
    fails.
    """
    leaves, in_spec = flatten_call(args, kwargs)
    dynamic = tuple(i for i, v in enumerate(leaves) if _is_dynamic(v))
    names = _input_names(orig_forward, args, kwargs)
    forced: set[str] = set()
    reasons: dict[str, str] = {}
    last_error: CaptureFailure | None = None

    script_functions = _script_functions(layer)
    for _ in range(max_retries + 1):
        tracer = _LayerTracer(forced)
        tracer._inputs = [(names[i], _shadow_copy(leaves[i])) for i in dynamic]
        out_info: dict[str, Any] = {}

        state = _module_state(layer)

        def fn(
            root: nn.Module, *inputs: Any, _out: dict[str, Any] = out_info, _state=state, _tr=tracer
        ) -> Any:
            flat = list(leaves)
            for i, p in zip(dynamic, inputs):
                flat[i] = p
            a, kw = unflatten_call(flat, in_spec)
            out = orig_forward(root, *a, **kw)
            _state.record_writes(_tr)
            out_leaves, out_spec = pytree.tree_flatten(out)
            _out["spec"] = out_spec
            _out["leaves"] = out_leaves
            return tuple(v for v in out_leaves if isinstance(v, fx.Proxy))

        tracer._fn = fn
        before = set(layer.__dict__)
        try:
            reads = attribute_reads(layer)
            with _TracePatches(script_functions), torch.no_grad(), _preserved_rng(args), state, reads:
                seed_rng(VERIFY_SEED, args)  # shadows draw dropout masks as the verification run will
                graph = tracer.trace(layer)
        except CaptureFailure as failure:
            last_error = failure
            if not failure.module_path or failure.module_path in forced:
                break
            forced.add(failure.module_path)
            reasons[failure.module_path] = str(failure)
            continue

        out_slots: list[int | None] = []
        consts: list[Any] = []
        k = 0
        for v in out_info["leaves"]:
            if isinstance(v, fx.Proxy):
                out_slots.append(k)
                consts.append(None)
                k += 1
            else:
                out_slots.append(None)
                consts.append(plain_int(v))
        reads.parametrize(graph, SHADOW)
        constants = _own_constants(layer, graph, before)
        guards = tuple((_guard_function(graph, node), flag) for node, flag in tracer.value_guards)
        annotate_features(layer, graph, SHADOW)
        traced_out = [v.node.meta.get(SHADOW) if isinstance(v, fx.Proxy) else v for v in out_info["leaves"]]
        for node in graph.nodes:  # shadows are only needed while tracing; don't keep real tensors alive
            shadow = node.meta.pop(SHADOW, None)
            node.meta["fxadapt_kind"] = _value_kind(shadow)
            if isinstance(shadow, torch.Tensor):
                node.meta["fxadapt_meta"] = (shadow.dtype, tuple(shadow.shape))
        graph.lint()
        capture = Capture(
            graph=graph,
            in_spec=in_spec,
            dynamic=dynamic,
            out_spec=out_info["spec"],
            out_slots=tuple(out_slots),
            out_constants=tuple(consts),
            leaves=tuple(sorted(forced)),
            leaf_reasons=reasons,
            input_names=tuple(names[i] for i in dynamic),
            value_guards=guards,
            size_guards=tracer.size_guards,
            reads=tuple(sorted(reads.reads.items(), key=lambda kv: kv[0])),
            signature=layer_signature(layer),
            has_opaque_inputs=any(not isinstance(leaves[i], torch.Tensor) for i in dynamic),
            device=next((leaves[i].device for i in dynamic if isinstance(leaves[i], torch.Tensor)), None),
            dtype=next((leaves[i].dtype for i in dynamic if isinstance(leaves[i], torch.Tensor)), None),
            constants=constants,
        )
        if verify:
            shadow_out = (
                expected if verify == "eager" else pytree.tree_unflatten(traced_out, out_info["spec"])
            )
            _verify(layer, orig_forward, capture, leaves, args, kwargs, shadow_out)
        return capture

    where = f" in submodule {last_error.module_path!r}" if last_error and last_error.module_path else ""
    raise CaptureError(
        f"could not capture layer {type(layer).__name__}{where}: {last_error}. "
        f"Submodules made opaque so far: {sorted(forced) or 'none'}."
    )


_CONSTANT_NAME = re.compile(r"_tensor_constant\d+")
_CONSTANTS = itertools.count()


def _own_constants(
    layer: nn.Module, graph: fx.Graph, before: set[str]
) -> tuple[tuple[str, torch.Tensor], ...]:
    """fx stores the tensor literals it meets as ``_tensor_constantN`` attributes of the traced layer; give them
    process-unique names (a sibling sharing this capture, or holding constants of its own, cannot collide)."""
    out = []
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and target not in before and _CONSTANT_NAME.fullmatch(target):
            value = layer.__dict__.pop(target, None)
            if not isinstance(value, torch.Tensor):
                continue
            name = f"_fxadapt_constant{next(_CONSTANTS)}"
            layer.__dict__[name] = value
            node.target = name
            out.append((name, value))
    return tuple(out)


class _preserved_rng:
    """Tracing and verification run ops that draw random numbers (dropout): leave the user's RNG untouched."""

    def __init__(self, args: Any):
        self.devices = sorted(
            {
                t.device.index or 0
                for t in pytree.tree_leaves(args)
                if isinstance(t, torch.Tensor) and t.device.type == "cuda"
            }
        )

    def __enter__(self) -> None:
        self._ctx = torch.random.fork_rng(devices=self.devices)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


VERIFY_SEED = 1234


def seed_rng(seed: int, args: Any) -> None:
    """Seed the generators a layer call draws from: the CPU one and those of the CUDA devices of ``args``
    (``torch.manual_seed`` seeds every device of every backend: ~100x slower, per layer call)."""
    torch.default_generator.manual_seed(seed)
    for t in pytree.tree_leaves(args):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
            break


@traced  # its copies of opaque inputs use the tracing thread's Tensor.__deepcopy__ (tracing.py)
def verify_shared(
    layer: nn.Module,
    orig_forward: Callable[..., Any],
    capture: Capture,
    args: tuple,
    kwargs: dict,
    expected: Any = None,
):
    """Check a capture traced on a sibling layer against this layer's own eager call, bit for bit: ``expected``
    is that call's output when it was recorded (seeded with the verification seed), else it is run now."""
    leaves, _ = flatten_call(args, kwargs)
    _verify(layer, orig_forward, capture, leaves, args, kwargs, expected)


def _verify(layer, orig_forward, capture: Capture, leaves, args, kwargs, expected: Any = None) -> None:
    """The generated code must reproduce, bit for bit, the layer's output on the call it was traced from: from a
    fresh eager call (``expected=None``) or from the real values computed op by op while tracing (cheaper: used
    for captures made lazily at run time)."""
    capture.adopt(layer)
    run = capture.bind(capture.code())
    seed = VERIFY_SEED
    with torch.no_grad(), _preserved_rng(args):
        if expected is None:
            seed_rng(seed, args)
            call_leaves, structure = flatten_call(args, kwargs)
            eager_args, eager_kwargs = unflatten_call([_shadow_copy(v) for v in call_leaves], structure)
            expected = orig_forward(layer, *eager_args, **eager_kwargs)
        seed_rng(seed, args)
        flat = [_shadow_copy(v) if i in capture.dynamic else v for i, v in enumerate(leaves)]
        got = run(layer, flat)
    exp_leaves, exp_spec = pytree.tree_flatten(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if exp_spec != got_spec:
        raise CaptureError(f"captured {type(layer).__name__} returns {got_spec}, eager returns {exp_spec}")
    for i, (e, g) in enumerate(zip(exp_leaves, got_leaves)):
        if isinstance(e, torch.Tensor):
            if not (isinstance(g, torch.Tensor) and e.shape == g.shape and e.dtype == g.dtype):
                raise CaptureError(
                    f"captured {type(layer).__name__} output {i} differs in shape/dtype from eager"
                )
            if not torch.equal(e, g) and not (
                e.isnan().any() and torch.equal(e.nan_to_num(), g.nan_to_num())
            ):
                diff = (e.double() - g.double()).abs().max().item()
                raise CaptureError(
                    f"captured {type(layer).__name__} output {i} differs from eager (max abs diff {diff:.3g})"
                )

"""``explain(model)``: what the compiler found in each layer, as a readable report.

A presentation layer over the pipeline's own records: per layer, the :class:`~fxadapt.sites.SiteReport` of its
captured graph (residual and module sites, rejected candidates), the capture's opaque submodules and their
reasons, the compiled specialisations (guard keys), the active plan and the kernel-lowering notes. Nothing here
decides anything; it traces (one priming forward) but never modifies the model.

Layers whose reports are identical (the usual case: 12 ``BertLayer`` s) are shown once, collapsed::

    fxadapt.explain: BertModel, 12 layers
      encoder.layer.0–11 (BertLayer) ×12:
          sites: attn.out (from attention.output.dense, post-norm), ffn.out (from output.dense, post-norm)
          module sites: attn.q=attention.self.query, attn.k=attention.self.key, ...

``verbose=True`` adds the candidates that were *not* made sites (residual adds and projections, each with its
reason) and every leaf call of the captured graph (the modules and attention functions tracing kept opaque).
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .graphs import is_attention_function
from .install import layer_state
from .model import layers_of, prime

__all__ = ["Explanation", "LayerExplanation", "explain"]

_WIDTH = 110


@dataclass(repr=False)
class LayerExplanation:
    """What :func:`explain` found in one layer.

    Attributes:
        path: the layer's module path (``encoder.layer.3``).
        cls: the layer's original class name.
        sites: residual sites, ``"<kind> (from <producer>[, post-norm])"``.
        module_sites: module sites, ``"<kind>=<module path in the layer>"``.
        leaves: submodules tracing made opaque, with the reason.
        rejected: ``(candidate, reason)`` for residual adds and projections that are not sites (``verbose``).
        guard_keys: number of compiled call specialisations.
        plan: the active adapters at this layer, ``"<name> (<method>) at <site>"``.
        kernels: kernel-lowering notes of the last compiled specialisation.
        calls: every leaf call of the captured graph, ``"<module path> (<class>)"`` or a function (``verbose``).
        notes: why expected sites are missing (projections no role was found for, hand-written attention).
    """

    path: str
    cls: str
    sites: list[str]
    module_sites: list[str]
    leaves: dict[str, str]
    rejected: list[tuple[str, str]]
    guard_keys: int
    plan: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _body(self) -> tuple:
        """Everything but the path: layers with equal bodies (and the same parent list) are shown collapsed."""
        return tuple(
            _freeze(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("path",)
        )

    def lines(self) -> list[str]:
        """The report's body for this layer (without the header line)."""
        out = [_wrap("sites: ", ", ".join(self.sites) or "none")]
        if self.module_sites:
            out.append(_wrap("module sites: ", ", ".join(self.module_sites)))
        if self.plan:
            out.append(_wrap("active: ", ", ".join(self.plan)))
        for note in self.kernels:
            out.append(_wrap("kernels: ", note))
        for leaf, why in self.leaves.items():
            out.append(_wrap(f"opaque submodule {leaf}: ", why))
        for note in self.notes:
            out.append(_wrap("note: ", note))
        for node, why in self.rejected:
            out.append(_wrap(f"not a site: {node}: ", why))
        if self.calls:
            out.append(_wrap("leaf calls: ", ", ".join(self.calls)))
        if self.guard_keys:
            out.append(f"captured calls (guard keys): {self.guard_keys}")
        return out

    def __str__(self) -> str:
        return "\n".join([f"{self.path} ({self.cls}):", *("    " + line for line in self.lines())])

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(str(self))


@dataclass(repr=False)
class Explanation:
    """The report :func:`explain` returns; ``print`` it, or read :attr:`layers`."""

    model: str
    layers: list[LayerExplanation]

    def groups(self) -> list[tuple[str, list[LayerExplanation]]]:
        """Runs of consecutive layers of one list with identical reports, each with its collapsed label
        (``encoder.layer.0–11``)."""
        runs: list[list[LayerExplanation]] = []
        for le in self.layers:
            prev = runs[-1][-1] if runs else None
            if prev is not None and _same_run(prev, le):
                runs[-1].append(le)
            else:
                runs.append([le])
        return [(_label(run), run) for run in runs]

    def __str__(self) -> str:
        n = len(self.layers)
        lines = [f"fxadapt.explain: {self.model}, {n} layer{'s' if n != 1 else ''}"]
        for label, run in self.groups():
            count = f" ×{len(run)}" if len(run) > 1 else ""
            lines.append(f"  {label} ({run[0].cls}){count}:")
            lines.extend(textwrap.indent(line, "      ") for line in run[0].lines())
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(str(self))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable), one entry per layer."""
        return {"model": self.model, "layers": [dataclasses.asdict(le) for le in self.layers]}


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


_INDEXED = re.compile(r"^(.*?)(\d+)$")


def _split_path(path: str) -> tuple[str, int | None]:
    match = _INDEXED.match(path)
    return (match.group(1), int(match.group(2))) if match else (path, None)


def _same_run(prev: LayerExplanation, le: LayerExplanation) -> bool:
    (p_parent, p_index), (parent, index) = _split_path(prev.path), _split_path(le.path)
    return p_index is not None and index == p_index + 1 and parent == p_parent and prev._body() == le._body()


def _label(run: list[LayerExplanation]) -> str:
    if len(run) == 1:
        return run[0].path
    parent, first = _split_path(run[0].path)
    _, last = _split_path(run[-1].path)
    return f"{parent}{first}–{last}"


def _wrap(label: str, text: str) -> str:
    return textwrap.fill(
        text,
        width=_WIDTH,
        initial_indent=label,
        subsequent_indent=" " * min(len(label), 24),
        break_on_hyphens=False,
        break_long_words=False,
    )


def _describe(node: Any, name: str) -> str:
    """``add (mul_3 + mul_4)``: a graph node with its operands, so a rejected candidate can be found in the code."""
    if node is None or node.op != "call_function" or not node.args:
        return name
    operands = [str(a) for a in node.args if isinstance(a, (fx.Node, int, float))]
    op = "+" if "add" in getattr(node.target, "__name__", "") else ","
    return f"{name} ({f' {op} '.join(operands)})" if operands else name


def _leaf_calls(layer: nn.Module, graph: Any) -> list[str]:
    calls: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module":
            try:
                cls = type(layer.get_submodule(str(node.target))).__name__
            except AttributeError:
                cls = "?"
            entry = f"{node.target} ({cls})"
        elif node.op == "call_function" and is_attention_function(node):
            entry = f"{getattr(node.target, '__name__', str(node.target))} (attention function)"
        else:
            continue
        if entry not in calls:
            calls.append(entry)
    return calls


def _site(site: Any) -> str:
    """``"<kind> (from <producer>[, post-norm | , before its post-norm | , branch])"``."""
    if site.mode == "branch":
        where = ", before its post-norm" if site.norm else ", parallel branch"
    else:
        where = ", post-norm" if site.norm else ""
    return f"{site.kind} (from {site.producer}{where})"


def explain(model: nn.Module, example_inputs: Any = None, *, verbose: bool = False) -> Explanation:
    """Per layer: the sites found, opaque submodules and why, captures, the active plan, kernel lowering.

    Identical layers print collapsed (``encoder.layer.0–11 (BertLayer) ×12``). With ``verbose=True`` the report
    also lists the candidates that were not made sites (residual adds and projections, with the reason) and every
    leaf call of the captured graphs. Works on a model with or without adapters; it runs one priming forward
    (on ``example_inputs``, or inputs built from the model's config) but never modifies the model.
    """
    paths, layers = layers_of(model)
    primed = prime(model, layers, example_inputs)
    out = []
    for path, layer, (_, traced) in zip(paths, layers, primed):
        lstate = layer_state(layer)
        report = traced.report
        rejected: list[tuple[str, str]] = []
        calls: list[str] = []
        if verbose:
            nodes = {n.name: n for n in traced.capture.graph.nodes}
            rejected = [(_describe(nodes.get(name), name), why) for name, why in report.rejected]
            named = {s.module for s in report.modules}
            rejected += [
                (
                    module,
                    "a Linear-like call with no attention/feed-forward role found by data flow; "
                    f"LoRA can still target it as 'linear:{module}'",
                )
                for module in report.linears
                if module not in named
            ]
            calls = _leaf_calls(layer, traced.capture.graph)
        out.append(
            LayerExplanation(
                path=path,
                cls=(lstate.orig_class if lstate else type(layer)).__name__,
                sites=[_site(s) for s in report.residual],
                module_sites=[f"{s.kind}={s.module}" for s in report.modules],
                leaves=dict(traced.capture.leaf_reasons),
                rejected=rejected,
                guard_keys=len(lstate.traced) if lstate else 0,
                plan=lstate.plan.describe() if lstate else [],
                kernels=list(lstate.notes) if lstate else [],
                calls=calls,
                notes=list(report.notes),
            )
        )
    return Explanation(type(model).__name__, out)

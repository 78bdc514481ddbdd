"""Feature provenance: which output features of a projection a later value holds.

A fused projection (one Linear for q, k and v: GPT-NeoX, Falcon, Bloom, Phi-3, ModernBERT, CodeGen...) is split
into its parts by data movement whose form varies by model: ``split``/``chunk``, ``view(..., 3, d)`` and
indexing, slicing, per-head interleaving (``view(b, s, heads, 3 * d).chunk(3, -1)``). Instead of matching those
forms, the capture replays the movement on *labels*: while tracing, every projection's output is replaced by
its feature indices (``arange(out_features)`` broadcast to the output's shape) and every op that only moves data
(view, reshape, permute, split, indexing, ...) is re-run on the labels with the real shapes of the call. A value
reached this way holds exactly the features its labels name, whatever the op sequence was.

Each such node gets ``node.meta["fxadapt_features"] = (projection node name, ranges)``, ranges being sorted,
disjoint ``(start, stop)`` runs of output features. ``sites.py`` reads it to give ``attn.q/k/v`` as parts of a
fused projection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .graphs import is_movement, is_projection

__all__ = ["FEATURES", "annotate_features", "ranges_of"]

FEATURES = "fxadapt_features"


def ranges_of(labels: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """Sorted disjoint ``(start, stop)`` runs of the distinct values in ``labels`` (feature indices, >= 0): marked
    in a presence vector and read off its edges, O(n) (a sort, as ``unique`` does, cost ~15x more per trace)."""
    flat = labels.reshape(-1)
    if not flat.numel():
        return ()
    present = torch.zeros(int(flat.max()) + 2, dtype=torch.int8, device=flat.device)
    present[flat] = 1
    edges = torch.diff(present, prepend=present.new_zeros(1))  # +1 where a run starts, -1 one past its end
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return tuple(zip(starts, stops))


def annotate_features(root: nn.Module, graph: fx.Graph, shadow_key: str) -> None:
    """Record feature provenance on ``graph``'s nodes from the real values in ``node.meta[shadow_key]``."""
    labels: dict[fx.Node, tuple[str, Any]] = {}  # node -> (projection name, label tensor or tuple of them)
    for node in graph.nodes:
        shadow = node.meta.get(shadow_key)
        if is_projection(root, node) and isinstance(shadow, torch.Tensor) and shadow.dim() >= 1:
            width = shadow.shape[-1]
            lab = torch.arange(width, device="cpu").expand(*shadow.shape).contiguous()
            labels[node] = (node.name, lab)
        elif is_movement(node) and node.args and isinstance(node.args[0], fx.Node) and node.args[0] in labels:
            source, value = labels[node.args[0]]
            if any(a in labels for a in node.all_input_nodes[1:]):
                continue
            result = _replay(node, value, shadow_key)
            if result is not None:
                labels[node] = (source, result)
    for node, (source, value) in labels.items():
        if isinstance(value, torch.Tensor) and value.numel():
            node.meta[FEATURES] = (source, ranges_of(value))


def _replay(node: fx.Node, value: Any, shadow_key: str) -> Any:
    """Run ``node``'s op with its data input replaced by ``value`` (labels) and every other input by its real
    value; None if the op does not apply to labels."""
    first = node.args[0]

    def real(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return value if a is first else a.meta.get(shadow_key)
        return a

    args = fx.node.map_aggregate(node.args, real)
    kwargs = fx.node.map_aggregate(node.kwargs, real)
    try:
        if node.op == "call_method":
            out = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            out = node.target(*args, **kwargs)  # type: ignore[operator]
    except Exception:
        return None
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    return None

"""Several prediction heads in one call, AdapterHub's way: one head per ``Parallel`` channel or ``BatchSplit`` slice.

The head a setup uses (:func:`head_block`) follows AdapterHub's reading of a composition: a ``Stack`` is read by
its last child; a name with a head is that head; ``Parallel(...)`` gives one head per child (a child block
contributes its last adapter's head) and ``BatchSplit(...)`` one head per batch slice. :func:`run_heads` applies
them to their rows of the base model's output and returns a :class:`MultiHeadOutput` (the heads' outputs in
order; ``loss`` is their sum when every head has one; ``logits`` stacks theirs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

from .compose import BatchSplit, Block, Parallel, Stack
from .errors import AdapterNotFoundError, CompositionError

__all__ = ["MultiHeadOutput", "head_block", "run_heads"]


@dataclass
class MultiHeadOutput(ModelOutput):
    """The outputs of several heads (``out[i]`` is head ``i``'s; ``out["loss"]`` the summed loss)."""

    head_outputs: list[Any] | None = None
    loss: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor:
        return torch.vstack([o["logits"] for o in self.head_outputs or ()])

    def __getitem__(self, k: Any) -> Any:
        return (self.head_outputs or [])[k] if isinstance(k, int) else super().__getitem__(k)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.head_outputs or ())

    def __len__(self) -> int:
        return len(self.head_outputs or ())


def _last(child: Any) -> str:
    return child if isinstance(child, str) else child.names()[-1]


def head_block(setup: Block | str | None, heads: Any) -> str | tuple[str, ...] | BatchSplit | None:
    """The head(s) ``setup`` uses: a name, a tuple of names (one per Parallel channel), a ``BatchSplit`` of names,
    or None (no head of the setup exists: the caller keeps its own choice)."""
    final = setup.children[-1] if isinstance(setup, Stack) and setup.children else setup
    if isinstance(final, Parallel):
        names = tuple(_last(c) for c in final.children)
    elif isinstance(final, BatchSplit):
        names = tuple(_last(c) for c in final.children)
        if all(n in heads for n in names):
            return BatchSplit(*names, batch_sizes=list(final.batch_sizes))
        return None
    else:
        return None
    return names if all(n in heads for n in names) else None


def run_heads(
    block: tuple[str, ...] | BatchSplit,
    heads: Any,
    channels: int,
    call: Callable[[Any, slice, torch.Tensor | None], Any],
    rows: int,
    labels: torch.Tensor | None,
) -> MultiHeadOutput:
    """Apply each head of ``block`` to its rows: ``call(head, rows, labels)`` runs one head on a slice of the base
    output (``rows`` in total; ``channels`` Parallel copies of the batch)."""
    names = block.children if isinstance(block, BatchSplit) else block
    for n in names:
        if n not in heads:
            raise AdapterNotFoundError(f"no head named {n!r}; heads: {sorted(heads)}")
    if isinstance(block, BatchSplit):
        sizes = list(block.batch_sizes)
        if sum(sizes) != rows:
            raise CompositionError(
                f"the heads' BatchSplit{sizes} covers {sum(sizes)} rows, but the output has {rows}; expected "
                f"batch_sizes summing to {rows}"
            )
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = [slice(s, s + n) for s, n in zip(starts, sizes)]
        label_parts = [labels[p] if labels is not None else None for p in parts]
    else:
        if len(names) != channels:
            raise CompositionError(
                f"{len(names)} heads {list(names)} for {channels} Parallel channels; expected one head per channel"
            )
        batch = rows // channels
        parts = [slice(i * batch, (i + 1) * batch) for i in range(channels)]
        label_parts = [labels] * channels  # every channel holds the whole batch
    outputs = [call(heads[n], p, lab) for n, p, lab in zip(names, parts, label_parts)]
    losses = [o.get("loss") if hasattr(o, "get") else None for o in outputs]
    loss = torch.stack(losses).sum() if losses and all(x is not None for x in losses) else None
    return MultiHeadOutput(head_outputs=outputs, loss=loss)

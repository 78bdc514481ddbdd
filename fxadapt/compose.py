"""Composition blocks, compiled into the graph.

Design note
-----------
A *setup* is a tree of blocks over adapter names: ``Stack("a", "b")``, ``Fuse("a", "b")``, ``Parallel(...)``,
``BatchSplit(..., batch_sizes=[2, 3])``, ``Split(..., splits=[4, 4])``, ``Average(..., weights=[...])``. The
semantics are AdapterHub's (``composition.py`` and ``ComposableAdapterLayerBase``): a block passes a per-site
*state* (for bottleneck adapters: hidden states, residual input, adapter residual, last up-projection) through its
children. Here the same recursion runs **once, at rewrite time**, over graph nodes instead of tensors: the result
is straight-line generated code per layer, with no Python dispatch per forward. A method supports composition by
implementing a few state hooks (:class:`Composer`); the block logic below is written once.

Nesting rules are a table (:data:`ALLOWED_NESTINGS`): AdapterHub's, plus ``Stack`` and ``Fuse`` of ``Stack``s at
any depth up to :data:`MAX_DEPTH` (AdapterHub rejects Fuse of Stacks, #574, and crashes on Stack + Fuse, #496).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from .errors import CompositionError, nearest

__all__ = [
    "ALLOWED_NESTINGS",
    "Average",
    "BatchSplit",
    "Block",
    "Composer",
    "Fuse",
    "Parallel",
    "PerRow",
    "Split",
    "Stack",
    "compose",
    "parse_setup",
    "restrict",
]

MAX_DEPTH = 3  # levels of blocks below the setup itself


@dataclass(frozen=True, init=False)
class Block:
    """A composition block over adapter names and nested blocks."""

    children: tuple[str | Block, ...]

    def __init__(self, *children: str | Block):
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])
        object.__setattr__(self, "children", tuple(parse_setup(c, nested=True) for c in children))
        if not self.children:
            raise CompositionError(f"{type(self).__name__}() needs at least one adapter or block")

    def __iter__(self):
        return iter(self.children)

    def __len__(self) -> int:
        return len(self.children)

    def names(self) -> list[str]:
        """Adapter names in the tree, depth first, without duplicates."""
        out: list[str] = []
        for c in self.children:
            for n in [c] if isinstance(c, str) else c.names():
                if n not in out:
                    out.append(n)
        return out

    def first(self) -> str:
        c = self.children[0]
        return c if isinstance(c, str) else c.first()

    def last(self) -> str:
        c = self.children[-1]
        return c if isinstance(c, str) else c.last()

    def __repr__(self) -> str:
        inner = ", ".join(repr(c) for c in self.children)
        extra = self._extra()
        return f"{type(self).__name__}({inner}{', ' + extra if extra else ''})"

    def _extra(self) -> str:
        return ""


@dataclass(frozen=True, init=False, repr=False)
class Stack(Block):
    """Apply the children one after another (the output of one is the input of the next)."""


@dataclass(frozen=True, init=False, repr=False)
class Fuse(Block):
    """AdapterFusion: attention over the children's outputs at each site (needs ``fxadapt.add_fusion``)."""

    @property
    def name(self) -> str:
        return ",".join(c if isinstance(c, str) else c.last() for c in self.children)


@dataclass(frozen=True, init=False, repr=False)
class Parallel(Block):
    """Run every child on its own copy of the batch; outputs come back stacked along the batch dimension."""


@dataclass(frozen=True, init=False, repr=False)
class Average(Block):
    """Weighted average of the children's outputs (AdapterHub: ``mean(stack(outputs) * weights)``)."""

    weights: tuple[float, ...] = field(default=())

    def __init__(
        self, *children: str | Block, weights: Sequence[float] | None = None, normalize_weights: bool = True
    ):
        super().__init__(*children)
        n = len(self.children)
        if weights is None:
            w = (1.0 / n,) * n
        else:
            w = tuple(float(x) for x in weights)
            if len(w) != n:
                raise CompositionError(f"Average has {n} children but {len(w)} weights {list(w)}")
            if normalize_weights:
                total = sum(w) or 1.0
                w = tuple(x / total for x in w)
        object.__setattr__(self, "weights", w)

    def _extra(self) -> str:
        return f"weights={list(self.weights)}"


@dataclass(frozen=True, init=False, repr=False)
class BatchSplit(Block):
    """Contiguous slices of the batch go to the children (``batch_sizes`` must sum to the batch size)."""

    batch_sizes: tuple[int, ...] = field(default=())

    def __init__(self, *children: str | Block, batch_sizes: int | Sequence[int]):
        super().__init__(*children)
        sizes = (batch_sizes,) * len(self.children) if isinstance(batch_sizes, int) else tuple(batch_sizes)
        if len(sizes) != len(self.children) or any(not isinstance(s, int) or s < 0 for s in sizes):
            raise CompositionError(
                f"BatchSplit batch_sizes={list(sizes)} must give one non-negative int per child ({len(self.children)})"
            )
        object.__setattr__(self, "batch_sizes", sizes)

    def _extra(self) -> str:
        return f"batch_sizes={list(self.batch_sizes)}"


@dataclass(frozen=True, init=False, repr=False)
class Split(Block):
    """Contiguous slices of the *sequence* go to the children (``splits`` must sum to the sequence length)."""

    splits: tuple[int, ...] = field(default=())

    def __init__(self, *children: str | Block, splits: int | Sequence[int]):
        super().__init__(*children)
        sizes = (splits,) * len(self.children) if isinstance(splits, int) else tuple(splits)
        if len(sizes) != len(self.children) or any(not isinstance(s, int) or s < 0 for s in sizes):
            raise CompositionError(
                f"Split splits={list(sizes)} must give one non-negative int per child ({len(self.children)})"
            )
        object.__setattr__(self, "splits", sizes)

    def _extra(self) -> str:
        return f"splits={list(self.splits)}"


@dataclass(frozen=True, init=False, repr=False)
class PerRow(Block):
    """Each batch row runs the adapter its ``adapter_ids`` entry names (``-1``: none), in one batched op."""


# Which children each block may hold. AdapterHub's table, plus Stack in Stack and Fuse in Fuse's Stacks.
ALLOWED_NESTINGS: dict[type, tuple[type, ...]] = {
    Stack: (str, Stack, Fuse, Split, Parallel, BatchSplit, Average),
    Fuse: (str, Stack),
    Split: (str, Split, Stack, BatchSplit, Average),
    Parallel: (str, Stack, BatchSplit, Average),
    BatchSplit: (str, Stack, Split, BatchSplit, Average),
    Average: (str, Stack, Split, BatchSplit),
    PerRow: (str,),
}


def parse_setup(setup: Any, nested: bool = False) -> str | Block:
    """Normalise a user setup: a name becomes ``Stack(name)`` at top level; a list is a ``Stack`` (AdapterHub's
    convention), a list inside a list a ``Fuse``."""
    if isinstance(setup, Block):
        return setup
    if isinstance(setup, str):
        return setup if nested else Stack(setup)
    if isinstance(setup, (list, tuple)):
        if nested:
            return Fuse(*setup)
        return Stack(*setup)
    raise CompositionError(
        f"invalid adapter setup {setup!r} ({type(setup).__name__}); expected an adapter name, a list of names, or a "
        "block such as Stack('a', 'b') / Fuse('a', 'b')"
    )


def validate(setup: Block, known: Iterable[str]) -> None:
    """Check names and nestings; raises :class:`CompositionError` naming the offending nesting."""
    known = list(known)

    def walk(block: Block, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise CompositionError(
                f"adapter setup is too deep: {block!r} at depth {depth} (at most {MAX_DEPTH})"
            )
        allowed = ALLOWED_NESTINGS[type(block)]
        for child in block.children:
            if not isinstance(child, allowed):
                raise CompositionError(
                    f"cannot nest {type(child).__name__} inside {type(block).__name__} in {setup!r}; "
                    f"{type(block).__name__} may hold {', '.join(t.__name__ for t in allowed)}"
                )
            if isinstance(child, str):
                if child not in known:
                    raise CompositionError(
                        f"adapter {child!r} in setup {setup!r} does not exist; known adapters: {known}"
                        f"{nearest(child, known)}"
                    )
            else:
                if isinstance(child, PerRow):
                    raise CompositionError(
                        f"PerRow must be the whole setup, not nested inside {type(block).__name__}"
                    )
                if isinstance(child, Parallel) and not (isinstance(block, Stack) and depth == 0):
                    raise CompositionError(
                        f"Parallel must be the setup itself or directly inside the top-level Stack, not inside "
                        f"{type(block).__name__} in {setup!r}"
                    )
                walk(child, depth + 1)

    walk(setup, 0)


def parallel_channels(setup: Block | str) -> int:
    """Number of batch replicas a setup asks for (1 without Parallel)."""
    if isinstance(setup, str):
        return 1
    own = len(setup.children) if isinstance(setup, Parallel) else 1
    return max([own, *(parallel_channels(c) for c in setup.children)])


def restrict(setup: Block | str, present: Iterable[str]) -> Block | str | None:
    """Is anything of ``setup`` present at a site? Returns the setup if so, else None (the site stays as is)."""
    present = set(present)
    names = [setup] if isinstance(setup, str) else setup.names()
    return setup if present & set(names) else None


# --------------------------------------------------------------------------------------------------------------
# The block recursion, over a method's state hooks

S = TypeVar("S")


class Composer(Generic[S]):
    """Per-site state hooks a method implements to support composition (AdapterHub's customisable methods)."""

    def present(self, name: str) -> bool:
        raise NotImplementedError

    def pre_block(self, setup: Block | str, state: S) -> S:
        return state

    def single(self, name: str, state: S) -> S:
        raise NotImplementedError

    def has_fusion(self, setup: Fuse) -> bool:
        """Whether this site has fusion layers for ``setup``; a Fuse block is skipped at sites without them."""
        return False

    def fuse(self, setup: Fuse, state: S, children: list[S], query: Any) -> S:
        raise CompositionError(f"{type(self).__name__} does not support Fuse")

    def pre_fuse(self, setup: Fuse, state: S) -> tuple[S, Any]:
        raise CompositionError(f"{type(self).__name__} does not support Fuse")

    def vslice(self, state: S, index: Any) -> S:  # along the batch
        raise CompositionError(f"{type(self).__name__} does not support batch slicing")

    def hslice(self, state: S, index: Any) -> S:  # along the sequence
        raise CompositionError(f"{type(self).__name__} does not support Split")

    def cat(self, states: list[S], dim: int, base: S) -> S:
        raise NotImplementedError

    def mean(self, states: list[S], weights: tuple[float, ...]) -> S:
        raise CompositionError(f"{type(self).__name__} does not support Average")

    def batch_size(self, state: S) -> Any:
        raise NotImplementedError

    def seq_len(self, state: S) -> Any:
        raise NotImplementedError

    def check(self, value: Any, expected: int, what: str) -> None:
        """Emit a run-time check ``value == expected`` (batch or sequence sizes)."""

    def times(self, value: Any, k: int) -> Any:
        """``value * k`` for a size that may be a graph value."""
        return value * k


def check_size(value: int, expected: int, what: str) -> int:
    """Run-time check in generated code: a BatchSplit/Split size that does not match the input."""
    if int(value) != expected:
        raise CompositionError(
            f"{what}: the input has size {int(value)}, but the setup's sizes sum to {expected}"
        )
    return value


def compose(composer: Composer[S], setup: Block | str, state: S, depth: int = 0) -> S:
    """Emit the nodes of ``setup`` applied to ``state`` (AdapterHub's ``compose``)."""
    if isinstance(setup, str):
        return composer.single(setup, state) if composer.present(setup) else state
    if not _present(composer, setup):  # none of the block's adapters sits here: the block is a no-op
        return state
    if isinstance(setup, Stack):
        for child in setup.children:
            if isinstance(child, Block):
                state = compose(composer, child, state, depth + 1)
            elif composer.present(child):
                state = composer.single(child, composer.pre_block(child, state))
        return state
    if isinstance(setup, Fuse):
        if not composer.has_fusion(setup):
            return state
        state, query = composer.pre_fuse(setup, state)
        children = [compose(composer, c, state, depth + 1) for c in setup.children if _present(composer, c)]
        return composer.fuse(setup, state, children, query) if children else state
    if isinstance(setup, Average):
        state = composer.pre_block(_first_present(composer, setup), state)
        pairs = [
            (compose(composer, c, state, depth + 1), w)
            for c, w in zip(setup.children, setup.weights)
            if _present(composer, c)
        ]
        return composer.mean([p[0] for p in pairs], tuple(p[1] for p in pairs)) if pairs else state
    if isinstance(setup, Split):
        composer.check(
            composer.seq_len(state), sum(setup.splits), f"Split{list(setup.splits)} (sequence length)"
        )
        state = composer.pre_block(_first_present(composer, setup), state)
        bounds = _bounds(setup.splits)
        parts = []
        for child, (a, b) in zip(setup.children, bounds):
            part = composer.hslice(state, slice(a, b))
            parts.append(compose(composer, child, part, depth + 1) if _present(composer, child) else part)
        return composer.cat(parts, 1, state)
    if isinstance(setup, BatchSplit):
        composer.check(
            composer.batch_size(state),
            sum(setup.batch_sizes),
            f"BatchSplit{list(setup.batch_sizes)} (batch size)",
        )
        state = composer.pre_block(_first_present(composer, setup), state)
        parts = []
        for child, (a, b) in zip(setup.children, _bounds(setup.batch_sizes)):
            part = composer.vslice(state, slice(a, b))
            parts.append(compose(composer, child, part, depth + 1) if _present(composer, child) else part)
        return composer.cat(parts, 0, state)
    if isinstance(setup, Parallel):
        # the batch was replicated at the layer inputs (see rewrite.replicate_for_parallel)
        n = len(setup.children)
        per = composer.per_replica(state, n)  # type: ignore[attr-defined]
        state = composer.pre_block(_first_present(composer, setup), state)
        parts = []
        for i, child in enumerate(setup.children):
            start = composer.times(per, i) if i else 0
            part = composer.vslice(state, slice(start, composer.times(per, i + 1)))
            parts.append(compose(composer, child, part, depth + 1) if _present(composer, child) else part)
        return composer.cat(parts, 0, state)
    raise CompositionError(f"unknown block {setup!r}")  # pragma: no cover - validated before


def _present(composer: Composer[Any], setup: Block | str) -> bool:
    names = [setup] if isinstance(setup, str) else setup.names()
    return any(composer.present(n) for n in names)


def _first_present(composer: Composer[Any], setup: Block) -> str:
    return next((n for n in setup.names() if composer.present(n)), setup.first())


def _bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


# Calls whose inputs were replicated before the model ran (Parallel generation, parallel_inputs.py): every layer
# input then arrives at n copies of the batch already. Read only while such a call is open in some thread:
# torch.compile cannot trace ``ContextVar.get``, but it can guard on the counter.
_PRE_REPLICATED: ContextVar[bool] = ContextVar("fxadapt_pre_replicated", default=False)
_PRE_OPEN = 0
_PRE_LOCK = threading.Lock()


@contextlib.contextmanager
def pre_replicated() -> Iterator[None]:
    """Calls inside (this thread / task) had their inputs replicated to the Parallel channels before the model ran:
    :func:`replicate_batch` leaves the layers' inputs as they are."""
    global _PRE_OPEN
    with _PRE_LOCK:
        _PRE_OPEN += 1
    token = _PRE_REPLICATED.set(True)
    try:
        yield
    finally:
        _PRE_REPLICATED.reset(token)
        with _PRE_LOCK:
            _PRE_OPEN -= 1


def repeat_batch(t: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` copies of ``t``'s batch, one after the other along dim 0 (Parallel channel ``i`` = copy ``i``)."""
    return t.repeat(n, *([1] * (t.dim() - 1)))


def replicate_batch(n: int, first_layer: bool, primary: Any, *others: Any) -> tuple[Any, ...]:
    """Parallel composition: bring a layer's batch-first tensor inputs to ``n`` replicas of the batch.

    ``primary`` is the layer's hidden-state input. The first layer of a layer list replicates its inputs (unless
    they arrive replicated already, as encoder states do in a decoder); later layers receive replicated hidden
    states and only replicate the per-batch inputs that are not (masks, position ids). Inputs with a batch of 1
    that broadcast are left alone. Called from generated code right after the layer's inputs.
    """
    if _PRE_OPEN and _PRE_REPLICATED.get():
        return (primary, *others)
    batch = primary.shape[0]
    sizes = [t.shape[0] for t in others if isinstance(t, torch.Tensor) and t.dim() >= 2]
    full = max([batch, *sizes])
    target = batch * n if first_layer and full == batch else full

    def rep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] != target and t.shape[0] * n == target:
            return repeat_batch(t, n)
        return t

    return (rep(primary), *(rep(t) for t in others))

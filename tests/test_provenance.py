"""``provenance.ranges_of``: the runs of feature indices a value holds, against a plain-Python reference."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fxadapt.provenance import ranges_of


def _runs(values: set[int]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1][1] = v + 1
        else:
            out.append([v, v + 1])
    return tuple((a, b) for a, b in out)


@given(
    width=st.integers(1, 96),
    picks=st.lists(st.integers(0, 95), max_size=40),
    step=st.integers(1, 4),
    start=st.integers(0, 5),
)
def test_ranges_of_matches_a_set_of_the_labels(width, picks, step, start):
    labels = torch.arange(width).expand(2, 3, width).contiguous()
    for value in (
        labels,
        labels[..., start::step],  # slicing (a fused projection's part, per-head interleaving)
        labels[:, :, [p % width for p in picks]] if picks else labels[..., :0],  # indexing, repeats
        labels.transpose(0, 2)[start % width :],
    ):
        assert ranges_of(value) == _runs(set(value.reshape(-1).tolist()))

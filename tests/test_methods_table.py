"""docs/methods.md's method table is current, and what it says about composition holds for the bottleneck family
and unions (each declared block runs, an undeclared one raises CompositionError)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import make_inputs, make_model

import fxadapt
from fxadapt.methods import method_for, preset

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {
    "Stack": lambda m: fxadapt.Stack("a", "b"),
    "Fuse": lambda m: fxadapt.add_fusion(m, ["a", "b"]),
    "Split": lambda m: fxadapt.Split("a", "b", splits=[3, 4]),
    "Parallel": lambda m: fxadapt.Parallel("a", "b"),
    "BatchSplit": lambda m: fxadapt.BatchSplit("a", "b", batch_sizes=[1, 1]),
    "Average": lambda m: fxadapt.Average("a", "b"),
    "PerRow": lambda m: fxadapt.PerRow("a", "b"),
}


def test_table_is_current():
    spec = importlib.util.spec_from_file_location("methods_table", ROOT / "scripts" / "methods_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.table() in (ROOT / "docs" / "methods.md").read_text(), (
        "docs/methods.md is stale: run python scripts/methods_table.py"
    )


@pytest.mark.parametrize("name", ["compacter++", "mam"])
def test_declared_compositions_hold(name):
    config = preset(name)
    if name == "compacter++":
        config = config.replace(reduction_factor=8)
    declared = method_for(config).supported_compositions(config)
    model = make_model("bert")
    inputs = make_inputs("bert")
    fxadapt.inject(model, {"a": config, "b": config}, activate=False)
    for block, make in BLOCKS.items():
        if block not in declared:
            with pytest.raises(fxadapt.CompositionError):
                fxadapt.activate(model, make(model))
            continue
        fxadapt.activate(model, make(model))
        ids = fxadapt.adapter_ids(model, [0, 1]) if block == "PerRow" else contextlib.nullcontext()
        with torch.no_grad(), ids:  # per-row ids go with a PerRow setup only
            assert torch.isfinite(model(**inputs).last_hidden_state).all()

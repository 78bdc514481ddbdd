"""Per-layer-call dispatch cost of an injected layer: what the installed ``forward`` does before and after the
generated code (current plan, hook count, call key, runner lookup), on the very call the model makes.

Usage: .venv/bin/python bench/dispatch.py [--model bert|llama] [--calls 20000]

Measured with the layer's generated code swapped for a no-op of the same signature, so that what is timed is the
dispatch alone (subtracting two timings of a ~300 us layer call cannot resolve a few microseconds on a shared CPU).
Also printed: the cumulative cost of each step, and the generated code's own time for scale.
``nn.Module.__call__`` is left out (the base layer pays it as well), and so is entering a ``forward(self, *args,
**kwargs)`` with the layer's arguments (timed on an empty function of that signature and printed as "entering";
the base layer's own ``forward`` binds the same arguments). One thread; issue 14's target: <= 3 us.
"""

from __future__ import annotations

import argparse
import sys
import timeit
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.calls import current_plan  # noqa: E402
from fxadapt.capture import record_layer_calls  # noqa: E402
from fxadapt.guards import call_key  # noqa: E402
from fxadapt.install import layer_state  # noqa: E402
from fxadapt.model import layers_of  # noqa: E402


def _model(name: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    if name == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000,
        )  # fmt: skip
        model = tf.LlamaModel(cfg)
    else:
        model = tf.BertModel(tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, vocab_size=1000))  # fmt: skip
    ids = torch.randint(0, 1000, (1, 16))
    return model.eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["bert", "llama"], default="bert")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, inputs = _model(args.model)
    fxadapt.inject(model, {"a": "seq_bn"})
    _, layers = layers_of(model)
    layer = layers[1]
    with torch.no_grad():
        model(**inputs)
        calls = record_layer_calls(model, [layer], lambda: model(**inputs))
    call_args, call_kwargs = calls[id(layer)]
    state = layer_state(layer)
    _, runners = current_plan(state)
    leaves, _, key = call_key(layer, call_args, call_kwargs, state.hooks(layer))
    entries = runners[key]
    forward = type(
        layer
    ).forward  # the installed dispatch, without nn.Module.__call__ (the base pays that too)
    n = max(args.calls // 20, 1)

    def best(fn) -> float:  # us per call: the 20th percentile of 20 batches of n calls
        ts = sorted(timeit.timeit(fn, number=n) / n for _ in range(20))
        return ts[3] * 1e6

    def steps(upto: int):
        def fn():
            current_plan(state)
            if upto > 1:
                hooks = state.hooks(layer)
                if upto > 2:
                    call_key(layer, call_args, call_kwargs, hooks)

        return fn

    with torch.no_grad():
        code = best(lambda: entries[0][1](layer, leaves))
        real = list(entries)
        entries[:] = [(capture, lambda layer, leaves: None, source) for capture, _, source in real]
        try:
            empty = best(lambda: None)
            parts = [best(steps(i)) - empty for i in (1, 2, 3)]

            def entering(self, *a, **k):
                return None

            enter = best(lambda: entering(layer, *call_args, **call_kwargs)) - empty
            total = best(lambda: forward(layer, *call_args, **call_kwargs)) - empty - enter
        finally:
            entries[:] = real
    print(f"{args.model}: dispatch {total:.1f} us per layer call (plan {parts[0]:.1f}, + hook count {parts[1]:.1f}, "
          f"+ call key {parts[2]:.1f}, + lookup and call {total:.1f}; entering forward {enter:.1f}); generated code alone "
          f"{code:.0f} us")  # fmt: skip


if __name__ == "__main__":
    main()

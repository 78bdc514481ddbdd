"""Per-layer-call dispatch cost of an injected layer: the installed ``forward`` (current plan, flatten the call,
guard key, runner lookup) minus the generated code alone, on the very call the model makes.

Usage: .venv/bin/python bench/dispatch.py [--model bert|llama] [--calls 2000]

``nn.Module.__call__`` is left out of both (the base layer pays it as well).

Both timings run interleaved in one process on one thread; the difference is what fxadapt adds per layer call
on top of the code it generated (issue 14's target: <= 3 us).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import transformers as tf  # noqa: E402

import fxadapt  # noqa: E402
from fxadapt.calls import current_plan  # noqa: E402
from fxadapt.capture import flatten_call, guard_key, record_layer_calls  # noqa: E402
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
    ap.add_argument("--calls", type=int, default=2000)
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
    leaves, spec = flatten_call(call_args, call_kwargs)
    key = guard_key(layer, leaves, spec, state.hooks(layer))
    runner = runners[key][0][1]
    forward = type(
        layer
    ).forward  # the installed dispatch, without nn.Module.__call__ (the base pays that too)
    full, code = [], []
    with torch.no_grad():
        for _ in range(args.calls // 10):
            t0 = time.perf_counter()
            for _ in range(10):
                forward(layer, *call_args, **call_kwargs)
            full.append((time.perf_counter() - t0) / 10)
            t0 = time.perf_counter()
            for _ in range(10):
                runner(layer, leaves)
            code.append((time.perf_counter() - t0) / 10)
    full.sort()
    code.sort()
    f, c = full[len(full) // 2], code[len(code) // 2]
    print(f"{args.model}: layer call {f * 1e6:.1f} us, generated code alone {c * 1e6:.1f} us, "
          f"dispatch {max(f - c, 0) * 1e6:.1f} us per layer call (median of {len(full)} x 10 calls)")  # fmt: skip


if __name__ == "__main__":
    main()

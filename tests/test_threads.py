"""Concurrency: many threads calling one injected model with their own setups, first calls that trace, injects
into two models at once, and untouched models running meanwhile. Every output equals the single-threaded one and no
patch is left behind (or ever visible to another thread)."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace
from tiny_models import main_output, make_inputs, make_model, randomise_adapters

import fxadapt
from fxadapt import PerRow

THREADS, CALLS = 4, 200
NAMES = ("a", "b", "c", "d")


def _attention_class():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return type(ALL_ATTENTION_FUNCTIONS)


def _patchable():
    cls = _attention_class()
    out = {
        "Module.__call__": torch.nn.Module.__call__,
        "Module.__getattr__": torch.nn.Module.__getattr__,
        "Tensor.__deepcopy__": torch.Tensor.__deepcopy__,
        "fx._Patcher": fx_trace._Patcher,
        "attention.get_interface": vars(cls).get("get_interface"),
        "attention.__getitem__": vars(cls).get("__getitem__"),
    }
    out.update(
        {f"torch.{n}": getattr(torch, n) for n in ("tensor", "as_tensor", "full", "zeros", "ones", "empty")}
    )
    out.update({f"math.{n}": v for n, v in vars(math).items() if callable(v)})
    return out


ORIGINALS = _patchable()  # taken at import, before any test traced anything


def assert_no_patch_left():
    now = _patchable()
    assert [k for k, v in ORIGINALS.items() if now[k] is not v] == []
    assert fx_trace.CURRENT_PATCHER is None and fx_trace._is_fx_tracing_flag is False


def _run_threads(work, n=THREADS):
    """Run ``work(i)`` in n threads started together; re-raise the first failure."""
    errors, barrier = [], threading.Barrier(n)

    def target(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Python threads are the concurrency here; torch's own worker threads only contend with them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(wrap=None, layers=2):
    model = make_model("bert", num_hidden_layers=layers)
    if wrap is not None:
        model = wrap(model)
    fxadapt.inject(model, dict.fromkeys(NAMES, "seq_bn"), activate=False)
    randomise_adapters(model, NAMES, seed=4, std=0.3)
    return model


@pytest.mark.parametrize("route", ["adapter_names", "adapter_ids"])
def test_threads_with_their_own_adapter(route):
    from fxadapt.compat import init

    model = _model(init, layers=1)
    inputs = [make_inputs("bert", batch=2, seed=i) for i in range(THREADS)]
    if route == "adapter_ids":
        fxadapt.activate(model, PerRow(*NAMES))
        kwargs = [{"adapter_ids": torch.tensor([i, (i + 1) % THREADS])} for i in range(THREADS)]
    else:
        fxadapt.activate(model, "d")
        kwargs = [{"adapter_names": NAMES[i]} for i in range(THREADS)]
    active = fxadapt.active_setup(model)
    with torch.no_grad():
        expected = [main_output(model(**inputs[i], **kwargs[i])) for i in range(THREADS)]
    wrong = [0] * THREADS

    def work(i):
        with torch.no_grad():
            for _ in range(CALLS):
                wrong[i] += not torch.equal(main_output(model(**inputs[i], **kwargs[i])), expected[i])

    _run_threads(work)
    assert wrong == [0] * THREADS
    assert fxadapt.active_setup(model) == active
    with torch.no_grad():  # no per-call state left behind either
        if route == "adapter_ids":
            with pytest.raises(fxadapt.CompositionError, match="no adapter_ids"):
                model(**inputs[0])
        else:  # the active setup ("d") is what a call without adapter_names runs
            assert torch.equal(main_output(model(**inputs[3])), expected[3])


# kinds of call the priming batch (padded, input_ids) did not have: each needs a new capture
KINDS = {
    "unpadded": lambda inp: {"input_ids": inp["input_ids"]},
    "token_types": lambda inp: {**inp, "token_type_ids": torch.ones_like(inp["input_ids"])},
    "embeds": lambda inp: {
        "inputs_embeds": torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    },
    "attentions": lambda inp: {**inp, "output_attentions": True},
}


def test_concurrent_first_calls_trace_once_and_leak_nothing():
    untouched = make_model("bert", seed=9)
    plain_inputs = make_inputs("bert", seed=5)
    with torch.no_grad():
        plain_expected = main_output(untouched(**plain_inputs))
    model = _model()
    fxadapt.activate(model, "a")
    reference = copy.deepcopy(model)  # deepcopy drops captures: its first calls trace single-threaded
    base = make_inputs("bert")
    calls = {k: make(base) for k, make in KINDS.items()}
    with torch.no_grad():
        expected = {k: main_output(reference(**v)) for k, v in calls.items()}
    kinds = [*KINDS, "unpadded", "embeds"]  # two threads share a new kind: one waits for the other's capture
    stop = threading.Event()
    plain_wrong = []

    def plain_loop():  # an untouched model in another thread must never see tracing patches
        with torch.no_grad():
            while not stop.is_set():
                plain_wrong.append(not torch.equal(main_output(untouched(**plain_inputs)), plain_expected))

    runner = threading.Thread(target=plain_loop)
    runner.start()
    got = {}

    def work(i):
        with torch.no_grad():
            got[i] = main_output(model(**calls[kinds[i]]))

    try:
        _run_threads(work, n=len(kinds))
    finally:
        stop.set()
        runner.join()
    for i, kind in enumerate(kinds):
        assert torch.equal(got[i], expected[kind]), kind
    assert plain_wrong and not any(plain_wrong)
    assert_no_patch_left()
    state = fxadapt.install.layer_state(model.encoder.layer[0])
    assert state.traced and all(len(v) == 1 for v in state.traced.values())  # one capture per guard key


def test_concurrent_injects_into_two_models():
    bases = {s: make_model("llama" if s % 2 else "bert", seed=s) for s in range(4)}  # the init RNG is global:
    copies = {
        s: copy.deepcopy(m) for s, m in bases.items()
    }  # base models are built here, adapters set per seed

    def adapt(model, seed):
        fxadapt.inject(model, {"x": "double_seq_bn", "l": fxadapt.LoRAConfig(init_weights="bert")})
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name in ("x", "l"):
                for p in fxadapt.adapter_parameters(model, name).values():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        return model

    inputs = {s: make_inputs("llama" if s % 2 else "bert", seed=s) for s in range(4)}
    with torch.no_grad():
        expected = {s: main_output(adapt(copies[s], s)(**inputs[s])) for s in range(4)}
    models = {}

    def work(i):
        for round_ in range(2):
            models[i + 2 * round_] = adapt(bases[i + 2 * round_], i + 2 * round_)

    _run_threads(work, n=2)
    with torch.no_grad():
        for seed, model in models.items():
            assert torch.equal(main_output(model(**inputs[seed])), expected[seed]), seed
    assert_no_patch_left()
    with torch.no_grad():  # an untouched model still runs
        main_output(make_model("bert")(**make_inputs("bert")))


def test_a_failing_trace_leaves_no_patch_and_releases_the_lock(monkeypatch):
    from fxadapt import capture

    model = _model()
    fxadapt.activate(model, "a")
    real = capture._LayerTracer.create_args_for_root

    def interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise KeyboardInterrupt("interrupted while tracing")

    monkeypatch.setattr(capture._LayerTracer, "create_args_for_root", interrupted)
    # a hook on a traced-through submodule makes a new kind of call (inject primed the usual ones): traced now
    hook = model.encoder.layer[0].attention.self.register_forward_hook(lambda *a: None)
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        model(**make_inputs("bert"))
    hook.remove()
    assert_no_patch_left()
    monkeypatch.setattr(capture._LayerTracer, "create_args_for_root", real)
    done = []
    thread = threading.Thread(
        target=lambda: done.append(main_output(model(**KINDS["unpadded"](make_inputs("bert")))))
    )
    thread.start()
    thread.join(timeout=60)
    assert done, "the tracing lock was not released"


def test_prepare_captures_ahead_of_time():
    model = _model()
    fxadapt.activate(model, "a")
    base = make_inputs("bert")
    examples = [KINDS["unpadded"](base), KINDS["token_types"](base)]
    rng = torch.random.get_rng_state()
    report = fxadapt.prepare(model, examples, setups=["a", PerRow("a", "b"), None])
    assert report == {"captures": 0, "calls": 6}  # inject captured both kinds (token types reach no layer)
    assert torch.equal(torch.random.get_rng_state(), rng)
    state = fxadapt.install.layer_state(model.encoder.layer[0])
    traced, compiled = sum(map(len, state.traced.values())), len(state.compiled)
    with torch.no_grad():
        for example in examples:
            model(**example)
            with fxadapt.using(model, PerRow("a", "b")):
                model(**example, adapter_ids=[1, 0])
    assert sum(map(len, state.traced.values())) == traced and len(state.compiled) == compiled
    with pytest.raises(fxadapt.ConfigError, match="wrap a single batch in a list"):
        fxadapt.prepare(model, base)


def test_parallel_generate_beside_other_setups():
    """Parallel generation tells the layers their inputs arrive replicated: only in its own thread's context, so
    threads generating with another setup at the same time replicate as usual (or not at all)."""
    model = make_model("llama")
    fxadapt.inject(model, {"x": "seq_bn", "y": "seq_bn"}, activate=False)
    randomise_adapters(model, ("x", "y"), seed=4, std=0.3)
    # thread 3 runs a plain forward under Parallel: its layers must replicate while the others' must not
    setups = [fxadapt.Parallel("x", "y"), "x", fxadapt.Parallel("y", "x"), fxadapt.Parallel("x", "y")]
    ids = make_inputs("llama", batch=2)["input_ids"]
    kwargs = dict(max_new_tokens=3, do_sample=False)

    def generate(i):
        with fxadapt.using(model, setups[i]):
            return model.generate(input_ids=ids, **kwargs) if i < 3 else main_output(model(input_ids=ids))

    with torch.no_grad():
        expected = [generate(i) for i in range(THREADS)]
    wrong = [0] * THREADS

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                wrong[i] += not torch.equal(generate(i), expected[i])

    _run_threads(work)
    assert wrong == [0] * THREADS
    assert [e.shape[0] for e in expected] == [4, 2, 4, 4]

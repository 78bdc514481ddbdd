"""Helper for the kill tests (tests/test_atomic.py): models whose adapters are saved in a loop by a child process.

Run as a script it is a *zygote*: it builds the models once, then forks one saver per request read from stdin
(``<format> <folder> <start>`` → it answers the saver's pid; ``wait <pid>`` → the exit status), so every saver
starts saving at once instead of importing torch. Version ``k`` of a checkpoint is adapter ``NAMES[k % 2]``
(two structures: different shapes) with every weight equal to ``k``; a folder that loads must therefore show one
value, whose parity matches the structure it loaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tiny_models import make_model

import fxadapt

torch.set_num_threads(1)

NAMES = ("even", "odd")
# per format: the adapters' two configs (about 1 MB of weights each: large enough that a save takes a while)
CONFIGS = {
    "fxadapt": (
        fxadapt.BottleneckConfig(reduction_factor=1 / 16),
        fxadapt.BottleneckConfig(reduction_factor=1 / 8),
    ),
    "adapterhub": (
        fxadapt.BottleneckConfig(reduction_factor=1 / 16),
        fxadapt.BottleneckConfig(reduction_factor=1 / 8),
    ),
    "peft": (fxadapt.LoRAConfig(r=256, alpha=16), fxadapt.LoRAConfig(r=128, alpha=16)),
}


def base_model() -> torch.nn.Module:
    return make_model("bert", hidden_size=64, intermediate_size=96)


def checker_model() -> torch.nn.Module:
    """The base model with a small adapter that stays: its layers keep their captures, so loads do not re-trace."""
    model = base_model()
    fxadapt.inject(model, {"keep": fxadapt.LoRAConfig(r=1)}, activate=False)
    return model


def _build(fmt: str) -> torch.nn.Module:
    model = base_model()
    fxadapt.inject(model, dict(zip(NAMES, CONFIGS[fmt])), activate=False)
    return model


MODELS = {fmt: _build(fmt) for fmt in CONFIGS}


def write_version(fmt: str, folder: str, k: int) -> None:
    """Save version ``k`` of the checkpoint at ``folder`` in format ``fmt``."""
    model = MODELS[fmt]
    name = NAMES[k % 2]
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.fill_(float(k))
    if fmt == "adapterhub":  # alternate the weight file too: a stale one must never survive a save
        fxadapt.save_adapter(model, folder, name, format="adapterhub", use_safetensors=bool(k % 2))
    else:
        fxadapt.save_adapter(model, folder, name, format=fmt)


def save_loop(fmt: str, folder: str, start: int) -> None:
    """Save versions start, start + 1, ... until killed (or the zygote is gone)."""
    zygote = os.getppid()
    k = start
    while os.getppid() == zygote:
        write_version(fmt, folder, k)
        k += 1


def zygote_main() -> None:
    import sys
    import tempfile

    children: set[int] = set()
    with tempfile.TemporaryDirectory() as warm:  # first saves import and cache things: not in every saver
        for fmt in CONFIGS:
            write_version(fmt, os.path.join(warm, fmt), 0)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "wait":
            pid = int(words[1])
            _, status = os.waitpid(pid, 0)
            children.discard(pid)
            print(os.waitstatus_to_exitcode(status), flush=True)
            continue
        fmt, folder, start = words[0], words[1], int(words[2])
        pid = os.fork()
        if pid == 0:
            try:
                save_loop(fmt, folder, start)
            finally:
                os._exit(0)
        children.add(pid)
        print(pid, flush=True)
    for pid in children:  # the test is gone: stop the savers it left
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def loaded_version(fmt: str, folder: str, model: torch.nn.Module) -> int:
    """Load ``folder`` into ``model`` (no adapters), check it is one whole version, remove it again; returns k."""
    name = fxadapt.load_adapter(model, folder, name="loaded", activate=False)
    try:
        config = fxadapt.list_adapters(model)[name]
        values = torch.cat([p.detach().reshape(-1) for p in fxadapt.adapter_parameters(model, name).values()])
        k = int(values[0].item())
        assert torch.all(values == float(k)), f"{folder}: weights of several versions {values.unique()[:5]}"
        expected = CONFIGS[fmt][k % 2]
        shape = (config.r,) if fmt == "peft" else (config.reduction_factor,)
        wanted = (expected.r,) if fmt == "peft" else (expected.reduction_factor,)
        assert shape == wanted, f"{folder}: version {k} with the structure of another version ({shape})"
        return k
    finally:
        fxadapt.remove(model, name)


if __name__ == "__main__":
    zygote_main()

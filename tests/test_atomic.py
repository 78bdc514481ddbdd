"""Atomic saves: a folder always holds one complete checkpoint, old or new, whatever kills the writer.

The kill tests fork savers from a multiprocessing forkserver that has the models ready (tests/kill_worker.py), kill
each one with SIGKILL at a random moment (fixed seed) 20 times, and load the folder after every kill.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sys
import time

import pytest
import torch
from tiny_models import make_inputs, make_model

import fxadapt
from fxadapt import atomic

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork server and SIGKILL: Linux")

KILLS = 20


class Zygote:
    """tests/kill_worker.py run as a process that forks ready-to-save children on request."""

    def __init__(self):
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(here, "kill_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, fmt, folder, start):
        return self._ask(f"{fmt} {folder} {start}")

    def wait(self, pid):
        return self._ask(f"wait {pid}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _kill_loop(zygote, fmt, folder, rng):
    import kill_worker

    kill_worker.write_version(fmt, str(folder), 0)
    t0 = time.perf_counter()
    kill_worker.write_version(
        fmt, str(folder), 0
    )  # timed warm: kills fall within ~0-3 saves, whatever the load
    save_s = time.perf_counter() - t0
    model = kill_worker.checker_model()
    previous = kill_worker.loaded_version(fmt, str(folder), model)
    assert previous == 0
    seen = {0}
    for i in range(KILLS):
        start = 1000 * (i + 1)
        pid = zygote.start(fmt, folder, start)
        time.sleep(rng.uniform(0.0, 3.0) * save_s + 0.005)
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL
        k = kill_worker.loaded_version(fmt, str(folder), model)
        assert k == previous or k >= start, (
            i,
            k,
            previous,
        )  # the old checkpoint, or one this saver completed
        files = sorted(p.name for p in folder.iterdir())
        assert len([f for f in files if f in atomic.CHECKPOINT_FILES and f != "adapter_config.json"]) == 1, (
            files
        )
        previous = k
        seen.add(k)
    assert len(seen) >= 3, seen  # savers completed saves between kills (otherwise the test tests nothing)
    kill_worker.write_version(fmt, str(folder), 7)  # a later save cleans what the killed savers left
    leftovers = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    assert leftovers == []
    assert kill_worker.loaded_version(fmt, str(folder), model) == 7


@pytest.mark.parametrize("fmt", ["fxadapt", "adapterhub", "peft"])
def test_killed_saves_leave_old_or_new(zygote, tmp_path, fmt):
    _kill_loop(zygote, fmt, tmp_path / "ckpt", random.Random(f"kill-{fmt}"))


def test_interrupted_swap_is_recovered(tmp_path, monkeypatch):
    """The portable path (two renames and a backup): a load restores a backup whose replacement never arrived."""
    monkeypatch.setenv("FXADAPT_NO_RENAME_EXCHANGE", "1")
    import kill_worker

    folder = tmp_path / "ckpt"
    kill_worker.write_version("fxadapt", str(folder), 0)
    backup = (
        tmp_path / ".ckpt.fxadapt-old-999999999-deadbeef"
    )  # as left by a saver killed between its renames
    os.rename(folder, backup)
    model = kill_worker.base_model()
    assert kill_worker.loaded_version("fxadapt", str(folder), model) == 0
    assert not backup.exists()


def _model_with(name="a", method="seq_bn"):
    model = make_model("bert")
    fxadapt.inject(model, {name: method})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, name).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model = _model_with()
    folder = fxadapt.save_adapter(model, tmp_path / "a", "a")
    before = _snapshot(folder)
    import fxadapt.io as fio

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fio, "save_file", broken)
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(model, "a").values():
            p.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        fxadapt.save_adapter(model, folder, "a")
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_resave_drops_stale_files_keeps_foreign_ones(tmp_path):
    clf = _model_with()
    folder = tmp_path / "a"
    fxadapt.save_adapter(clf, folder, "a", format="adapterhub", use_safetensors=True)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("mine")
    fxadapt.save_adapter(clf, folder, "a", format="adapterhub", use_safetensors=False)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adapter_config.json", "extra", "pytorch_adapter.bin", "tokenizer.json"]
    assert (folder / "extra" / "notes.txt").read_text() == "mine"


def test_two_weight_files_name_the_one_used(tmp_path, caplog):
    model = _model_with()
    folder = tmp_path / "a"
    fxadapt.save_adapter(model, folder, "a", format="adapterhub", use_safetensors=True)
    stale = _model_with()
    with torch.no_grad():
        for p in fxadapt.adapter_parameters(stale, "a").values():
            p.zero_()
    fxadapt.save_adapter(stale, tmp_path / "b", "a", format="adapterhub")
    os.link(tmp_path / "b" / "pytorch_adapter.bin", folder / "pytorch_adapter.bin")  # a stale file beside it
    fresh = make_model("bert")
    with caplog.at_level(logging.WARNING, logger="fxadapt"):
        fxadapt.load_adapter(fresh, folder)
    assert "two weight files" in caplog.text and "loading adapter.safetensors" in caplog.text
    inputs = make_inputs("bert")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


def test_stale_head_file_is_not_loaded(tmp_path, caplog):
    import transformers as tf
    from tiny_models import make_config

    torch.manual_seed(0)
    clf = tf.BertForSequenceClassification(make_config("bert", num_labels=2)).eval()
    fxadapt.inject(clf, {"a": "seq_bn"})
    folder = fxadapt.save_adapter(clf, tmp_path / "a", "a")  # no head
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["head"] is None
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.ones(2, 32)}, str(folder / "head_model.safetensors"))
    other = tf.BertForSequenceClassification(make_config("bert", num_labels=2)).eval()
    before = other.classifier.weight.clone()
    with caplog.at_level(logging.WARNING, logger="fxadapt"):
        fxadapt.load_adapter(other, folder)
    assert torch.equal(other.classifier.weight, before)
    assert "not part of this checkpoint" in caplog.text


def test_save_onto_a_file_is_a_typed_error(tmp_path):
    model = _model_with()
    target = tmp_path / "taken"
    target.write_text("user data")
    for fmt in ("fxadapt", "adapterhub"):
        with pytest.raises(fxadapt.SavePathError, match="is a file") as info:
            fxadapt.save_adapter(model, target, "a", format=fmt)
        assert isinstance(info.value, FileExistsError) and "taken_adapter" in str(info.value)
    with pytest.raises(fxadapt.SavePathError, match="is a file, not a folder"):
        fxadapt.save_adapter(model, target / "inner", "a")
    assert target.read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_nested_save_is_one_unit(tmp_path):
    """compat's save (adapter + head) replaces the folder once: a failing head write leaves the old folder."""
    from fxadapt.compat import AdapterModel

    model = AdapterModel(make_model("bert"))
    model.add_adapter("a", config="seq_bn")
    model.add_classification_head("a", num_labels=2)
    model.save_adapter(tmp_path / "a", "a")
    before = _snapshot(tmp_path / "a")
    import fxadapt.compat as compat

    original = compat.save_file
    compat.save_file = lambda *a, **k: (_ for _ in ()).throw(OSError(5, "I/O error"))
    try:
        with pytest.raises(OSError, match="I/O error"):
            model.save_adapter(tmp_path / "a", "a")
    finally:
        compat.save_file = original
    assert _snapshot(tmp_path / "a") == before

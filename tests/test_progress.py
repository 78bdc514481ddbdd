"""Progress bars: shown only where a person watches (a TTY, or forced), silent otherwise, per thread."""

from __future__ import annotations

import io
import threading

import pytest
from tiny_models import make_model

import fxadapt
from fxadapt import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_when_not_a_tty_and_env_and_context_override(monkeypatch):
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    items = [1, 2, 3]
    assert progress.track(items, desc="x") is items  # not a terminal: the plain iterable, no tqdm
    monkeypatch.setattr("sys.stderr", _Tty())
    assert progress.progress_enabled()
    for value in ("0", "off", "False", "no"):
        monkeypatch.setenv(progress.ENV_VAR, value)
        assert not progress.progress_enabled()
    monkeypatch.setenv(progress.ENV_VAR, "1")
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress.progress_enabled()  # forced on even without a terminal
    with fxadapt.progress_bars(False):
        assert not progress.progress_enabled()
        assert progress.track(items, desc="x") is items
    assert progress.progress_enabled()


def test_context_is_per_thread(monkeypatch):
    monkeypatch.setenv(progress.ENV_VAR, "0")
    seen = []
    with fxadapt.progress_bars(True):
        worker = threading.Thread(target=lambda: seen.append(progress.progress_enabled()))
        worker.start()
        worker.join()
        assert progress.progress_enabled()
    assert seen == [False]  # another thread keeps its own (environment) setting


def test_bad_value_is_a_typed_error():
    with pytest.raises(fxadapt.ConfigError, match="True or False"), fxadapt.progress_bars("yes"):  # type: ignore[arg-type]
        pass


def test_inject_shows_layer_progress_when_watched(monkeypatch):
    stream = _Tty()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.delenv(progress.ENV_VAR, raising=False)
    monkeypatch.setitem(progress.track.__kwdefaults__, "delay", 0.0)  # show at once (the default waits 1 s)
    model = make_model("bert")
    fxadapt.inject(model, {"a": "seq_bn"})
    text = stream.getvalue()
    assert "fxadapt: tracing layers" in text and "2/2" in text
    assert "fxadapt: compiling layers" in text

    quiet = _Tty()
    monkeypatch.setattr("sys.stderr", quiet)
    with fxadapt.progress_bars(False):
        fxadapt.inject(make_model("bert"), {"a": "seq_bn"})
    assert quiet.getvalue() == ""

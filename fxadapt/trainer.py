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
from .atomic import atomic_file, recover
from .errors import CheckpointError

__all__ = ["AdapterTrainer"]


def _trained_adapters(model: torch.nn.Module) -> list[str]:
    names = []
    for name in api.list_adapters(model):
        if any(p.requires_grad for p in api.adapter_parameters(model, name).values()):
            names.append(name)
    return names


def _match(
    expected: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor], path: Path, what: str
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, saved value) pairs, after checking that the file holds exactly the expected keys and shapes."""
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"cannot resume {what} from {str(path)!r}: it is not this model's setup (missing {missing[:4]}, "
            f"unexpected {extra[:4]}); resume from a checkpoint of the same adapters, or start without "
            "resume_from_checkpoint"
        )
    for key, p in expected.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise CheckpointError(
                f"cannot resume {what} from {str(path)!r}: {key!r} has shape {tuple(tensors[key].shape)} there "
                f"but {tuple(p.shape)} in the model (another config, e.g. reduction_factor or r?)"
            )
    return [(p, tensors[key]) for key, p in expected.items()]


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
        with atomic_file(os.path.join(output_dir, "training_args.bin")) as tmp:
            torch.save(self.args, str(tmp))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        """Load the trained adapters (and head) saved in a checkpoint. Every file is read and every key and shape
        checked before the first weight is copied: a checkpoint of another setup raises CheckpointError and
        leaves the model as it was."""
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        state = api.get_state(model)
        planned: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        loaded = []
        for name in _trained_adapters(model):
            sub = folder / name
            recover(sub)
            if not (sub / io.CONFIG_NAME).is_file():
                continue
            tensors = io._read_weights(sub / io.WEIGHTS_NAME)
            expected = {}
            for full, p in api.adapter_state(model, name).items():
                layer_path, rest = full.split(f".{io.CONTAINER}.{name}.", 1)
                expected[f"layers.{state.layer_paths.index(layer_path)}.{rest}"] = p
            planned += _match(expected, tensors, sub / io.WEIGHTS_NAME, f"adapter {name!r}")
            if (sub / io.HEAD_WEIGHTS_NAME).is_file():
                head = io._read_weights(sub / io.HEAD_WEIGHTS_NAME)
                planned += _match(api.head_parameters(model), head, sub / io.HEAD_WEIGHTS_NAME, "the head")
            loaded.append(name)
        if not loaded:
            raise CheckpointError(f"no adapter checkpoint of {_trained_adapters(model)} in {str(folder)!r}")
        with torch.no_grad():
            for p, value in planned:
                p.copy_(value)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

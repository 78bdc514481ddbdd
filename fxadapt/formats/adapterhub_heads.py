"""AdapterHub flex heads (``*AdapterModel.add_<type>_head``) ↔ fxadapt's named prediction heads.

AdapterHub saves a flex head beside the adapter: ``head_config.json`` (``{"config": {"head_type", "layers",
"activation_function", "num_labels" | "num_choices", "use_pooler", "bias", "label2id", "dropout_prob"}, "name",
"model_class", ...}``) and ``pytorch_model_head.bin`` / ``model_head.safetensors`` with keys
``heads.<name>.<i>.<param>``, where ``<i>`` indexes the head's ``nn.Sequential`` (``adapters/heads/base.py``,
``PredictionHead.build``): per layer a ``Dropout``, then ``Linear(h, h)`` and the activation (if any) for all but the
last layer, ``Linear(h, labels)`` for the last. fxadapt's :class:`~fxadapt.heads.PredictionHead` has the same
blocks; the weights are matched Linear by Linear, in order (so a head without an activation, whose indices
shift, maps too).

Head types whose computation fxadapt's heads share with AdapterHub: classification (incl. ``use_pooler``),
multilabel classification, tagging, multiple choice, question answering. Others (language-model, dependency
parsing, image classification heads) are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from . import listed, read_json, read_tensors

__all__ = ["FLEX_HEAD_TYPES", "flex_head_linear_indices", "read_flex_head", "write_flex_head"]

HEAD_FILES = ("head_config.json", "model_head.safetensors", "pytorch_model_head.bin")
# AdapterHub head types fxadapt's PredictionHead computes the same way
FLEX_HEAD_TYPES = (
    "classification",
    "multilabel_classification",
    "tagging",
    "multiple_choice",
    "question_answering",
)


def flex_head_linear_indices(layers: int, activation: Any) -> list[int]:
    """Positions of the ``nn.Linear`` modules in AdapterHub's head ``nn.Sequential`` (``PredictionHead.build``)."""
    out, i = [], 0
    for layer in range(layers):
        i += 1  # Dropout
        out.append(i)
        i += 1
        if layer < layers - 1 and activation:
            i += 1  # the activation module
    return out


def _dropout(flex: dict[str, Any], model_config: Any) -> float:
    """AdapterHub's ``_get_dropout_prob``: the head's own, else the model's classifier / hidden dropout, else 0."""
    for value in (
        flex.get("dropout_prob"),
        getattr(model_config, "classifier_dropout", None),
        getattr(model_config, "hidden_dropout_prob", None),
    ):
        if value is not None:
            return float(value)
    return 0.0


def read_flex_head(
    folder: Path, model_config: Any, source: str
) -> tuple[str, dict[str, Any], list[dict[str, torch.Tensor]]] | None:
    """The flex head saved in ``folder``: ``(saved name, HeadConfig kwargs, per Linear in order {param: tensor})``.

    None when the folder has no head or a static one (``"config": null``: an HF model's own head).
    """
    if not (folder / HEAD_FILES[0]).is_file():
        return None
    meta = read_json(folder / HEAD_FILES[0])
    flex = meta.get("config")
    if flex is None:
        return _static_as_flex(folder, meta, model_config, source)
    if not isinstance(flex, dict) or "head_type" not in flex:
        raise CheckpointError(f"{source}: head_config.json 'config' must be a head config with 'head_type'")
    head_type = flex["head_type"]
    if head_type not in FLEX_HEAD_TYPES:
        raise CheckpointError(
            f"{source}: AdapterHub {head_type!r} heads are not supported by fxadapt's heads; it reads "
            f"{list(FLEX_HEAD_TYPES)} (pass with_head=False to load the adapter alone)"
        )
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: head_config.json names no head ('name': {name!r})")
    layers = flex.get("layers", 1)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise CheckpointError(f"{source}: head 'layers'={layers!r} is invalid; expected an int >= 1")
    activation = flex.get("activation_function")
    labels = flex.get("num_choices") if head_type == "multiple_choice" else flex.get("num_labels", 2)
    label2id = flex.get("label2id") or {}
    kwargs = {
        "head_type": head_type,
        "num_labels": int(labels if labels is not None else 2),
        "layers": layers,
        "activation_function": activation or "linear",  # no activation module: identity
        "dropout": _dropout(flex, model_config),
        "use_pooler": bool(flex.get("use_pooler", False)),
        "bias": bool(flex.get("bias", True)),
        "id2label": {str(v): k for k, v in label2id.items()},
    }
    tensors = read_tensors(folder, *HEAD_FILES[1:])
    positions = flex_head_linear_indices(layers, activation)
    linears: list[dict[str, torch.Tensor]] = [{} for _ in positions]
    unmapped = []
    prefix = f"heads.{name}."
    for key, value in tensors.items():
        index, _, param = key[len(prefix) :].partition(".") if key.startswith(prefix) else ("", "", "")
        if index.isdigit() and int(index) in positions and param in ("weight", "bias"):
            linears[positions.index(int(index))][param] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(
            f"{source}: head weights {listed(sorted(unmapped))} do not fit AdapterHub's {head_type} head with "
            f"layers={layers} (expected heads.{name}.<{'|'.join(map(str, positions))}>.weight/bias)"
        )
    return name, kwargs, linears


def _static_as_flex(
    folder: Path, meta: dict[str, Any], model_config: Any, source: str
) -> tuple[str, dict[str, Any], list[dict[str, torch.Tensor]]] | None:
    """A static HF head (``"config": null``) as the flex head AdapterHub converts it to (``STATIC_HEADS``, its
    ``STATIC_TO_FLEX_HEAD_MAP``); None for an HF head class without a flex equivalent."""
    from .adapterhub import STATIC_HEADS

    spec = STATIC_HEADS.get(str(meta.get("model_class")))
    if spec is None or spec[0] not in FLEX_HEAD_TYPES:
        return None
    head_type, layers, activation, use_pooler, modules = spec
    tensors = read_tensors(folder, *HEAD_FILES[1:])
    linears = []
    for index in sorted(modules):
        path = modules[index] + "."
        linears.append({k[len(path) :]: v for k, v in tensors.items() if k.startswith(path)})
    used = {modules[i] + "." + p for i, params in zip(sorted(modules), linears) for p in params}
    if set(tensors) - used or not all(linears):
        raise CheckpointError(
            f"{source}: the {meta.get('model_class')} head holds {listed(sorted(tensors))}, expected the weights of "
            f"{[modules[i] for i in sorted(modules)]}"
        )
    labels = meta.get("num_labels") or int(linears[-1]["weight"].shape[0])
    kwargs = {
        "head_type": head_type,
        "num_labels": int(labels),
        "layers": layers,
        "activation_function": activation or "linear",
        "dropout": _dropout({}, model_config),
        "use_pooler": use_pooler,
        "bias": "bias" in linears[-1],
        "id2label": {str(v): k for k, v in (meta.get("label2id") or {}).items()},
    }
    return str(meta.get("name") or ""), kwargs, linears


def load_linears(head: nn.Module, linears: list[dict[str, torch.Tensor]], source: str) -> None:
    """Copy AdapterHub's Linear weights into the Linear modules of ``head`` (in order); shapes must agree."""
    ours = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(ours) != len(linears):
        raise CheckpointError(f"{source}: the head has {len(linears)} linear layers, fxadapt's {len(ours)}")
    for k, (module, params) in enumerate(zip(ours, linears)):
        expected = {"weight": module.weight, **({"bias": module.bias} if module.bias is not None else {})}
        if set(params) != set(expected):
            raise CheckpointError(
                f"{source}: head linear layer {k} has parameters {sorted(params)}, expected {sorted(expected)}"
            )
        for pname, p in expected.items():
            if tuple(params[pname].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{source}: head linear layer {k} {pname} has shape {tuple(params[pname].shape)}, "
                    f"expected {tuple(p.shape)} (different num_labels or hidden size?)"
                )
    with torch.no_grad():
        for module, params in zip(ours, linears):
            for pname, value in params.items():
                getattr(module, pname).copy_(value)


def write_flex_head(
    folder: Path,
    name: str,
    config: Any,
    head: nn.Module,
    model: nn.Module,
    base: nn.Module,
    use_safetensors: bool,
) -> None:
    """Write fxadapt head ``name`` (a :class:`~fxadapt.heads.PredictionHead`) as AdapterHub's flex head, for
    ``<Base>AdapterModel.load_adapter`` (``model_class`` follows AdapterHub's naming: ``BertModel`` →
    ``BertAdapterModel``)."""
    from safetensors.torch import save_file

    from .. import __version__

    if config.head_type not in FLEX_HEAD_TYPES:
        raise CheckpointError(
            f"head {name!r} is a {config.head_type!r} head; AdapterHub's format is written for {list(FLEX_HEAD_TYPES)}"
        )
    activation = None if config.activation_function in ("linear", "identity") else config.activation_function
    flex: dict[str, Any] = {
        "head_type": config.head_type,
        "layers": config.layers,
        "activation_function": activation,
        "label2id": {v: int(k) for k, v in config.id2label.items()} or None,
        "dropout_prob": config.dropout,
    }
    if config.head_type == "multiple_choice":
        flex["num_choices"] = config.num_labels
    else:
        flex["num_labels"] = config.num_labels
    if config.head_type in ("classification", "multilabel_classification", "multiple_choice"):
        flex["use_pooler"] = config.use_pooler
    if config.head_type in ("classification", "multilabel_classification"):
        flex["bias"] = config.bias
    positions = flex_head_linear_indices(config.layers, activation)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    tensors = {
        f"heads.{name}.{pos}.{pname}": p.detach().contiguous().cpu().clone()
        for pos, module in zip(positions, linears)
        for pname, p in module.named_parameters()
    }
    model_config = getattr(model, "config", None)
    base_name = type(base).__name__
    meta = {
        "config": flex,
        "hidden_size": getattr(model_config, "hidden_size", None),
        "model_class": (base_name[: -len("Model")] if base_name.endswith("Model") else base_name)
        + "AdapterModel",
        "model_name": getattr(model_config, "_name_or_path", "") or "",
        "model_type": getattr(model_config, "model_type", None),
        "name": name,
        "version": f"fxadapt.{__version__}",
    }
    folder.mkdir(parents=True, exist_ok=True)
    if use_safetensors:
        save_file(tensors, str(folder / HEAD_FILES[1]), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(folder / HEAD_FILES[2]))
    (folder / HEAD_FILES[0]).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

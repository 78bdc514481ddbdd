"""Prediction heads added by name (AdapterHub's flexible heads): classification, multilabel classification,
tagging, multiple choice, question answering, causal and masked language modelling.

A head reads the base model's last hidden states and returns an HF ``ModelOutput`` with ``logits`` (and ``loss``
when labels are given). Architectures follow AdapterHub's ``PredictionHead``: ``layers - 1`` blocks of
``Dropout → Linear(h, h) → activation`` then ``Dropout → Linear(h, n)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .errors import ConfigError, nearest
from .methods.bottleneck import activation

__all__ = ["HEAD_TYPES", "HeadConfig", "PredictionHead"]


@dataclass
class HeadConfig:
    head_type: str
    num_labels: int = 2
    layers: int = 2
    activation_function: str = "tanh"
    dropout: float = 0.1
    use_pooler: bool = False
    bias: bool = True
    id2label: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# head type -> (default layers, output per token?)
HEAD_TYPES: dict[str, tuple[int, bool]] = {
    "classification": (2, False),
    "multilabel_classification": (2, False),
    "tagging": (1, True),
    "multiple_choice": (2, False),
    "question_answering": (1, True),
    "causal_lm": (1, True),
    "masked_lm": (2, True),
}


class PredictionHead(nn.Module):
    """One named head over hidden states of width ``hidden_size``."""

    def __init__(
        self, config: HeadConfig, hidden_size: int, vocab_size: int | None = None, pad_token_id: Any = None
    ):
        super().__init__()
        if config.head_type not in HEAD_TYPES:
            raise ConfigError(
                f"unknown head type {config.head_type!r}; expected one of {sorted(HEAD_TYPES)}"
                f"{nearest(config.head_type, HEAD_TYPES)}"
            )
        if config.layers < 1:
            raise ConfigError(f"head layers={config.layers!r} is invalid; expected an int >= 1")
        self.config = config
        self.pad_token_id = pad_token_id
        out = {
            "question_answering": 2,
            "multiple_choice": 1,
            "causal_lm": vocab_size,
            "masked_lm": vocab_size,
        }.get(config.head_type, config.num_labels)
        if out is None:
            raise ConfigError(f"a {config.head_type} head needs the model's vocab_size")
        blocks: list[nn.Module] = []
        for _ in range(config.layers - 1):
            blocks += [
                nn.Dropout(config.dropout),
                nn.Linear(hidden_size, hidden_size),
                activation(config.activation_function),
            ]
            if config.head_type == "masked_lm":
                blocks.append(nn.LayerNorm(hidden_size))
        blocks += [nn.Dropout(config.dropout), nn.Linear(hidden_size, out, bias=config.bias)]
        self.layers = nn.Sequential(*blocks)
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _pooled(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, pooled: Any) -> torch.Tensor:
        if self.config.use_pooler and pooled is not None:
            return pooled
        if input_ids is not None and self.pad_token_id is not None and self._causal:
            # decoder models: the last non-padding token (right padding)
            lengths = (input_ids != self.pad_token_id).sum(-1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths]
        return hidden[:, -1] if self._causal else hidden[:, 0]

    _causal = False

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        pooled: Any = None,
        labels: torch.Tensor | None = None,
        num_choices: int | None = None,
        **_: Any,
    ):
        t = self.config.head_type
        if t in ("classification", "multilabel_classification", "multiple_choice"):
            logits = self.layers(self._pooled(hidden, input_ids, pooled))
            loss = None
            if t == "multiple_choice":
                logits = logits.view(-1, num_choices or 1)
                loss = F.cross_entropy(logits, labels) if labels is not None else None
                return MultipleChoiceModelOutput(loss=loss, logits=logits)
            if labels is not None:
                if t == "multilabel_classification":
                    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
                elif self.config.num_labels == 1:
                    loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
                else:
                    loss = F.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)
        logits = self.layers(hidden)
        if t == "question_answering":
            start, end = logits.unbind(-1)
            return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)
        loss = None
        if labels is not None:
            if t == "causal_lm":
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
                )
            else:
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        cls = TokenClassifierOutput if t == "tagging" else MaskedLMOutput
        return cls(loss=loss, logits=logits)

"""AdapterHub-style API on top of fxadapt's verbs, for users coming from the ``adapters`` library.

``fxadapt.compat.init(model)`` gives an HF model the familiar methods; ``AdapterModel.from_pretrained(path)`` is a
base model with named prediction heads (AdapterHub's ``AutoAdapterModel``)::

    model = AdapterModel.from_pretrained(path)
    model.add_adapter("sst-2", config="seq_bn")
    model.add_classification_head("sst-2", num_labels=2)
    model.train_adapter("sst-2")                # adapter + its head train; HF Trainer works as usual
    model.save_all_adapters("out")
    model(**batch, adapter_names=["sst-2"])     # a per-call setup

Every method calls fxadapt's own verbs (``inject``, ``activate``, ``train_adapter``, ``save_adapter``, ...): no
second implementation. A head named like an adapter is activated, trained and saved with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import api, io
from .atomic import atomic_folder
from .calls import effective_setup, using
from .compose import Block, parallel_channels, parse_setup
from .errors import AdapterNotFoundError, CheckpointError, NameCollisionError
from .heads import HeadConfig, PredictionHead
from .multi_head import head_block, run_heads
from .rollback import check_adapter_name, rename_adapter

__all__ = ["AdapterModel", "AdapterModelMixin", "init"]

HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head_model.safetensors"


class AdapterModelMixin:
    """AdapterHub's model methods. Mixed into a model's class by :func:`init` (or used by :class:`AdapterModel`)."""

    _head_from_setup = False  # AdapterModel: a call's adapter_names also pick its head

    def __call__(self, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
        """``model(..., adapter_names=setup)``: the setup for this call only, in this thread (``fxadapt.using``);
        the model's active setup is not changed, so concurrent calls may use different setups."""
        if adapter_names is None:
            return super().__call__(*args, **kwargs)
        if self._head_from_setup and kwargs.get("head") is None:
            kwargs["head"] = _last_head(self, adapter_names)
        with using(self, adapter_names):
            return super().__call__(*args, **kwargs)

    # -- adapters -------------------------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, config: Any = "seq_bn", overwrite_ok: bool = False, set_active: bool = False
    ) -> None:
        if overwrite_ok and adapter_name in api.list_adapters(self):
            # build and validate the new adapter first: a config that fails leaves the trained adapter in place
            staging = _free_name(self, f"{adapter_name}-new")
            api.inject(self, {staging: config}, activate=False)
            api.remove(self, adapter_name)
            rename_adapter(self, staging, adapter_name)
            if set_active:
                api.activate(self, adapter_name)
            return
        api.inject(self, {adapter_name: config}, activate=set_active)

    def delete_adapter(self, adapter_name: str) -> None:
        api.remove(self, adapter_name)
        if adapter_name in self._heads():
            self.delete_head(adapter_name)

    def train_adapter(self, adapter_setup: Any, train_embeddings: bool = False) -> None:
        setup = parse_setup(adapter_setup)
        names = setup.names()
        api.activate(self, setup)
        trainable = set()
        for name in names:
            trainable |= {id(p) for p in api.adapter_parameters(self, name).values()}
        heads = self._heads()
        for name in names:
            if name in heads:
                trainable |= {id(p) for p in heads[name].parameters()}
        if not heads:  # an HF model with its own task head (classifier, score, ...)
            trainable |= {id(p) for p in api.head_parameters(self).values()}
        if train_embeddings:
            trainable |= {id(p) for p in self.get_input_embeddings().parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in trainable)
        self.train()
        self._set_active_head(setup)

    def set_active_adapters(self, adapter_setup: Any) -> None:
        api.activate(self, adapter_setup)
        if adapter_setup is not None:
            self._set_active_head(parse_setup(adapter_setup))

    @property
    def active_adapters(self) -> Block | None:
        return api.active_setup(self)

    def has_adapters(self) -> bool:
        return bool(api.list_adapters(self))

    def merge_adapter(self, name: str) -> None:
        api.merge(self, name)

    def eject_prefix_tuning(self, name: str) -> None:
        api.eject_prefix(self, name)

    # -- fusion ---------------------------------------------------------------------------------------------
    def add_adapter_fusion(
        self, adapter_names: Any, config: Any = "dynamic", set_active: bool = False
    ) -> None:
        api.add_fusion(self, adapter_names, config, activate=set_active)

    def train_adapter_fusion(self, adapter_setup: Any, unfreeze_adapters: bool = False) -> None:
        api.train_fusion(self, adapter_setup, unfreeze_adapters=unfreeze_adapters)

    # -- saving and loading ---------------------------------------------------------------------------------
    def save_adapter(
        self,
        save_directory: str | os.PathLike,
        adapter_name: str,
        with_head: bool = True,
        format: str = "fxadapt",
        **options: Any,
    ) -> None:
        """Save adapter ``adapter_name`` (and its head, or the HF model's head) in fxadapt's format, or with
        ``format="adapterhub"`` / ``"peft"`` in the peer's (a named head is written as AdapterHub's flex head, which
        ``<Model>AdapterModel.load_adapter`` loads). Adapter and head replace the folder as one unit."""
        heads = self._heads()
        if with_head and adapter_name in heads and format not in ("fxadapt", "adapterhub"):
            raise CheckpointError(
                f"head {adapter_name!r} cannot be written in the {format!r} format; pass with_head=False, or "
                "format='adapterhub' (AdapterHub's flex heads)"
            )
        with atomic_folder(save_directory) as folder:
            io.save_adapter(
                self,
                save_directory,
                adapter_name,
                with_head=with_head and not heads and bool(api.head_parameters(self)),
                format=format,
                **options,
            )
            if with_head and adapter_name in heads and format == "adapterhub":
                from .formats.adapterhub_heads import write_flex_head

                head = heads[adapter_name]
                base = getattr(self, "base_model", self)
                write_flex_head(
                    folder, adapter_name, head.config, head, self, base, bool(options.get("use_safetensors"))
                )
            elif with_head and adapter_name in heads:
                head = heads[adapter_name]
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
                    str(folder / HEAD_WEIGHTS),
                )
                (folder / HEAD_CONFIG).write_text(
                    json.dumps(
                        {"format": "fxadapt-head", "name": adapter_name, "config": head.config.to_dict()},
                        indent=2,
                    )
                    + "\n"
                )

    def save_all_adapters(self, save_directory: str | os.PathLike, with_head: bool = True) -> None:
        for name in api.list_adapters(self):
            self.save_adapter(Path(save_directory) / name, name, with_head=with_head)

    def load_adapter(
        self,
        adapter_name_or_path: str | os.PathLike,
        load_as: str | None = None,
        set_active: bool = False,
        with_head: bool = True,
        **kwargs: Any,
    ) -> str:
        from .formats.hub import resolve

        folder = resolve(
            adapter_name_or_path,
            model=self,
            revision=kwargs.pop("revision", None),
            cache_dir=kwargs.pop("cache_dir", None),
        )
        head_file = folder / HEAD_CONFIG
        own_head = with_head and head_file.is_file() and '"fxadapt-head"' in head_file.read_text()
        flex = None
        if with_head and not own_head and isinstance(self, AdapterModel):
            flex = _adapterhub_head(self, folder)  # checked before the model is touched
        # the head is read and built before anything changes: a corrupt head leaves the model (and an existing
        # head of that name) as they were
        head = self._read_own_head(folder, load_as) if own_head else None
        name = io.load_adapter(
            self,
            folder,
            name=load_as,
            activate=set_active,
            load_head=with_head and not own_head and flex is None,
            **kwargs,
        )
        if flex is not None:
            heads = self._heads()
            previous = (heads._modules.get(name), self.__dict__.get("active_head"))
            try:
                _, head_kwargs, linears = flex
                self._add_head(name, HeadConfig(**head_kwargs), overwrite_ok=True)
                from .formats.adapterhub_heads import load_linears

                load_linears(self._heads()[name], linears, str(folder))
            except Exception as exc:
                api.remove(self, name)
                if previous[0] is not None:
                    self._heads()[name] = previous[0]
                elif name in self._heads():
                    del self._heads()[name]
                self.__dict__["active_head"] = previous[1]
                if isinstance(exc, CheckpointError):
                    raise
                raise CheckpointError(
                    f"loading the AdapterHub head saved with adapter {name!r} failed: {exc}"
                ) from exc
        if head is not None:
            self._install_head(name, head)
        if set_active:
            self._set_active_head(name)
        return name

    def _read_own_head(self, folder: Path, load_as: str | None) -> PredictionHead:
        from .formats import read_json

        source = str(folder / HEAD_CONFIG)
        meta = read_json(folder / HEAD_CONFIG)
        try:
            config = HeadConfig(**meta["config"])
            head = self._build_head(config)
            tensors = load_file(str(folder / HEAD_WEIGHTS))
            head.load_state_dict(tensors)
        except Exception as exc:
            raise CheckpointError(
                f"cannot load the head saved in {source!r} (with {HEAD_WEIGHTS}): {type(exc).__name__}: {exc}"
            ) from exc
        return head

    # -- heads ----------------------------------------------------------------------------------------------
    def _heads(self) -> nn.ModuleDict:
        return self.__dict__.get("_modules", {}).get("heads") or nn.ModuleDict()

    def _build_head(self, config: HeadConfig) -> PredictionHead:
        cfg = getattr(self, "config", None)
        head = PredictionHead(
            config, cfg.hidden_size, getattr(cfg, "vocab_size", None), getattr(cfg, "pad_token_id", None)
        )
        head._causal = not getattr(cfg, "is_encoder_decoder", False) and bool(
            getattr(cfg, "is_decoder", False) or getattr(cfg, "model_type", "") in _CAUSAL
        )
        ref = next(self.parameters())
        return head.to(ref.device).train(self.training)

    def _install_head(self, name: str, head: PredictionHead) -> None:
        heads = self._modules.get("heads")
        if heads is None:
            heads = nn.ModuleDict()
            self.add_module("heads", heads)
        heads[name] = head
        self.__dict__["active_head"] = name

    def _add_head(self, name: str, config: HeadConfig, overwrite_ok: bool = False) -> None:
        check_adapter_name(name, "head")
        if name in self._heads() and not overwrite_ok:
            raise NameCollisionError(f"a head named {name!r} exists; pass overwrite_ok=True to replace it")
        self._install_head(name, self._build_head(config))

    def add_classification_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 2,
        activation_function: str = "tanh",
        overwrite_ok: bool = False,
        multilabel: bool = False,
        id2label: dict | None = None,
        use_pooler: bool = False,
    ) -> None:
        kind = "multilabel_classification" if multilabel else "classification"
        self._add_head(
            head_name,
            HeadConfig(
                kind,
                num_labels,
                layers,
                activation_function,
                use_pooler=use_pooler,
                id2label={str(k): v for k, v in (id2label or {}).items()},
            ),
            overwrite_ok,
        )

    def add_multilabel_classification_head(self, head_name: str, num_labels: int = 2, **kwargs: Any) -> None:
        self.add_classification_head(head_name, num_labels, multilabel=True, **kwargs)

    def add_tagging_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 1,
        activation_function: str = "tanh",
        overwrite_ok: bool = False,
    ) -> None:
        self._add_head(
            head_name, HeadConfig("tagging", num_labels, layers, activation_function), overwrite_ok
        )

    def add_multiple_choice_head(
        self,
        head_name: str,
        num_choices: int = 2,
        layers: int = 2,
        activation_function: str = "tanh",
        overwrite_ok: bool = False,
    ) -> None:
        self._add_head(
            head_name, HeadConfig("multiple_choice", num_choices, layers, activation_function), overwrite_ok
        )

    def add_qa_head(
        self,
        head_name: str,
        num_labels: int = 2,
        layers: int = 1,
        activation_function: str = "tanh",
        overwrite_ok: bool = False,
    ) -> None:
        self._add_head(
            head_name, HeadConfig("question_answering", num_labels, layers, activation_function), overwrite_ok
        )

    def add_causal_lm_head(self, head_name: str, layers: int = 1, overwrite_ok: bool = False) -> None:
        self._add_head(head_name, HeadConfig("causal_lm", layers=layers, bias=False), overwrite_ok)

    def add_masked_lm_head(
        self, head_name: str, layers: int = 2, activation_function: str = "gelu", overwrite_ok: bool = False
    ) -> None:
        self._add_head(
            head_name,
            HeadConfig("masked_lm", layers=layers, activation_function=activation_function),
            overwrite_ok,
        )

    def delete_head(self, head_name: str) -> None:
        heads = self._heads()
        if head_name not in heads:
            raise AdapterNotFoundError(f"no head named {head_name!r}; heads: {sorted(heads)}")
        del heads[head_name]
        if self.__dict__.get("active_head") == head_name:
            self.__dict__["active_head"] = None

    def _set_active_head(self, setup: Block | str) -> None:
        """The head(s) a setup uses (AdapterHub's reading, ``multi_head.head_block``: one per Parallel channel or
        BatchSplit slice), else the last of its adapters that has a head; unchanged if none has."""
        heads = self._heads()
        block = head_block(setup, heads)
        if block is not None:
            self.__dict__["active_head"] = block
            return
        for name in reversed(parse_setup(setup).names()):
            if name in heads:
                self.__dict__["active_head"] = name
                return


def _free_name(model: nn.Module, base: str) -> str:
    taken = api.list_adapters(model)
    return next(f"{base}{i or ''}" for i in range(len(taken) + 1) if f"{base}{i or ''}" not in taken)


_CAUSAL = {"gpt2", "llama", "mistral", "qwen2", "gpt_neox", "phi3", "gemma", "opt", "bloom", "falcon"}


class AdapterModel(AdapterModelMixin, nn.Module):
    """A Hugging Face base model (``AutoModel``) with named prediction heads (AdapterHub's ``AutoAdapterModel``)."""

    base_model_prefix = "model"
    _head_from_setup = True

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.__dict__["active_head"] = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> AdapterModel:
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, **kwargs))

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Any = None,
        head: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward, then the active (or named) head. ``adapter_names`` activates a setup for
        this call only; multiple-choice inputs are ``[batch, choices, tokens]``."""
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "pixel_values": pixel_values,
        }
        inputs = {k: v for k, v in inputs.items() if v is not None} | kwargs
        if adapter_names is not None:  # a direct forward(adapter_names=...) call: as model(...) does
            with using(self, adapter_names):
                return self.forward(**inputs, labels=labels, head=head or _last_head(self, adapter_names))
        num_choices = None
        if input_ids is not None and input_ids.dim() == 3:  # multiple choice: [batch, choices, tokens]
            num_choices = input_ids.shape[1]
            inputs = {
                k: (v.flatten(0, 1) if isinstance(v, torch.Tensor) and v.dim() == 3 else v)
                for k, v in inputs.items()
            }
        out = self.model(**inputs)
        name = head or self.__dict__.get("active_head")
        if name is None:
            return out
        heads = self._heads()
        hidden, ids, pooled = out[0], inputs.get("input_ids"), getattr(out, "pooler_output", None)
        if not isinstance(name, str):  # one head per Parallel channel / BatchSplit slice (multi_head.py)

            def call(head_module: PredictionHead, rows: slice, part_labels: Any) -> Any:
                n = len(range(*rows.indices(hidden.shape[0])))
                return head_module(
                    hidden[rows],
                    input_ids=ids
                    if ids is None or ids.shape[0] == n
                    else ids[rows],  # Parallel: all channels
                    pooled=pooled[rows] if pooled is not None else None,
                    labels=part_labels,
                    num_choices=num_choices,
                )

            channels = parallel_channels(effective_setup(self) or "")
            return run_heads(name, heads, channels, call, hidden.shape[0], labels)
        if name not in heads:
            raise AdapterNotFoundError(f"no head named {name!r}; heads: {sorted(heads)}")
        return heads[name](hidden, input_ids=ids, pooled=pooled, labels=labels, num_choices=num_choices)


def _adapterhub_head(model: AdapterModel, folder: Path) -> Any:
    """An AdapterHub head saved beside an adapter, as ``(name, HeadConfig kwargs, linear weights)``: a flex head
    (``heads.<name>.<i>.*``), or a static HF head AdapterHub converts to one; None when there is none."""
    from .formats import detect_format
    from .formats.adapterhub_heads import read_flex_head

    if not (folder / HEAD_CONFIG).is_file() or detect_format(folder) != "adapterhub":
        return None
    return read_flex_head(folder, model.config, f"AdapterHub head in {str(folder)!r}")


def _last_head(model: AdapterModelMixin, setup: Any) -> Any:
    """The head(s) a call with ``adapter_names=setup`` uses (see ``_set_active_head``), or None."""
    heads = model._heads()
    parsed = parse_setup(setup)
    block = head_block(parsed, heads)
    return block if block is not None else next((n for n in reversed(parsed.names()) if n in heads), None)


_SUBCLASSES: dict[type, type] = {}


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(
            cls.__name__,
            (AdapterModelMixin, cls),
            {
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__reduce_ex__": _reduce_ex,
                "_fxadapt_compat_base": cls,
            },
        )
        _SUBCLASSES[cls] = sub
    return sub


def _rebuild(cls: type) -> nn.Module:
    obj = cls.__new__(cls)
    obj.__class__ = _subclass(cls)
    return obj


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    return (_rebuild, (type(self)._fxadapt_compat_base,), self.__getstate__())


def init(model: nn.Module) -> nn.Module:
    """Give an HF model AdapterHub's methods (``add_adapter``, ``train_adapter``, ``set_active_adapters``,
    heads, ``save_all_adapters``, ``model(..., adapter_names=...)``), in place; returns the model."""
    if isinstance(model, AdapterModelMixin):
        return model
    model.__class__ = _subclass(type(model))
    return model

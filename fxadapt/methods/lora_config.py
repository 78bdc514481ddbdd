"""The LoRA family's configuration (:class:`LoRAConfig`: LoRA, (IA)^3, DoRA, VeRA, MTL-LoRA and their AdapterHub/PEFT
options) and its translation from PEFT's ``LoraConfig``/``IA3Config``; the method itself is ``lora.py``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from ..errors import ConfigError, nearest
from ..sites import MODULE_SITE_KINDS
from .base import AdapterConfig

__all__ = ["LoRAConfig"]

_INITS = ("lora", "bert", "gaussian", "ia3", "vera")
_MODES = ("add", "scale")
_VARIANTS = ("adapterhub", "peft")
_LINEAR = "linear:"
_MODEL = "model:"  # a projection outside the repeating layers (lora_outside.py)


# ----------------------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    """LoRA at projections. Defaults are AdapterHub's ``LoRAConfig`` (``"lora"``): r=8, alpha=8, q and v.

    Args:
        sites: module site kinds to adapt: ``attn.q/k/v/o``, ``attn.qkv`` (a whole fused projection),
            ``ffn.up/gate/down``, ``cross.q/k/v/o``, or ``linear:<module path in the layer>``. Default
            ``("attn.q", "attn.v")`` (AdapterHub's ``attn_matrices=["q", "v"]``).
        target_modules: PEFT-style alternative to ``sites``: module names; a name matches every Linear-like call
            in a layer whose path equals it or ends with ``.<name>`` (``"query"`` → ``attention.self.query``).
        r: rank (> 0).
        alpha: scaling numerator (> 0): ``s = alpha / r``.
        dropout: dropout on the LoRA input (``add`` mode only), in [0, 1).
        use_rslora: ``s = alpha / √r`` (Kalajdzievski, 2023) instead of ``alpha / r``.
        init_weights: ``"lora"`` (A Kaiming-uniform with a=√5, B zeros: a no-op at init), ``"bert"``
            (A, B ~ N(0, 0.02)), ``"gaussian"`` (PEFT: A ~ N(0, 1/r), B zeros) or ``"ia3"`` (ones).
        composition_mode: ``"add"`` (LoRA) or ``"scale"`` ((IA)^3: the output times ``s·B``, needs r=1).
        leave_out: layer indices (over all layer lists, encoder first) that get no adapter.
        use_dora: DoRA (``dora.py``): a learned magnitude per output feature rescales the adapted projection.
        vera_d, vera_b: VeRA (``vera.py``): frozen random A, B shared by all projections of the adapter, trained
            factors initialised to ``vera_d`` (before B) and ``vera_b`` (after B). Both or neither.
        variant: whose formulas DoRA and VeRA follow where the peers differ: ``"adapterhub"`` (default) or
            ``"peft"`` (``from_peft`` sets it). Plain LoRA and (IA)^3 are the same in both.
        cross_attention: an ``attn.<m>`` site also adapts the same projection of the cross-attention
            (``cross.<m>``) where a layer has one, as both peers do (AdapterHub's ``selfattn_lora`` and PEFT's
            ``target_modules=["q", "v"]`` reach every attention module of encoder-decoder models). Default: True
            for the default sites, False when ``sites`` are named (name ``cross.<m>`` to add them).
        use_gating: AdapterHub's gated LoRA (UniPELT): the update ``B A x`` times ``g = mean over positions of
            sigmoid(gate(x))`` (``gate: Linear(in, 1)``) *instead of* the scaling ``s``, as AdapterHub computes it.
    """

    method: ClassVar[str] = "lora"
    default_sites: ClassVar[tuple[str, ...]] = ("attn.q", "attn.v")

    sites: tuple[str, ...] | None = None
    target_modules: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    use_rslora: bool = False
    init_weights: str = "lora"
    composition_mode: str = "add"
    leave_out: tuple[int, ...] = ()
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    variant: str = "adapterhub"
    use_gating: bool = False
    cross_attention: bool | None = None

    def _fail(self, field: str, value: Any, expected: str, choices: Any = ()) -> None:
        raise ConfigError(
            f"{type(self).__name__}.{field}={value!r} is invalid; expected {expected}"
            f"{nearest(str(value), choices) if choices else ''}"
        )

    def __post_init__(self) -> None:
        fail = self._fail
        if self.cross_attention is None:  # the default sites follow the peers; named sites are taken as named
            object.__setattr__(self, "cross_attention", self.sites is None and self.target_modules is None)
        sites = _as_tuple(self.sites)
        targets = _as_tuple(self.target_modules)
        if targets is not None:
            if sites:
                fail(
                    "sites",
                    self.sites,
                    f"no sites when target_modules={list(targets)} is given (choose sites by kind or by name)",
                )
            if not targets or not all(isinstance(t, str) and t.strip(". ") for t in targets):
                fail("target_modules", self.target_modules, "a non-empty list of module names like 'query'")
            sites = ()
        elif sites is None:
            sites = self.default_sites
        elif not sites:
            fail("sites", self.sites, f"a non-empty tuple of module site kinds {sorted(MODULE_SITE_KINDS)}")
        for s in sites:
            if not isinstance(s, str) or (
                s not in MODULE_SITE_KINDS
                and not any(s.startswith(pre) and len(s) > len(pre) for pre in (_LINEAR, _MODEL))
            ):
                fail(
                    "sites",
                    s,
                    f"module site kinds {sorted(MODULE_SITE_KINDS)}, 'linear:<module path in the layer>' or "
                    "'model:<module path outside the layers>'",
                    MODULE_SITE_KINDS,
                )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "target_modules", targets)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            fail("r", self.r, "an int > 0 (the rank)")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not self.alpha > 0
            or not math.isfinite(self.alpha)
        ):
            fail("alpha", self.alpha, "a finite number > 0 (scaling = alpha / r)")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            fail("dropout", self.dropout, "a probability in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            fail("use_rslora", self.use_rslora, "True or False")
        if self.init_weights not in _INITS:
            fail("init_weights", self.init_weights, f"one of {list(_INITS)}", _INITS)
        if self.composition_mode not in _MODES:
            fail("composition_mode", self.composition_mode, f"one of {list(_MODES)}", _MODES)
        if self.composition_mode == "scale":
            if self.r != 1:
                fail("r", self.r, "1 with composition_mode='scale' (one scale per output feature)")
            if self.dropout:
                fail("dropout", self.dropout, "0.0 with composition_mode='scale' (no input to drop out)")
            if self.init_weights not in ("ia3", "lora", "bert"):
                fail(
                    "init_weights", self.init_weights, "'ia3', 'lora' or 'bert' with composition_mode='scale'"
                )
        leave_out = tuple(self.leave_out)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in leave_out):
            fail("leave_out", self.leave_out, "a list of layer indices (ints >= 0)")
        object.__setattr__(self, "leave_out", leave_out)
        self._check_forms()

    def _check_forms(self) -> None:
        """DoRA / VeRA options (AdapterHub's ``use_dora``, ``vera_d``, ``vera_b``)."""
        fail = self._fail
        if not isinstance(self.use_dora, bool):
            fail("use_dora", self.use_dora, "True or False")
        if self.variant not in _VARIANTS:
            fail("variant", self.variant, f"one of {list(_VARIANTS)}", _VARIANTS)
        for field in ("vera_d", "vera_b"):
            v = getattr(self, field)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            ):
                fail(field, v, "a finite number (VeRA's initial factor) or None")
        if (self.vera_d is None) != (self.vera_b is None):
            fail(
                "vera_d" if self.vera_d is None else "vera_b",
                None,
                f"a number: VeRA needs both vera_d and vera_b (got vera_d={self.vera_d!r}, vera_b={self.vera_b!r})",
            )
        if not isinstance(self.use_gating, bool):
            fail("use_gating", self.use_gating, "True or False")
        if self.use_gating and (self.use_dora or self.is_vera or self.composition_mode == "scale"):
            fail(
                "use_gating",
                True,
                "False with DoRA, VeRA or composition_mode='scale': gated LoRA is plain LoRA with a gate",
            )
        if self.composition_mode == "scale" and (self.use_dora or self.is_vera):
            which = "use_dora=True (DoRA)" if self.use_dora else "vera_d/vera_b (VeRA)"
            fail("composition_mode", "scale", f"'add' with {which}: (IA)^3 scales have no low-rank update")

    @property
    def is_vera(self) -> bool:
        return self.vera_d is not None

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    # -- peer field names ---------------------------------------------------------------------------------------

    @classmethod
    def from_peft(cls, config: Any) -> LoRAConfig:
        """The config equal to a PEFT ``LoraConfig`` (or its ``to_dict()`` / ``adapter_config.json`` dict).

        Maps ``r``, ``lora_alpha``, ``target_modules``, ``lora_dropout``, ``use_rslora`` and ``init_lora_weights``
        (``True`` → ``"lora"``, ``"gaussian"``, ``False`` → ``"bert"``: random non-zero A and B) and ``use_dora``
        (DoRA with PEFT's formula, ``variant="peft"``); a ``VeraConfig`` (``peft_type="VERA"``) gives VeRA with
        PEFT's formula. ``fan_in_fan_out`` is not needed (fxadapt reads the layout from the module). Settings that
        change the method (``bias`` other than ``"none"``, rank/alpha patterns, ``layers_to_transform``,
        PiSSA/LoftQ/... inits) raise ConfigError.
        """
        data = config.to_dict() if hasattr(config, "to_dict") else config
        if not isinstance(data, Mapping):
            raise ConfigError(f"from_peft expects a peft LoraConfig or a dict, got {type(config).__name__}")
        data = dict(data)
        peft_type = str(getattr(data.get("peft_type"), "value", data.get("peft_type") or "LORA"))
        if peft_type.upper() == "VERA":
            return cls._from_peft_vera(data)
        if peft_type.upper() != "LORA":
            raise ConfigError(
                f"from_peft: peft_type={peft_type!r} is not a LoRA config; expected 'LORA' or 'VERA' "
                "(IA3Config.from_peft reads 'IA3')"
            )
        targets = data.get("target_modules")
        if targets is None or isinstance(targets, str):
            raise ConfigError(
                f"from_peft: target_modules={targets!r} is not supported; expected a list of module names "
                "(PEFT's regex strings and 'all-linear' select by full model path)"
            )
        init = data.get("init_lora_weights", True)
        inits = {True: "lora", False: "bert", "gaussian": "gaussian"}
        if isinstance(init, str) and init.lower() == "gaussian":
            init = "gaussian"
        if not isinstance(init, (bool, str)) or init not in inits:
            raise ConfigError(
                f"from_peft: init_lora_weights={init!r} is not supported; expected True, False or 'gaussian'"
            )
        for key, value in data.items():
            if key in _PEFT_MAPPED or key in _PEFT_IGNORED:
                continue
            if value not in (None, False, "none", {}, [], ()):
                raise ConfigError(
                    f"from_peft: {key}={value!r} is not supported by fxadapt's LoRA; expected its PEFT default "
                    f"(supported fields: {sorted(_PEFT_MAPPED)})"
                )
        dora = bool(data.get("use_dora", False))
        return cls(
            target_modules=tuple(sorted(targets)),
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            init_weights=inits[init],
            use_dora=dora,
            variant="peft" if dora else "adapterhub",
        )

    @classmethod
    def _from_peft_vera(cls, data: dict[str, Any]) -> LoRAConfig:
        """PEFT's ``VeraConfig``: ``r``, ``d_initial``, ``vera_dropout``; PEFT has no scaling (alpha = r)."""
        targets = data.get("target_modules")
        if targets is None or isinstance(targets, str):
            raise ConfigError(
                f"from_peft: target_modules={targets!r} is not supported; expected a list of module names"
            )
        if data.get("save_projection", True) is False:
            raise ConfigError(
                "from_peft: VeRA with save_projection=False regenerates its projections from projection_prng_key "
                "with PEFT's generator; fxadapt reads VeRA adapters saved with their projections "
                "(save_projection=True, PEFT's default)"
            )
        allowed = {"r", "target_modules", "d_initial", "vera_dropout", "save_projection", "projection_prng_key",
                   "init_weights"}  # fmt: skip
        for key, value in data.items():
            if key in allowed or key in _PEFT_IGNORED:
                continue
            if value not in (None, False, "none", {}, [], ()):
                raise ConfigError(
                    f"from_peft: VeRA {key}={value!r} is not supported by fxadapt; expected its PEFT default "
                    f"(supported fields: {sorted(allowed)})"
                )
        r = data.get("r", 256)
        return cls(
            target_modules=tuple(sorted(targets)),
            r=r,
            alpha=r,
            dropout=data.get("vera_dropout", 0.0),
            vera_d=data.get("d_initial", 0.1),
            vera_b=0.0,
            init_weights="vera",
            variant="peft",
        )

    @classmethod
    def from_adapterhub(cls, config: Any) -> LoRAConfig:
        """The config equal to an AdapterHub ``LoRAConfig`` / ``IA3Config`` (object or dict).

        ``selfattn_lora`` + ``attn_matrices`` → ``attn.<m>``; ``intermediate_lora`` → ``ffn.up``;
        ``output_lora`` → ``ffn.down``. ``composition_mode="scale"`` gives an :class:`~fxadapt.IA3Config`.
        """
        data = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        sites: list[str] = []
        if data.get("selfattn_lora", True):
            sites += [f"attn.{m}" for m in data.get("attn_matrices", ["q", "v"])]
        if data.get("intermediate_lora"):
            sites.append("ffn.up")
        if data.get("output_lora"):
            sites.append("ffn.down")
        kwargs = dict(
            sites=tuple(sites),
            cross_attention=True,  # AdapterHub's selfattn_lora reaches every attention module, cross ones too
            r=data.get("r", 8),
            alpha=data.get("alpha", 8),
            dropout=data.get("dropout", 0.0),
            init_weights=data.get("init_weights", "lora"),
            composition_mode=data.get("composition_mode", "add"),
            leave_out=tuple(data.get("leave_out") or ()),
            use_dora=bool(data.get("use_dora", False)),
            vera_d=data.get("vera_d"),
            vera_b=data.get("vera_b"),
            use_gating=bool(data.get("use_gating", False)),
        )
        target = cls
        if kwargs["composition_mode"] == "scale":
            from .ia3 import IA3Config

            target = IA3Config
        return target(**kwargs)


_PEFT_MAPPED = {
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "use_rslora",
    "init_lora_weights",
    "use_dora",
}
# bookkeeping fields of a PEFT config that do not change what the adapter computes
_PEFT_IGNORED = {
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
    "modules_to_save",
    "megatron_core",
    "qalora_group_size",
    "layers_pattern",
    "ensure_weight_tying",
}


def _as_tuple(value: Any) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)

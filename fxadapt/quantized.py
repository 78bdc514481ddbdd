"""Quantized base models (QLoRA-style): adapters on a base whose linear layers hold quantized weights.

Nothing in capture or site discovery is special: the quantizers this module knows keep the projections
``nn.Linear`` (torchao's ``quantize_`` swaps the *weight* for a tensor subclass; bitsandbytes' ``Linear4bit`` and
``Linear8bitLt`` subclass ``nn.Linear``), so they are traced as leaf calls and found as ``attn.q``/``ffn.up``/...
like any projection; bottleneck adapters sit on the residual stream and never touch a weight. Training works
with the base frozen (gradients flow through the quantized matmuls to the adapters below).

What needs this module is **merging** a LoRA/(IA)^3 adapter into a quantized weight: :func:`float_weights`
gives each quantized projection a float copy of its weight for the duration of the merge, then requantizes the
merged weight with the same scheme (dequantize → merge → requantize, as PEFT does for bitsandbytes and torchao).
Requantization rounds again, so a merged quantized model is close to, not bit-equal to, the unmerged one, and
``unmerge`` does not restore the original quantized weight exactly. The schemes (a table, one row per weight
type; anything else raises :class:`~fxadapt.NotMergeableError` before a weight is touched):

==========================================  ====================================================================
weight type                                 requantized as
==========================================  ====================================================================
torchao ``Int8Tensor``                      ``Int8Tensor.from_hp`` with the same granularity (per row / tensor)
                                            (``Int8WeightOnlyConfig``)
torchao ``IntxUnpackedToInt8Tensor``        ``from_hp`` with the same block size, bit width and mapping
                                            (``IntxWeightOnlyConfig``: int1–int8 weight-only, e.g. int4)
bitsandbytes ``Params4bit``                 ``Params4bit`` with the same quant type (nf4/fp4), block size,
                                            statistics compression and storage dtype
bitsandbytes ``Int8Params``                 ``Int8Params`` (row-wise absmax int8, ``has_fp16_weights=False``)
==========================================  ====================================================================
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NotMergeableError

__all__ = ["float_weights", "is_quantized", "quantization_scheme"]


@dataclass(frozen=True)
class _Scheme:
    name: str
    matches: Callable[[nn.Module, torch.Tensor], bool]
    dequantize: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    requantize: Callable[[nn.Module, torch.Tensor, torch.Tensor], nn.Parameter]  # (module, old, new float)
    # an eval-mode forward changes the stored weight (bitsandbytes' CPU 4-bit inference path repacks it in place,
    # after which training through the layer fails): fxadapt then runs no forward in a mode the model is not in
    eval_changes_weight: bool = False


def _type_name(t: object) -> str:
    return f"{type(t).__module__.split('.')[0]}.{type(t).__name__}"


# ---- torchao -----------------------------------------------------------------------------------------------


def _is(weight: torch.Tensor, module_prefix: str, cls_name: str) -> bool:
    return type(weight).__name__ == cls_name and type(weight).__module__.startswith(module_prefix)


def _torchao_int8_requantize(module: nn.Module, old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    from torchao.quantization.granularity import PerRow, PerTensor

    block = list(old.block_size)
    if block == list(old.shape):
        granularity = PerTensor()
    elif block == [1, old.shape[-1]]:
        granularity = PerRow()
    else:  # pragma: no cover - checked by _torchao_int8_matches
        raise AssertionError(block)
    quantized = type(old).from_hp(new.to(old.dtype), granularity, act_quant_kwargs=old.act_quant_kwargs)
    return nn.Parameter(quantized, requires_grad=False)


def _torchao_int8_matches(module: nn.Module, weight: torch.Tensor) -> bool:
    if not _is(weight, "torchao", "Int8Tensor") or weight.dim() != 2:
        return False
    block = list(weight.block_size)
    return block in (list(weight.shape), [1, weight.shape[-1]])


def _torchao_intx_requantize(module: nn.Module, old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    from torchao.quantization.quant_primitives import MappingType

    symmetric = old.zero_point is None or not bool(old.zero_point.any())
    quantized = type(old).from_hp(
        new.to(old.dtype),
        tuple(old.block_size),
        old.target_dtype,
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
        activation_quantization=old.activation_quantization,
    )
    return nn.Parameter(quantized, requires_grad=False)


# ---- bitsandbytes ------------------------------------------------------------------------------------------


def _bnb_4bit_dequantize(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # an eval forward on a CPU with AVX512-BF16 repacked the weight for bitsandbytes' CPU inference kernel;
        # undo that on copies (the same inverse bitsandbytes applies before saving or moving the weight)
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return bnbf.dequantize_4bit(data, state).float()


def _bnb_4bit_requantize(module: nn.Module, old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(
        new.to(old.quant_state.dtype).cpu(),
        requires_grad=False,
        quant_type=old.quant_type,
        blocksize=old.blocksize,
        compress_statistics=old.compress_statistics,
        quant_storage=old.quant_storage,
        module=module,
    )
    return param.to(old.device)  # moving a Params4bit to a device quantizes it


def _bnb_int8_stats(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = getattr(module, "state", None)  # after a forward, Linear8bitLt keeps CB/SCB in its state
    cb = weight.CB if getattr(weight, "CB", None) is not None else weight.data
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else getattr(state, "SCB", None)
    return cb, scb


def _bnb_int8_matches(module: nn.Module, weight: torch.Tensor) -> bool:
    if not _is(weight, "bitsandbytes", "Int8Params") or weight.dtype != torch.int8:
        return False
    return _bnb_int8_stats(module, weight)[1] is not None


def _bnb_int8_dequantize(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    cb, scb = _bnb_int8_stats(module, weight)
    return cb.float() * scb.float().view(-1, 1) / 127.0


def _bnb_int8_requantize(module: nn.Module, old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    import bitsandbytes as bnb

    param = bnb.nn.Int8Params(new.half().cpu(), requires_grad=False, has_fp16_weights=False)
    param = param.to(old.device)  # quantizes: data = CB (int8), SCB = row absmax
    state = getattr(module, "state", None)
    if state is not None:  # drop the statistics of the old weight; the next forward takes the new ones
        state.CB = None
        state.SCB = None
    return param


SCHEMES: tuple[_Scheme, ...] = (
    _Scheme(
        "torchao Int8Tensor",
        _torchao_int8_matches,
        lambda m, w: w.dequantize().float(),
        _torchao_int8_requantize,
    ),
    _Scheme(
        "torchao IntxUnpackedToInt8Tensor",
        lambda m, w: _is(w, "torchao", "IntxUnpackedToInt8Tensor") and w.dim() == 2,
        lambda m, w: w.dequantize().float(),
        _torchao_intx_requantize,
    ),
    _Scheme(
        "bitsandbytes Params4bit",
        lambda m, w: _is(w, "bitsandbytes", "Params4bit") and getattr(w, "quant_state", None) is not None,
        _bnb_4bit_dequantize,
        _bnb_4bit_requantize,
        eval_changes_weight=True,
    ),
    _Scheme("bitsandbytes Int8Params", _bnb_int8_matches, _bnb_int8_dequantize, _bnb_int8_requantize),
)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a quantized tensor (a torchao tensor subclass, a bitsandbytes parameter,
    or any other weight that is not a plain floating-point tensor)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    plain = type(weight) in (torch.Tensor, nn.Parameter)
    return not (plain and weight.is_floating_point())


def quantization_scheme(module: nn.Module) -> str | None:
    """The name of the requantization scheme for ``module``'s weight (see the table above), or None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    return next((s.name for s in SCHEMES if s.matches(module, weight)), None)


def mode_bound(model: nn.Module) -> bool:
    """Whether a forward in the other train/eval mode would change ``model``'s quantized weights (see
    ``_Scheme.eval_changes_weight``): call variants in that mode are then traced at their first real use."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            isinstance(weight, torch.Tensor)
            and type(weight) not in (torch.Tensor, nn.Parameter)
            and any(s.eval_changes_weight and s.matches(module, weight) for s in SCHEMES)
        ):
            return True
    return False


@contextmanager
def float_weights(modules: Sequence[nn.Module], what: str) -> Iterator[None]:
    """Within the block, each quantized module in ``modules`` holds a float (fp32) copy of its weight; on a clean
    exit every changed weight is requantized with its own scheme, on an error the original quantized weights
    come back untouched.

    Raises:
        NotMergeableError: a quantized weight of a type no scheme knows (nothing is changed).
    """
    quantized: list[tuple[nn.Module, _Scheme, torch.Tensor]] = []
    for module in dict.fromkeys(modules):  # unique, in order
        if not is_quantized(module):
            continue
        weight = module.weight
        scheme = next((s for s in SCHEMES if s.matches(module, weight)), None)
        if scheme is None:
            known = ", ".join(s.name for s in SCHEMES)
            raise NotMergeableError(
                f"cannot {what}: {type(module).__name__} holds a {_type_name(weight)} weight "
                f"(dtype {weight.dtype}) that fxadapt does not know how to requantize (known: {known}); the "
                "adapter runs unmerged on quantized bases, or dequantize the model first"
            )
        quantized.append((module, scheme, weight))
    floats = []
    for module, scheme, weight in quantized:
        floats.append(nn.Parameter(scheme.dequantize(module, weight), requires_grad=False))
    for (module, _, _), value in zip(quantized, floats):
        module.weight = value
    try:
        yield
        requantized = [
            scheme.requantize(module, old, module.weight.detach()) for module, scheme, old in quantized
        ]
    except BaseException:
        for module, _, old in quantized:
            module.weight = old
        raise
    for (module, _, _), new in zip(quantized, requantized):
        module.weight = new

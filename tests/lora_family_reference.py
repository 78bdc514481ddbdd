"""Hand-written eager references for the LoRA family (DoRA, VeRA, MTL-LoRA, input-scaled (IA)^3, outside-layer LoRA)
and ReFT, written from the papers' / peers' formulas, independent of fxadapt's rewrite: forward hooks on the
projections (or layers) of an untouched copy of the base model, reading the adapter's tensors by name.

Where each site lives is written out per architecture here, not taken from fxadapt's site finder.
"""

from __future__ import annotations

import copy

import torch
from transformers.pytorch_utils import Conv1D

D = 32  # hidden size of every tiny model


def _t5_last(layer) -> str:
    return f"layer.{len(layer.layer) - 1}.DenseReluDense"


# site kind -> (projection path inside the layer, output slice or None), written out per architecture (the
# independent reference of test_lora.py and the LoRA-family tests)
SITES = {
    "bert": lambda layer: {
        "attn.q": ("attention.self.query", None),
        "attn.k": ("attention.self.key", None),
        "attn.v": ("attention.self.value", None),
        "ffn.up": ("intermediate.dense", None),
        "ffn.down": ("output.dense", None),
    },
    "llama": lambda layer: {
        "attn.q": ("self_attn.q_proj", None),
        "attn.k": ("self_attn.k_proj", None),
        "attn.v": ("self_attn.v_proj", None),
        "ffn.up": ("mlp.up_proj", None),
        "ffn.down": ("mlp.down_proj", None),
    },
    "gpt2": lambda layer: {
        "attn.q": ("attn.c_attn", (0, D)),
        "attn.k": ("attn.c_attn", (D, 2 * D)),
        "attn.v": ("attn.c_attn", (2 * D, 3 * D)),
        "attn.qkv": ("attn.c_attn", None),
        "ffn.up": ("mlp.c_fc", None),
        "ffn.down": ("mlp.c_proj", None),
    },
    "t5": lambda layer: {
        "attn.q": ("layer.0.SelfAttention.q", None),
        "attn.k": ("layer.0.SelfAttention.k", None),
        "attn.v": ("layer.0.SelfAttention.v", None),
        "ffn.up": (_t5_last(layer) + ".wi", None),
        "ffn.down": (_t5_last(layer) + ".wo", None),
    },
    "vit": lambda layer: {
        "attn.q": ("attention.q_proj", None),
        "attn.k": ("attention.k_proj", None),
        "attn.v": ("attention.v_proj", None),
        "ffn.up": ("mlp.fc1", None),
        "ffn.down": ("mlp.fc2", None),
    },
}
# a Linear outside the repeating layers
OUTSIDE = {
    "bert": "pooler.dense",
    "llama": "lm_head",
    "gpt2": "lm_head",
    "t5": "lm_head",
    "vit": "pooler.dense",
}


def weight_rows(proj, out_slice):
    w = proj.weight.t() if isinstance(proj, Conv1D) else proj.weight  # [out, in]
    b = proj.bias
    if out_slice is not None:
        w = w[out_slice[0] : out_slice[1]]
        b = b[out_slice[0] : out_slice[1]] if b is not None else None
    return w, b


def dora(p, x, y0, w, b, s, variant, delta=None, up=None):
    """DoRA over a low-rank update: LoRA's ``B A`` unless the unscaled ``delta`` [out, in] and the scaled update
    ``up`` of another form (VeRA) are given."""
    if delta is None:
        delta = p["lora_B"] @ p["lora_A"]
        up = s * (x @ p["lora_A"].t() @ p["lora_B"].t())
    if variant == "adapterhub":  # adapters/methods/lora.py: m / ||W + BA|| * (W x + b + s B A x)
        return p["magnitude"] / torch.linalg.norm(w + delta, dim=1) * (y0 + up)
    g = p["magnitude"] / torch.linalg.norm(w + s * delta, dim=1)  # PEFT: bias not rescaled
    return g * (y0 - (b if b is not None else 0) + up) + (b if b is not None else 0)


def vera_delta(p, shared, x, s, variant, n_in, n_out):
    a, bb = shared["lora_A"][:, :n_in], shared["lora_B"][:n_out]
    if variant == "adapterhub":  # x (V_B B V_D A)^T
        return s * (x @ (p["vera_B"] @ bb @ p["vera_D"] @ a).t())
    return s * p["lambda_b"] * ((p["lambda_d"] * (x @ a.t())) @ bb.t())


def mtl_delta(p, x, s, sharpness):
    w = torch.exp(p["weights"] / sharpness)
    w = w / w.sum()
    h = (x @ p["lora_A"].t()) * p["task_specific"]
    return s * sum(w[k] * (h @ p["lora_B"][k].t()) for k in range(p["lora_B"].shape[0]))


def _apply(kind_fn, proj, out_slice, hook_input):
    def hook(module, args, output):
        x = args[0]
        w, b = weight_rows(module, out_slice)
        if out_slice is None:
            return kind_fn(x, output, w, b)
        lo, hi = out_slice
        new = kind_fn(x, output[..., lo:hi], w, b)
        return torch.cat([output[..., :lo], new, output[..., hi:]], dim=-1)

    if hook_input is not None:
        return proj.register_forward_pre_hook(lambda module, args: (args[0] * hook_input, *args[1:]))
    return proj.register_forward_hook(hook)


def reference(base, arch, config, tensors, layer_paths):
    """A copy of ``base`` computing adapter ``config`` with ``tensors`` ({(layer index | None, site, param): tensor},
    None for outside-layer sites) by forward hooks."""
    ref = copy.deepcopy(base)
    s = config.scaling
    shared = {k[2][len("shared.") :]: v for k, v in tensors.items() if k[2].startswith("shared.")}
    by_site: dict = {}
    for (index, site, pname), t in tensors.items():
        if not pname.startswith("shared."):
            by_site.setdefault((index, site), {})[pname] = t
    for (index, site), p in by_site.items():
        if index is None:
            proj, out_slice = ref.get_submodule(site), None
        else:
            layer = ref.get_submodule(layer_paths[index])
            path, out_slice = SITES[arch](layer)[site]
            proj = layer.get_submodule(path)
        w, _ = weight_rows(proj, out_slice)
        n_out, n_in = w.shape
        if getattr(config, "feedforward_modules", ()) and site in config.feedforward_modules:
            _apply(None, proj, None, p["lora_B"].view(-1) * s)
        elif config.composition_mode == "scale":
            _apply(lambda x, y, w, b, p=p: y * (p["lora_B"].view(-1) * s), proj, out_slice, None)
        elif config.use_dora and config.is_vera:  # "dvora": DoRA's magnitude over VeRA's update

            def dvora(x, y, w, b, p=p, i=n_in, o=n_out):
                a, bb = shared["lora_A"][:, :i], shared["lora_B"][:o]
                delta = p["vera_B"] @ bb @ p["vera_D"] @ a
                up = vera_delta(p, shared, x, s, config.variant, i, o)
                return dora(p, x, y, w, b, s, config.variant, delta, up)

            _apply(dvora, proj, out_slice, None)
        elif config.use_dora:
            _apply(lambda x, y, w, b, p=p: dora(p, x, y, w, b, s, config.variant), proj, out_slice, None)
        elif config.is_vera:
            _apply(
                lambda x, y, w, b, p=p, i=n_in, o=n_out: (
                    y + vera_delta(p, shared, x, s, config.variant, i, o)
                ),
                proj,
                out_slice,
                None,
            )
        elif config.method == "mtl_lora":
            _apply(
                lambda x, y, w, b, p=p: y + mtl_delta(p, x, s, config.weights_sharpness),
                proj,
                out_slice,
                None,
            )
        else:
            _apply(
                lambda x, y, w, b, p=p: y + s * (x @ p["lora_A"].t() @ p["lora_B"].t()), proj, out_slice, None
            )
    return ref


# ------------------------------------------------------------------------------------------------------------
# ReFT


def reft_unit(p, prefix, h, subtract):
    """h + (W h + b - R h) R^T, R = the orthogonalised projection weight (eval: no dropout)."""
    r = p[f"{prefix}.projection_weight"]
    source = h @ p[f"{prefix}.learned_source.weight"].t() + p[f"{prefix}.learned_source.bias"]
    if subtract:
        source = source - h @ r.t()
    return h + source @ r


def reft_reference(base, config, units_by_layer, layer_paths, mask):
    """A copy of ``base`` with a hook on each layer's output intervening at the first ``prefix_positions`` and the
    last ``suffix_positions`` real tokens of each row (the positions computed here from the 2-D mask)."""
    ref = copy.deepcopy(base)
    for index, p in units_by_layer.items():

        def hook(module, args, output, p=p):
            h = output if isinstance(output, torch.Tensor) else output[0]
            b, t, _ = h.shape
            m = mask if mask is not None and mask.shape[1] == t else torch.ones(b, t, dtype=torch.long)
            new = h.clone()
            for row in range(b):
                first = int(m[row].argmax())
                count = int(m[row].sum())
                pre = [first + j for j in range(config.prefix_positions) if first + j < t]
                suf = [first + count - config.suffix_positions + j for j in range(config.suffix_positions)]
                suf = [i for i in suf if 0 <= i < t]
                pre_unit, suf_unit = ("units.0", "units.0") if config.tied_weights else ("units.0", "units.1")
                for i in pre:
                    new[row, i] = reft_unit(p, pre_unit, h[row, i], config.subtract_projection)
                for i in suf:
                    new[row, i] = reft_unit(p, suf_unit, h[row, i], config.subtract_projection)
            return new if isinstance(output, torch.Tensor) else (new, *output[1:])

        ref.get_submodule(layer_paths[index]).register_forward_hook(hook)
    return ref


def snapshot(model, inputs):
    """State, layer classes, adapters and outputs, to prove a failed call changed nothing: call the result."""
    from tiny_models import main_output

    import fxadapt

    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model.modules()]
    adapters = dict(fxadapt.list_adapters(model))
    with torch.no_grad():
        out = main_output(model(**inputs))

    def unchanged() -> None:
        now = model.state_dict()
        assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
        assert [type(m) for m in model.modules()] == classes
        assert fxadapt.list_adapters(model) == adapters
        with torch.no_grad():
            assert torch.equal(main_output(model(**inputs)), out)

    return unchanged

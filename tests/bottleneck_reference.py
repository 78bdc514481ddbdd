"""A hand-written eager reference of AdapterHub's bottleneck family, installed with hooks on an untouched model.

Written from AdapterHub's definitions (``Adapter.pre_forward/forward/post_forward``, ``PHMLayer``,
``NICECouplingBlock``, torchvision's row-wise stochastic depth), sharing no code with fxadapt: it reads only adapter
*weights* (``state_dict``) out of fxadapt's modules. Per architecture the residual sites are the modules that
produce a sublayer's output: BERT's ``BertSelfOutput`` / ``BertOutput`` (post-LN: the hook recomputes
``dropout(dense(x))`` and the site), pre-LN layers' attention / MLP modules (the hook records the residual input at
the norm in front and returns ``y - x``, since the layer adds ``x`` itself).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import fxadapt
from fxadapt.model import layers_of

ACT = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}


def phm_matrix(rule: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Σᵢ kron(rule[i], W[i]) with torch.kron."""
    return sum(torch.kron(rule[i], W[i]) for i in range(rule.shape[0]))


class Site:
    """One adapter at one residual site, from its config and weights."""

    def __init__(self, config, weights: dict[str, torch.Tensor], shared: dict[str, torch.Tensor]):
        self.c, self.w, self.shared = config, weights, shared

    def _proj(self, z, which):
        c, w = self.c, self.w
        if not c.phm_layer:
            return F.linear(z, w[f"{which}.weight"], w[f"{which}.bias"])
        src = (
            self.shared
            if c.shared_W_phm
            else {k[len(which) + 1 :]: v for k, v in w.items() if k.startswith(which)}
        )
        if c.shared_W_phm:
            W = src[f"W_{which}_left"] @ src[f"W_{which}_right"] if c.factorized_phm_W else src[f"W_{which}"]
        else:
            W = src["W_left"] @ src["W_right"] if c.factorized_phm_W else src["W"]
        rules = (
            self.shared
            if c.shared_phm_rule
            else {k[len(which) + 1 :]: v for k, v in w.items() if k.startswith(which)}
        )
        rule = (
            rules["phm_rule_left"] @ rules["phm_rule_right"] if c.factorized_phm_rule else rules["phm_rule"]
        )
        y = z @ phm_matrix(rule, W)
        return y + w[f"{which}.b"] if c.phm_bias else y

    def __call__(self, h, x, ln, training: bool):
        c, w = self.c, self.w
        if c.is_parallel:
            z, residual = x, x
        else:
            residual, z = h, h
            if c.original_ln_before:
                z = h + x
                if c.residual_before_ln == "post_add":
                    residual = z
                z = ln(z) if ln is not None else z
            if c.residual_before_ln is False:
                residual = z
        up = self._proj(ACT[c.non_linearity](self._proj(z, "down")), "up")
        if c.stochastic_depth and training and not c.is_parallel:
            keep = 1.0 - c.stochastic_depth
            up = up * torch.empty([up.shape[0], 1, 1], dtype=up.dtype).bernoulli_(keep) / keep
        scale = w.get("scaling", c.scaling)
        out = up * scale
        if c.use_gating:
            out = out * torch.sigmoid(F.linear(z, w["gate.weight"], w["gate.bias"])).mean(dim=1, keepdim=True)
        if c.is_parallel:
            out = out + h
        else:
            out = out + residual
        if c.original_ln_after:
            out = out + x
            out = ln(out) if ln is not None else out
        return out


def coupling(x, w, act, rev=False):
    def mlp(prefix, v):
        v = act(F.linear(v, w[f"{prefix}.0.weight"], w[f"{prefix}.0.bias"]))
        return F.linear(v, w[f"{prefix}.2.weight"], w[f"{prefix}.2.bias"])

    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    if not rev:
        a = a + mlp("F", b)
        b = b + mlp("G", a)
    else:
        b = b - mlp("G", a)
        a = a - mlp("F", b)
    return torch.cat([a, b], dim=-1)


# per architecture: (site key, path of the norm in front (pre-LN) or None, path of the sublayer module)
def sublayers(arch: str, layer) -> list[tuple[str, str | None, str]]:
    if arch == "bert":
        return [("attn_out", None, "attention.output"), ("ffn_out", None, "output")]
    if arch == "llama":
        return [("attn_out", "input_layernorm", "self_attn"), ("ffn_out", "post_attention_layernorm", "mlp")]
    if arch == "gpt2":
        return [("attn_out", "ln_1", "attn"), ("ffn_out", "ln_2", "mlp")]
    if arch == "vit":
        return [("attn_out", "layernorm_before", "attention"), ("ffn_out", "layernorm_after", "mlp")]
    if arch == "t5":
        last = len(layer.layer) - 1
        out = [("attn_out", "layer.0.layer_norm", "layer.0.SelfAttention")]
        if last == 2:
            out.append(("cross_out", "layer.1.layer_norm", "layer.1.EncDecAttention"))
        return [*out, ("ffn_out", f"layer.{last}.layer_norm", f"layer.{last}.DenseReluDense")]
    raise AssertionError(arch)


EMBED = {"bert": "embeddings", "llama": "model.embed_tokens", "gpt2": "transformer.drop", "t5": "encoder.dropout",
         "vit": "embeddings"}  # fmt: skip


def reference_model(arch: str, base, model, name: str):
    """An untouched copy of ``base`` computing ``model``'s adapter ``name`` with the hand-written math above."""
    ref = copy.deepcopy(base)
    config = fxadapt.list_adapters(model)[name]
    paths, layers = layers_of(model)
    weights = {}
    shared: dict[str, torch.Tensor] = {}
    inv = None
    for path, layer in zip(paths, layers):
        container = layer.fxadapt[name] if "fxadapt" in layer._modules and name in layer.fxadapt else {}
        for key, module in container.items():
            sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
            if key == "embed_inv":
                inv = sd
                continue
            shared.update({k[len("shared.") :]: v for k, v in sd.items() if k.startswith("shared.")})
            weights[(path, key)] = {k: v for k, v in sd.items() if not k.startswith("shared.")}
    act = ACT[config.non_linearity]
    for path in paths:
        layer = ref.get_submodule(path)
        for key, norm_path, sub_path in sublayers(arch, layer):
            if (path, key) not in weights:
                continue
            site = Site(config, weights[(path, key)], shared)
            sub = layer.get_submodule(sub_path)
            if norm_path is None:  # post-LN (BERT): the module computes LN(dropout(dense(a)) + x); replaced

                def forward(hidden_states, input_tensor, mod=sub, site=site):
                    h = mod.dropout(mod.dense(hidden_states))
                    return site(h, input_tensor, mod.LayerNorm, mod.training)

                sub.forward = forward
                continue
            box: dict[str, torch.Tensor] = {}
            layer.get_submodule(norm_path).register_forward_pre_hook(
                lambda m, a, box=box: box.__setitem__("x", a[0])
            )

            def hook(mod, args, out, site=site, box=box):
                h = out[0] if isinstance(out, tuple) else out
                new = site(h, box["x"], None, mod.training) - box["x"]
                return (new, *out[1:]) if isinstance(out, tuple) else new

            sub.register_forward_hook(hook)
    if inv is not None:
        ref.get_submodule(EMBED[arch]).register_forward_hook(lambda m, a, out: coupling(out, inv, act))
        out_emb = ref.get_output_embeddings() if hasattr(ref, "get_output_embeddings") else None
        if out_emb is not None:
            out_emb.register_forward_pre_hook(lambda m, a: (coupling(a[0], inv, act, rev=True), *a[1:]))
    return ref

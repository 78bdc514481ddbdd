"""An independent eager interpreter of bottleneck composition (AdapterHub's semantics), over plain tensors.

Written from AdapterHub's definitions (``Adapter.pre_forward/forward/post_forward``, ``compose_*``, ``BertFusion``)
without fxadapt's code; it reads only adapter *weights* out of fxadapt's modules. ``patch_sites`` installs it on an
untouched copy of a model with forward hooks, which gives the reference outputs for a setup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fxadapt
from fxadapt import Average, BatchSplit, Fuse, Parallel, Split, Stack

ACT = {"relu": F.relu, "swish": F.silu, "silu": F.silu, "gelu": F.gelu, "tanh": torch.tanh}


class Adapter:
    """Weights + config of one adapter at one site (copied out of the fxadapt model)."""

    def __init__(self, module, config):
        sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.wd, self.bd, self.wu, self.bu = (
            sd["down.weight"],
            sd["down.bias"],
            sd["up.weight"],
            sd["up.bias"],
        )
        self.scale = (
            module.scaling.detach().clone() if isinstance(module.scaling, torch.Tensor) else module.scaling
        )
        self.c = config

    def up(self, z):
        return ACT[self.c.non_linearity](z @ self.wd.T + self.bd) @ self.wu.T + self.bu

    def pre(self, hidden, x, ln):
        c = self.c
        if c.is_parallel:
            return x, x, x
        residual = hidden
        before = hidden
        if c.original_ln_before:
            hidden = hidden + x
            hidden = ln(hidden) if ln is not None else hidden
        return hidden, residual, before

    def run(self, hidden, residual):
        up = self.up(hidden) * self.scale
        out = up if self.c.is_parallel else up + residual
        return out, up

    def post(self, hidden, h, x, ln):
        if self.c.is_parallel:
            hidden = hidden + h
        if self.c.original_ln_after:
            hidden = hidden + x
            hidden = ln(hidden) if ln is not None else hidden
        return hidden


class Fusion:
    def __init__(self, module):
        sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.sd = sd

    def __call__(self, query, ups, residual):
        sd = self.sd
        q = query @ sd["query.weight"].T + sd["query.bias"]
        k = ups @ sd["key.weight"].T + sd["key.bias"]
        v = ups @ sd["value.weight"].T
        probs = torch.softmax(torch.einsum("btd,btnd->btn", q, k), dim=-1)
        return torch.einsum("btn,btnd->btd", probs, v) + residual


def interpret(setup, adapters: dict[str, Adapter], fusions: dict[str, Fusion], h, x, ln):
    """y for ``setup`` at a site with sublayer output ``h``, residual ``x`` and the layer norm ``ln`` (or None)."""
    present = [n for n in (setup.names() if not isinstance(setup, str) else [setup]) if n in adapters]
    if not present:
        return ln(h + x) if ln is not None else h + x

    def has(s):
        return any(n in adapters for n in ([s] if isinstance(s, str) else s.names()))

    def first(s):
        return next(n for n in s.names() if n in adapters)

    def pre_block(name, st):
        hidden, residual, _ = adapters[name].pre(st["hidden"], st["x"], ln)
        return {**st, "hidden": hidden, "residual": residual}

    def run(s, st):
        if not has(s):  # nothing of this block sits at this site
            return st
        if isinstance(s, str):
            out, up = adapters[s].run(st["hidden"], st["residual"])
            return {**st, "hidden": out, "up": up, "last": s}
        if isinstance(s, Stack):
            for c in s.children:
                if isinstance(c, str):
                    if c in adapters:
                        st = run(c, pre_block(c, st))
                else:
                    st = run(c, st)
            return st
        if isinstance(s, Fuse):
            if s.name not in fusions:  # no fusion layer at this site: the block does nothing here
                return st
            last = s.last() if s.last() in adapters else first(s)
            hidden, residual, _ = adapters[last].pre(st["hidden"], st["x"], ln)
            st = {**st, "hidden": hidden, "residual": residual}
            kids = [run(c, st) for c in s.children if has(c)]
            ups = torch.stack([k["up"] for k in kids], dim=2)
            return {**st, "hidden": fusions[s.name](hidden, ups, residual), "last": s.last()}
        if isinstance(s, Average):
            st = pre_block(first(s), st)
            kids = [(run(c, st), w) for c, w in zip(s.children, s.weights) if has(c)]
            stacked = torch.stack([k["hidden"] for k, _ in kids])
            w = torch.tensor([w for _, w in kids], dtype=stacked.dtype).view(-1, 1, 1, 1)
            return {**kids[0][0], "hidden": (stacked * w).mean(0), "last": kids[-1][0]["last"]}
        if isinstance(s, (BatchSplit, Split, Parallel)):
            st = pre_block(first(s), st)
            dim = 1 if isinstance(s, Split) else 0
            if isinstance(s, Parallel):
                per = st["hidden"].shape[0] // len(s.children)
                sizes = [per] * len(s.children)
            else:
                sizes = list(s.splits if isinstance(s, Split) else s.batch_sizes)
            parts, start = [], 0
            for c, size in zip(s.children, sizes):
                sl = {
                    k: (v.narrow(dim, start, size) if isinstance(v, torch.Tensor) else v)
                    for k, v in st.items()
                }
                start += size
                parts.append(run(c, sl) if has(c) else sl)
            last = next((p["last"] for p in reversed(parts) if p.get("last")), st.get("last"))
            cat = {"hidden": torch.cat([p["hidden"] for p in parts], dim)}
            if dim == 0:
                cat.update(
                    x=torch.cat([p["x"] for p in parts]), residual=torch.cat([p["residual"] for p in parts])
                )
            return {**st, **cat, "last": last}
        raise AssertionError(s)

    st = run(setup, {"hidden": h, "x": x, "residual": x, "up": None, "last": None})
    if st["last"] is None:  # nothing applied at this site
        return ln(h + x) if ln is not None else h + x
    return adapters[st["last"]].post(st["hidden"], h, st["x"], ln)


def site_weights(model, layer, index, setup):
    """Reference weights for every residual site of one fxadapt layer: {site_key: (adapters, fusions)}."""
    state = fxadapt.model.get_state(model)
    out = {}
    container = layer.fxadapt
    names = setup.names()
    for key in ("attn_out", "ffn_out", "cross_out"):
        adapters = {
            n: Adapter(container[n][key], state.adapters[n].config)
            for n in names
            if n in container and key in container[n]
        }
        fusions = {
            f: Fusion(container[f][key]) for f in state.fusions if f in container and key in container[f]
        }
        out[key] = (adapters, fusions)
    return out


def replicated(t, n):
    return t.repeat(n, *([1] * (t.dim() - 1)))
